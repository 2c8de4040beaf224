"""How a model turns a batch into outputs, per-sample losses and penultimate features.

The default :class:`ClassificationTask` is softmax cross-entropy on logits. For another loss,
subclass it and override :meth:`loss_from_output` (per-sample loss from the model's output) and,
if you know it in closed form, :meth:`output_hessian_vector` (the GGN's Λ·u); the generic
fallback differentiates :meth:`loss_from_output` twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from repif.params import ParameterSpace
from repif.validation import check_labels


class ClassificationTask:
    """Per-sample softmax cross-entropy; features are the input of the last ``nn.Linear``."""

    def loss_from_output(self, output: Tensor, y: Tensor) -> Tensor:
        """(n, C) logits and (n,) labels → (n,) per-sample losses."""
        return F.cross_entropy(output, y, reduction="none")

    def output_hessian_vector(self, output: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Λ_i u_i for each sample: the Hessian of the loss w.r.t. the output, times ``u`` (n, C).

        Cross-entropy: Λ = diag(p) − p pᵀ, so Λu = p ⊙ u − p (pᵀu).
        """
        if type(self).loss_from_output is not ClassificationTask.loss_from_output:
            return self._generic_output_hvp(output, y, u)
        p = torch.softmax(output, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def output_hessian_factor(self, output: Tensor, y: Tensor) -> Tensor:
        """(n, C, C) factors B_i with B_iᵀ B_i = Λ_i, so the GGN is Σ w_i (B_i J_i)ᵀ(B_i J_i).

        Cross-entropy: row c of B is √p_c (e_c − p). Other losses: a symmetric square root of
        Λ_i built from :meth:`output_hessian_vector` (negative eigenvalues clipped to 0).
        """
        if type(self).output_hessian_vector is ClassificationTask.output_hessian_vector and (
            type(self).loss_from_output is ClassificationTask.loss_from_output
        ):
            p = torch.softmax(output, dim=-1)
            eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
            return p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(-2))
        n, c = output.shape
        eye = torch.eye(c, dtype=output.dtype, device=output.device).expand(n, c, c)
        lam = torch.stack(
            [self.output_hessian_vector(output, y, eye[:, :, j]) for j in range(c)], dim=-1
        )
        vals, vecs = torch.linalg.eigh(0.5 * (lam + lam.transpose(-1, -2)))
        return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)

    def _generic_output_hvp(self, output: Tensor, y: Tensor, u: Tensor) -> Tensor:
        def single(o: Tensor, yi: Tensor, ui: Tensor) -> Tensor:
            g = grad(lambda oo: self.loss_from_output(oo[None], yi[None]).sum())
            return jvp(g, (o,), (ui,))[1]

        return vmap(single)(output, y, u)

    def check_targets(self, y: Tensor, output_dim: int) -> None:
        """Raise a clear error for targets the loss cannot take (here: labels ∉ [0, C))."""
        check_labels(y, output_dim)

    def feature_module(self, model: nn.Module) -> nn.Module:
        """The module whose *input* is the penultimate feature: the last ``nn.Linear``."""
        last = None
        for m in model.modules():
            if isinstance(m, nn.Linear):
                last = m
        if last is None:
            raise ValueError(
                "the model has no nn.Linear layer, so the default task cannot find its features; "
                "subclass ClassificationTask and override feature_module"
            )
        return last


class FunctionalModel:
    """A module seen as a pure function of a flat parameter vector (via ``functional_call``).

    Holds the module (in eval mode during influence computations), its trainable-parameter
    space, its buffers and its other (frozen) parameters.
    """

    def __init__(self, model: nn.Module, task: ClassificationTask | None = None) -> None:
        self.model = model
        self.task = task or ClassificationTask()
        self.space = ParameterSpace.of(model)
        trainable = set(self.space.names)
        self.frozen = {
            n: p.detach() for n, p in model.named_parameters() if n not in trainable
        }
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.theta = self.space.get(model)

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    def output(self, theta: Tensor, x: Tensor) -> Tensor:
        """Model output (n, C) at flat parameters ``theta`` (p,) for a batch ``x``."""
        state = {**self.buffers, **self.frozen, **self.space.unflatten(theta)}
        return functional_call(self.model, state, (x,))

    def losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """(n,) per-sample losses at ``theta``."""
        return self.task.loss_from_output(self.output(theta, x), y)

    @torch.no_grad()
    def activation_numel(self, x: Tensor) -> int:
        """Number of elements all leaf modules output for the first point of ``x`` (an estimate
        of one point's activation memory, in elements; at least the output size)."""
        total = [0]

        def count(_module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                total[0] += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            out = self.output(self.theta, x[:1])
        finally:
            for h in handles:
                h.remove()
        return max(total[0], out.numel())

    def sample_loss_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """loss(θ, x_i, y_i) for one unbatched sample, the form ``vmap(grad(·))`` needs."""

        def loss(theta: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            return self.losses(theta, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        return loss

    @torch.no_grad()
    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(n, C) outputs and (n, d) penultimate features at the current parameters."""
        captured: list[Tensor] = []
        module = self.task.feature_module(self.model)
        handle = module.register_forward_hook(
            lambda _m, inputs, _o: captured.append(inputs[0].detach().flatten(1))
        )
        try:
            out = self.output(self.theta, x)
        finally:
            handle.remove()
        return out, captured[0]
