"""Inverse-curvature-vector solvers, registered by name."""

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


__all__ = ["Solver", "accepted_options", "build", "names"]
