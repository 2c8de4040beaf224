"""repif: faithful and fast influence functions for PyTorch models.

The Hessian (or GGN) is estimated on a small, representative subset of the training data chosen
by a sampler; see :class:`InfluenceEstimator` for the conventions.
"""

from repif import datasets, models, samplers, solvers
from repif.estimator import InfluenceEstimator, TopK
from repif.fitting import FittedCurvature
from repif.memory import MemoryBudget
from repif.recording import PoolStatistics, StatisticsRecorder
from repif.task import ClassificationTask, Task
from repif.training import load_or_train, train

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "FittedCurvature",
    "InfluenceEstimator",
    "MemoryBudget",
    "PoolStatistics",
    "StatisticsRecorder",
    "Task",
    "TopK",
    "__version__",
    "datasets",
    "load_or_train",
    "models",
    "samplers",
    "solvers",
    "train",
]
