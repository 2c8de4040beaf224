"""Curvature-subset samplers, registered by name."""

from repif.samplers import baselines, features, logits  # noqa: F401  (registration)
from repif.samplers.base import REGISTRY, Pool, Sampler, Subset, build


def names() -> list[str]:
    """Registered sampler names."""
    return REGISTRY.names()


__all__ = ["Pool", "Sampler", "Subset", "build", "names"]
