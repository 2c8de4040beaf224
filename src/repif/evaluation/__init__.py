"""Deprecated alias of :mod:`repif.studies.evaluation`, where it moved.

Importing it warns once and gives the same public names; its old modules
(``repif.evaluation.runner``, ``.ground_truth``, ``.scores``, ``.report``, ``.cli``) are aliases
of the moved ones. They will be removed in a later release.
"""

from repif._moved import alias_package

alias_package(__name__, "repif.studies.evaluation", globals())
