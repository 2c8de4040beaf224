"""Deprecated alias of :mod:`repif.curvature.kinds`, where it moved.

Importing it warns once and gives the same module; it will be removed in a later release (see
the README's "Renamed modules").
"""

import sys
import warnings

import repif.curvature.kinds as _moved

warnings.warn(
    "repif.curvature_kinds moved to repif.curvature.kinds; import it from there "
    "(this alias will be removed)",
    DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
