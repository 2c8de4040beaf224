"""Deprecated alias of :mod:`repif.gradients.hooks`, where it moved.

Importing it warns once and gives the same module; it will be removed in a later release (see
the README's "Renamed modules").
"""

import sys
import warnings

import repif.gradients.hooks as _moved

warnings.warn(
    "repif.layer_gradients moved to repif.gradients.hooks; import it from there "
    "(this alias will be removed)",
    DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
