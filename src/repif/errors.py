"""Exceptions raised by repif. Every message names the bad value and the fix."""

from __future__ import annotations


class RepifError(Exception):
    """Base class for repif's own errors."""


class SolverDivergedError(RepifError, ArithmeticError):
    """An iterative solver blew up (LiSSA) or met negative curvature (CG)."""


class TooLargeError(RepifError, MemoryError):
    """A dense computation was asked for on a problem larger than the stated limit."""


class CorruptFileError(RepifError, ValueError):
    """A saved file cannot be read back: unparsable, foreign, or its content fails its checksum.
    Callers that can rebuild the file treat it as missing (with a warning)."""


class RemovalWarning(UserWarning):
    """A removal (``InfluenceEstimator.remove``) damaged what it should have kept: the retained
    classes' accuracy fell below the share :data:`repif.unlearning.RETAINED_SHARE` of its value
    before the update. The message names the measured drop and the fix."""
