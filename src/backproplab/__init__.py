"""backproplab: training algorithms that change how deep nets are trained by backpropagation.

The foundation: ``data`` (offline and local-file datasets), ``models`` (model zoo by name),
``train`` (one loop with step, callback and transform plug points; DDP under torchrun),
``experiments`` (registered reproductions) and ``report`` (results -> HTML).
"""

import sys as _sys

from . import evidence, plugins  # noqa: F401 (plugins fills the registries)
from .data import Data, load_dataset
from .methods import layerwise, msgd, privacy, rifle, robustness, stobatch, teacher_student
from .methods.curveball import CrossEntropy, CurveBall, MeanSquaredError
from .methods.linear_backprop import KNOWN_ACTIVATIONS, linear_backprop, linear_backprop_scope, standard_backprop
from .models import build_model
from .train import Batch, TrainConfig, TrainState, fit, standard_step

# the documented names are modules too: `import backproplab.msgd`, `from backproplab.rifle import RIFLE`
for _name, _module in {"msgd": msgd, "rifle": rifle, "layerwise": layerwise, "privacy": privacy,
                       "robustness": robustness, "stobatch": stobatch, "teacher_student": teacher_student}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)

__all__ = ["Data", "load_dataset", "build_model", "Batch", "TrainConfig", "TrainState", "fit", "standard_step",
           "CurveBall", "msgd", "rifle", "layerwise", "teacher_student", "privacy", "robustness", "stobatch",
           "linear_backprop", "linear_backprop_scope", "standard_backprop", "KNOWN_ACTIVATIONS", "evidence",
           "CrossEntropy", "MeanSquaredError"]
__version__ = "0.1.0"
