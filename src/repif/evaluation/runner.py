"""Deprecated alias of :mod:`repif.studies.evaluation.runner`, where it moved.

Importing it warns once and gives the same module; it will be removed in a later release.
"""

from repif._moved import alias

alias(__name__, "repif.studies.evaluation.runner")
