"""backproplab: training algorithms that change how deep nets are trained by backpropagation.

The foundation: ``data`` (offline and local-file datasets), ``models`` (model zoo by name),
``train`` (one loop with step, callback and transform plug points; DDP under torchrun),
``experiments`` (registered reproductions) and ``report`` (results -> HTML).
"""

from . import evidence
from .data import Data, load_dataset
from .models import build_model
from .methods import layerwise, msgd, privacy, rifle, robustness, stobatch, teacher_student
from .methods.curveball import CurveBall
from .methods.linear_backprop import linear_backprop, linear_backprop_scope, standard_backprop
from .train import Batch, TrainConfig, TrainState, fit, standard_step

__all__ = ["Data", "load_dataset", "build_model", "Batch", "TrainConfig", "TrainState", "fit", "standard_step",
           "CurveBall", "msgd", "rifle", "layerwise", "teacher_student", "privacy", "robustness", "stobatch",
           "linear_backprop", "linear_backprop_scope", "standard_backprop", "evidence"]
__version__ = "0.1.0"
