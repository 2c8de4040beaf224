"""Old import paths of moved modules (see the README's "Renamed modules")."""

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (the same object), warning once that it moved."""
    warnings.warn(f"{old} moved to {new}; import it from there (this alias will be removed)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
