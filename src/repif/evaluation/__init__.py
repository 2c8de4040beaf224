"""Deprecated alias of :mod:`repif.studies.evaluation`, where it moved.

Importing it warns once and gives the same public names; its old modules
(``repif.evaluation.runner``, ``.ground_truth``, ``.scores``, ``.report``, ``.cli``) are aliases
of the moved ones. They will be removed in a later release.
"""

import importlib
from typing import Any

from repif._moved import alias_package

alias_package(__name__, "repif.studies.evaluation", globals())

_MODULES = ("cli", "ground_truth", "report", "runner", "scores")


def __getattr__(name: str) -> Any:
    """The old modules as attributes (``repif.evaluation.runner``), as before the move."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
