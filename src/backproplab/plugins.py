"""The methods' entries in the registries the loop and the loaders read, filled here and only here.

``train.OPTIMIZERS`` / ``train.OPTIMIZER_STEPS`` (CurveBall: its optimizer and the step that owns its
forward-and-reverse pass), ``train.TRANSFORMS`` (linear backprop) and ``data.DATASETS`` (the Luck Matters
teacher's data). ``train`` and ``data`` sit below the methods and never import them; importing ``backproplab``
imports this module, so ``TrainConfig(optimizer="curveball")`` or ``load_dataset("gaussian_teacher")`` work
from any entry point. A user's own entries go into the same dictionaries.

Example:
    >>> from backproplab import train
    >>> sorted(train.OPTIMIZERS), sorted(train.TRANSFORMS)
    (['adam', 'curveball', 'gd', 'sgd'], ['linear_backprop'])
"""

from __future__ import annotations

from . import data, train
from .methods import curveball, linear_backprop, teacher_student

train.OPTIMIZERS["curveball"] = curveball.curveball_from_config
train.OPTIMIZER_STEPS["curveball"] = curveball.curveball_step
train.TRANSFORMS["linear_backprop"] = linear_backprop.linear_backprop
data.DATASETS["gaussian_teacher"] = teacher_student.gaussian_teacher
