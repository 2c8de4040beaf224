"""Deprecated: the class-removal study moved to :mod:`repif.studies.class_removal`.

Each old module (``repif.experiments.config``, ``.study``, ``.report``, ``.summary``,
``.resources``, ``.lock``) is an alias of the moved one; they will be removed in a later release.
"""
