"""Inverse-curvature-vector solvers, registered by name."""

from repif.solvers import arnoldi, cg, direct, identity, lissa, woodbury  # noqa: F401  (registration)
from repif.solvers.base import REGISTRY, Solver, accepted_options, build


def names() -> list[str]:
    """Registered solver names."""
    return REGISTRY.names()


__all__ = ["Solver", "accepted_options", "build", "names"]
