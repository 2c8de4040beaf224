"""The curvature wing: what the inverse in an influence update inverts.

* :mod:`repif.curvature.operator`: the exact GGN or Hessian of a weighted subset as a
  matrix-free operator (products through the model, a dense form for small models).
* :mod:`repif.curvature.kfac`: Kronecker-factored curvatures (K-FAC, EK-FAC) fitted layer by
  layer, their eigenbases and their factor cache.
* :mod:`repif.curvature.kinds`: the registry of curvature kinds by name ("ggn", "hessian",
  "kfac", "ekfac"), each built from a :class:`~repif.curvature.kinds.CurvatureRequest` that the
  fitter hands over (kinds never import the fitter).

Imports run downwards only: kinds → kfac, operator → the core (task, data, memory).
See docs/design.md, "Parts".
"""

from repif.curvature.operator import CurvatureOperator, resolve_shrinkage

__all__ = ["CurvatureOperator", "resolve_shrinkage"]
