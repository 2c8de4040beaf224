"""Inverse-curvature-vector solvers, registered by name."""

from collections.abc import Callable

from repif.solvers import (  # noqa: F401  (registration)
    arnoldi,
    cg,
    direct,
    eigen,
    identity,
    lissa,
    woodbury,
)
from repif.solvers.base import REGISTRY, Solver, accepted_options, build


def names() -> list[str]:
    """Registered solver names."""
    return REGISTRY.names()


def _as_argument(name: str, value: str) -> str:
    return f"{name}={value!r}"


def check_curvature(curvature: str, solver: str,
                    spell: Callable[[str, str], str] = _as_argument) -> None:
    """ValueError unless ``solver`` can invert ``curvature`` (both registered names), naming
    what to pass instead; ``spell(name, value)`` writes an option as the caller's user types it
    (default ``curvature='ggn'``; the command line's ``--curvature ggn``)."""
    from repif.curvature import kinds as curvature_kinds

    kronecker = curvature_kinds.get(curvature).kronecker
    takes = REGISTRY.get(solver).curvatures
    api = spell is _as_argument
    if kronecker and (takes is None or curvature not in takes):
        raise ValueError(
            f"{spell('curvature', curvature)} is inverted in its eigenbasis, not by "
            f"{spell('solver', solver)}: use {spell('solver', 'eigen')}"
            + ("; for the exact subset GGN with the Kronecker factors as a preconditioner use "
               "curvature='ggn', solver='cg' (or 'lissa') and preconditioner='ekfac'" if api
               else "")
        )
    if takes is not None and curvature not in takes:
        wanted = " or ".join(spell("curvature", k) for k in takes)
        preconditioned = " with preconditioner='ekfac'" if solver == "eigen" and api else ""
        raise ValueError(f"{spell('solver', solver)} inverts only {wanted}, not "
                         f"{spell('curvature', curvature)}: use {wanted}, or another solver for "
                         f"{spell('curvature', curvature)} (e.g. {spell('solver', 'cg')}"
                         f"{preconditioned})")


__all__ = ["Solver", "accepted_options", "build", "check_curvature", "names"]
