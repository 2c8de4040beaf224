"""Deprecated alias of :mod:`repif.studies.class_removal.config`, where it moved.

Importing it warns once and gives the same module; it will be removed in a later release.
"""

from repif._moved import alias

alias(__name__, "repif.studies.class_removal.config")
