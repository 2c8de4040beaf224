"""The estimator's options, checked once when it is built: which component takes which option,
the two-phase factor, the Kronecker fit's options against their curvature and solver, the task
and its weight decay, and the text every process must agree on (docs/design.md,
"Parts").
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.curvature.operator import resolve_shrinkage
from repif.task import ClassificationTask, Task
from repif.validation import check_finite_number


def component(value: Any, options: dict[str, Any] | None, registry: Any, what: str,
              options_name: str) -> tuple[Any, dict[str, Any] | None]:
    """(name, options) for a component given by name with ``options``, or as an instance that
    carries its own (read back through the registry); options beside an instance are refused,
    so no option is silently dropped or given twice."""
    if isinstance(value, str) or value is None:
        return value, options
    name, own = registry.options_of(value)
    if options:
        raise TypeError(f"{options_name} configure a {what} given by name; the {what} instance "
                        f"{type(value).__name__} carries its own options: set them on it, or "
                        f"pass {what}={name!r} with {options_name}")
    return name, own


def solver_options(solver: str, given: dict[str, Any] | None, loose: dict[str, Any],
                    batch_size: int | None) -> dict[str, Any]:
    """The solver's options: ``solver_options`` merged with the loose keyword arguments.

    A name both the estimator and the solver take (LiSSA's ``batch_size``, its mini-batch,
    against the estimator's cap on streamed chunks) would be bound to the estimator by Python
    and never reach the solver; passing it loose with such a solver is therefore refused unless
    ``solver_options`` says what the solver gets, so no option lands in the wrong component.
    """
    if given is not None and not isinstance(given, dict):
        raise TypeError(f"solver_options must be a dict, got {type(given).__name__}")
    given = dict(given or {})
    twice = sorted(set(given) & set(loose))
    if twice:
        raise TypeError(f"solver option(s) {', '.join(twice)} given both loose and in "
                        "solver_options; pass each once")
    merged = {**given, **loose}
    if (batch_size is not None and "batch_size" not in merged
            and "batch_size" in _solvers.accepted_options(solver)):
        raise TypeError(
            f"batch_size={batch_size!r} is ambiguous with solver={solver!r}: the estimator's "
            "batch_size caps its streamed chunks, the solver's is its mini-batch. Pass "
            f"solver_options={{'batch_size': {batch_size!r}}} for the solver's mini-batches; "
            "to cap the chunks as well, give both (solver_options={'batch_size': None} keeps "
            "the solver full-batch)"
        )
    return merged


def check_candidates(candidates: Any) -> float | None:
    """The two-phase factor c (≥ 1: the sampler picks m of c·m uniform candidates), or None."""
    if candidates is None:
        return None
    check_finite_number(candidates, "candidates")
    if candidates < 1:
        raise ValueError(
            f"candidates must be ≥ 1 (the sampler picks sample_size points from candidates × "
            f"sample_size uniform candidates) or None for the whole pool, got {candidates!r}; "
            "e.g. candidates=8"
        )
    return float(candidates)


def options_fingerprint(*options: Any) -> str:
    """The options every rank must share, as text; values without a stable text (callables,
    fitted objects) count by their type only."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in sorted(v.items())}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return type(v).__name__

    return repr([plain(v) for v in options])


def check_kronecker(curvature: str, kind: type[curvature_kinds.CurvatureKind], solver: str,
                     solver_options: dict[str, Any], options: dict[str, Any] | None
                     ) -> dict[str, Any]:
    """The Kronecker fit's options, checked against the curvature and solver they go with."""
    options = dict(options or {})
    pre = solver_options.get("preconditioner")
    _solvers.check_curvature(curvature, solver)
    if options:
        if not (kind.kronecker or isinstance(pre, str)
                or isinstance(solver_options.get("prior"), str)):
            raise ValueError(
                "kronecker_options configure a Kronecker-factored fit: pass them with "
                "curvature='kfac'/'ekfac', with a solver preconditioner ('ekfac') or with "
                "woodbury's prior ('ekfac')"
            )
        fitted = [name for name in (curvature if kind.kronecker else None, pre,
                                    solver_options.get("prior")) if isinstance(name, str)]
        for name in fitted:  # unknown options or values fail here, for the kinds that fit
            curvature_kinds.build(name, options)
    return options


def resolve_task(task: Task | None, weight_decay: float | None) -> Task:
    """The task, with ``weight_decay`` set on the default one; a conflict is an error."""
    if task is None:
        return ClassificationTask(weight_decay=0.0 if weight_decay is None else weight_decay)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a repif.Task, got {type(task).__name__}")
    if weight_decay is not None and float(weight_decay) != task.weight_decay:
        if task.weight_decay != 0.0:
            raise ValueError(
                f"weight_decay={weight_decay} disagrees with the task's "
                f"weight_decay={task.weight_decay}; set it in one place (the task)"
            )
        task = copy.copy(task)
        check_finite_number(weight_decay, "weight_decay")
        task.weight_decay = float(weight_decay)
    return task


def check_damping(damping: Any) -> float:
    check_finite_number(damping, "damping")
    if not damping >= 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}; a typical value is 1e-3–1e-1")
    return float(damping)


def check_arguments(kind: type[curvature_kinds.CurvatureKind], curvature: str, damping: Any,
                    sample_size: Any, shrinkage: Any, chunk_size: int | None,
                    batch_size: int | None) -> int | None:
    """Check the estimator's scalar arguments before anything is built (each error names the
    value and the fix); returns the batch size, with the deprecated ``chunk_size`` folded in."""
    check_damping(damping)
    if sample_size is not None and (isinstance(sample_size, bool) or sample_size <= 0):
        raise ValueError(
            f"sample_size must be a positive integer or None (whole pool), got {sample_size!r}"
        )
    if sample_size is not None:
        shrink = resolve_shrinkage(shrinkage, int(sample_size))  # fails here, not at fit
        if shrink and kind.kronecker:
            raise ValueError(f"shrinkage applies to curvature='ggn', not {curvature!r}; "
                             "pass shrinkage=0")
    if chunk_size is not None:
        warnings.warn("chunk_size is deprecated: chunks are sized by max_memory; "
                      "batch_size caps them", DeprecationWarning, stacklevel=3)
        batch_size = batch_size or chunk_size
    return batch_size


def check_eigen_damping(solver: str, damping: float, weight_decay: float) -> None:
    """``solver="eigen"`` inverts Kronecker factors, which are singular for softmax
    cross-entropy: λ + wd must be positive, or the solve fails after the (long) fit."""
    if solver == "eigen" and damping + weight_decay <= 0:
        raise ValueError(
            "solver 'eigen' needs damping + weight_decay > 0: a Kronecker factor of softmax "
            "cross-entropy is singular (the output layer's G has the all-ones null "
            "direction: shifting every logit together leaves the loss unchanged), so λ = 0 "
            "would fail after the fit; pass damping > 0, e.g. 1e-3 × the curvature's scale")
