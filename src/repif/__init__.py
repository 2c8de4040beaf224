"""repif: faithful and fast influence functions for PyTorch models.

The Hessian (or GGN) is estimated on a small, representative subset of the training data chosen
by a sampler; see :class:`InfluenceEstimator` for the conventions.
"""

from repif import datasets, models, samplers, solvers
from repif.distributed import DistributedError
from repif.errors import (
    CorruptFileError,
    RemovalWarning,
    RepifError,
    SolverDivergedError,
    TooLargeError,
)
from repif.estimator import InfluenceEstimator
from repif.fitting import FittedCurvature
from repif.memory import MemoryBudget
from repif.projection import ProjectedGradients
from repif.recording import PoolStatistics, StatisticsRecorder
from repif.scoring import TopK
from repif.task import ClassificationTask, Task
from repif.training import load_or_train, train

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "CorruptFileError",
    "DistributedError",
    "FittedCurvature",
    "InfluenceEstimator",
    "MemoryBudget",
    "PoolStatistics",
    "ProjectedGradients",
    "RemovalWarning",
    "RepifError",
    "SolverDivergedError",
    "StatisticsRecorder",
    "Task",
    "TooLargeError",
    "TopK",
    "__version__",
    "datasets",
    "load_or_train",
    "models",
    "samplers",
    "solvers",
    "train",
]
