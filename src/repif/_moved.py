"""Old import paths of moved modules (see the README's "Renamed modules")."""

import importlib
import sys
import warnings
from typing import Any


def alias(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (the same object), warning once that it moved."""
    warnings.warn(f"{old} moved to {new}; import it from there (this alias will be removed)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)


def alias_package(old: str, new: str, namespace: dict[str, Any]) -> None:
    """Give package ``old`` the public names of package ``new`` (the same objects), warning
    once that it moved. Unlike :func:`alias` the old package stays its own module, so that its
    submodules (each an :func:`alias` of the moved one) are found on its own path rather than
    loaded a second time from the new package's folder."""
    warnings.warn(f"{old} moved to {new}; import it from there (this alias will be removed)",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    names = getattr(module, "__all__", [k for k in vars(module) if not k.startswith("_")])
    namespace.update({k: getattr(module, k) for k in names})
    namespace["__all__"] = list(names)
