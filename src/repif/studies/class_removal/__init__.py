"""The class-removal study (``repif class-removal``, ``repif demo``): for each removed class,
sampler, sample size and seed, one influence update, scored against the full-pool update and
retraining.

- :mod:`~repif.studies.class_removal.config`: the configuration (``StudyConfig``);
- :mod:`~repif.studies.class_removal.study`: the run (``Study``): setup, the grid, resuming;
- :mod:`~repif.studies.class_removal.references`: the full-pool update and the retrained model;
- :mod:`~repif.studies.class_removal.cells`: one cell of the grid, measured;
- :mod:`~repif.studies.class_removal.vectors`: the stored estimates v_T, checked on read;
- :mod:`~repif.studies.class_removal.rows`: the typed rows of ``results.json``, checked on read;
- :mod:`~repif.studies.class_removal.resume`: earlier results merged and resumed from;
- :mod:`~repif.studies.class_removal.summary`, :mod:`~repif.studies.class_removal.report`:
  the table, the conclusions and ``report.html``.
"""
