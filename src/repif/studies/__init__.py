"""The studies: applications on top of the estimator that the library core never imports.

- :mod:`repif.studies.class_removal`: the class-removal study (``repif class-removal``,
  ``repif demo``);
- :mod:`repif.studies.evaluation`: attribution scored against retraining, LDS and LOO
  (``repif evaluate``);
- :mod:`repif.studies.runs`: the run machinery both share (the output directory's lock,
  backups of another configuration's results, the errors and their exit codes, the checks of
  ``--out`` and ``--device``);
- :mod:`repif.studies.resources`: wall time and peak memory of a block, measured alike for both;
- :mod:`repif.studies.rows`: typed result rows, checked when a results file is read.
"""
