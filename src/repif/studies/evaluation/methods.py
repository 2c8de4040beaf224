"""Attribution methods by name:
``[curvature[+key=value…]:]solver[+key=value…][@sampler[+shrink][+key=value…]]``, or a
baseline (``grad-dot``), parsed into a :class:`Method` and checked against the registries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repif import options as _options
from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.studies.class_removal.config import SHRINK_SUFFIX, split_sampler

#: Baselines by name → (curvature, solver): no curvature at all. TracIn at the final checkpoint
#: only is this gradient dot product times the learning rate, so its LDS and LOO are the same.
BASELINES = {"grad-dot": ("ggn", "identity")}


@dataclass(frozen=True)
class Method:
    """An attribution method: ``[curvature:]solver[+key=value…][@sampler[+shrink]]`` or a
    baseline name.

    Without ``@sampler`` the curvature uses the whole training set; with it, a subset of each
    of the run's sample sizes drawn by that sampler (one cell per seed). ``+key=value`` after
    the solver passes a solver option (numbers read as numbers), e.g.
    ``ggn:woodbury+prior=ekfac@logit-importance``; after the sampler it passes a sampler
    option, e.g. ``@logit-importance+proxy=gini-feature``; after the curvature, an option of
    the Kronecker fit (the estimator's ``kronecker_options``), e.g.
    ``ekfac+basis_size=pool:eigen@logit-importance``.
    """

    spec: str
    curvature: str
    solver: str
    sampler: str | None = None
    shrinkage: float | str = 0.0
    solver_options: tuple[tuple[str, Any], ...] = ()
    sampler_options: tuple[tuple[str, Any], ...] = ()
    #: Options of the Kronecker fit (the curvature's, a prior's or a preconditioner's).
    curvature_options: tuple[tuple[str, Any], ...] = ()

    @property
    def sampled(self) -> bool:
        return self.sampler is not None

    @property
    def uses_damping(self) -> bool:
        return self.solver != "identity"


def parse_method(spec: str) -> Method:
    """A :class:`Method` from its name; ValueError listing the known parts for a bad one."""
    s = spec.strip()
    if s in BASELINES:
        return Method(s, *BASELINES[s])
    body, at, sampler = s.partition("@")
    curvature, colon, solver = body.rpartition(":")
    curvature, *curvature_parts = (curvature if colon else "ggn").split("+")
    solver, *option_parts = solver.split("+")
    options = _key_values(spec, option_parts, "solver")
    kron = tuple(_key_values(spec, curvature_parts, "curvature"))
    if curvature not in curvature_kinds.names():
        raise ValueError(f"method {spec!r}: unknown curvature {curvature!r}; known: "
                         f"{', '.join(curvature_kinds.names())} (write e.g. ggn:direct or "
                         "ggn:woodbury@logit-importance)")
    if solver not in _solvers.names():
        raise ValueError(f"method {spec!r}: unknown solver {solver!r}; known: "
                         f"{', '.join(_solvers.names())}; baselines: {', '.join(BASELINES)}")
    try:
        _solvers.check_curvature(curvature, solver, lambda k, v: f"{k} {v}")
    except ValueError as err:
        raise ValueError(f"method {spec!r}: {err} (methods are written curvature:solver, "
                         "e.g. ekfac:eigen or ggn:cg)") from None
    if options:
        try:
            _solvers.build(solver, dict(options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {spec!r}: {err}") from None
    if kron:
        try:
            _options.check_kronecker(curvature, curvature_kinds.get(curvature), solver,
                                     dict(options), dict(kron))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {spec!r}: {err}") from None
    opts = tuple(options)
    if not at:
        return Method(s, curvature, solver, solver_options=opts, curvature_options=kron)
    sampler_parts = sampler.split("+")
    keyed = [p for p in sampler_parts[1:] if "=" in p]
    sampler = "+".join(p for p in sampler_parts if "=" not in p)
    name, shrinkage = split_sampler(sampler)
    if name not in _samplers.names():
        raise ValueError(f"method {spec!r}: unknown sampler {name!r}; known: "
                         f"{', '.join(_samplers.names())} (append {SHRINK_SUFFIX} for the "
                         "shrinkage fill)")
    sampler_options = _key_values(spec, keyed, "sampler")
    if sampler_options:
        try:
            _samplers.build(name, dict(sampler_options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {spec!r}: {err}") from None
    return Method(s, curvature, solver, name, shrinkage, opts, tuple(sampler_options), kron)


def _key_values(spec: str, parts: list[str], what: str) -> list[tuple[str, Any]]:
    """``key=value`` parts of a method spec as (key, value) pairs."""
    out = []
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"method {spec!r}: {what} option {part!r} is not key=value (write "
                             "e.g. ggn:woodbury+prior=ekfac@logit-importance+proxy=gini-feature)")
        out.append((key, _option_value(value)))
    return out


def _option_value(text: str) -> Any:
    """A solver option's value from a method spec: an int, a float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
