"""The K-FAC / EK-FAC preconditioner of ``cg`` and ``lissa`` (docs/design.md, "Kronecker
factors"): M = (K + wd·I + λI)⁻¹ with K the Kronecker-factored curvature fitted on the same
subset and weights as the exact operator, applied in its eigenbasis."""

from __future__ import annotations

from typing import Any

from repif.curvature.kfac import KINDS, KroneckerCurvature, fit_kronecker

PRECONDITIONERS = (None, *KINDS)


def check_preconditioner(value: Any) -> Any:
    """``value`` if it names a preconditioner ("kfac", "ekfac", None) or is a fitted
    :class:`KroneckerCurvature`, else ValueError."""
    if value is None or isinstance(value, KroneckerCurvature) or (
        isinstance(value, str) and value in KINDS
    ):
        return value
    raise ValueError(f"preconditioner must be one of {', '.join(map(repr, PRECONDITIONERS))} "
                     f"or a fitted repif.curvature.kfac.KroneckerCurvature, got {value!r}")


def resolve_preconditioner(value: Any, operator: Any, damping: float
                           ) -> KroneckerCurvature | None:
    """The fitted preconditioner for ``operator``: ``value`` itself when fitted (the estimator
    fits it with its options and cache), else fitted here on the operator's own subset and
    weights. It must cover every parameter and be positive definite at this damping."""
    if value is None:
        return None
    value = kronecker_on(value, operator, "preconditioner")
    low, _ = value.spectrum(damping)
    if not low > 0:
        raise ValueError("the K-FAC preconditioner is singular at damping + weight_decay = 0; "
                         "set damping > 0")
    return value


def kronecker_on(value: str | KroneckerCurvature, operator: Any, role: str
                 ) -> KroneckerCurvature:
    """``value`` fitted (a kind name is fitted here on the operator's own subset and weights)
    and checked to act on every parameter of ``operator``; ``role`` names it in errors."""
    if isinstance(value, str):
        value = fit_kronecker(operator.fm, operator.x, operator.y, operator.weights, kind=value,
                              budget=operator.budget)
    if value.size != operator.size:
        raise ValueError(f"the {role} has {value.size} parameters, the curvature "
                         f"{operator.size}")
    if value.others and value.other_layers == "frozen":
        raise ValueError(f"a {role} must act on every parameter: fit it with "
                         "other_layers='identity', not 'frozen'")
    return value
