"""Flat-vector ⇄ named-parameter helpers for a module's trainable parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParameterSpace:
    """The trainable parameters of a module, in ``named_parameters`` order.

    A flat vector has length ``size`` = Σ numel and concatenates the parameters in that order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterSpace:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        for n, p in named:
            if p.dtype in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"trainable parameter {n!r} is {p.dtype}; repif needs float32 or float64 "
                    "(half precision cannot resolve small curvature terms, and torch's "
                    "factorisations refuse it): pass model.float() or model.double()"
                )
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, named: dict[str, Tensor]) -> Tensor:
        """Concatenate ``named[name]`` (any leading batch dims kept) into (..., size)."""
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = named[name]
            lead = t.shape[: t.ndim - len(shape)]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a (size,) vector into named tensors of the parameters' shapes (views)."""
        chunks = torch.split(flat, self.numels, dim=-1)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def get(self, model: nn.Module) -> Tensor:
        """The module's current trainable parameters as one detached flat vector."""
        named = dict(model.named_parameters())
        return self.flatten({n: named[n].detach() for n in self.names})

    def set(self, model: nn.Module, flat: Tensor) -> None:
        """Copy a flat vector into the module's parameters in place."""
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in self.unflatten(flat).items():
                named[n].copy_(t)
