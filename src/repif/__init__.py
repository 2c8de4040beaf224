"""repif: faithful and fast influence functions for PyTorch models.

The Hessian (or GGN) is estimated on a small, representative subset of the training data chosen
by a sampler; see :class:`InfluenceEstimator` for the conventions.
"""

from repif import samplers, solvers
from repif.estimator import InfluenceEstimator, TopK
from repif.task import ClassificationTask

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "InfluenceEstimator",
    "TopK",
    "__version__",
    "samplers",
    "solvers",
]
