"""How a model turns a batch into outputs, per-sample losses, a query and penultimate features.

A :class:`Task` owns the training objective: the per-sample loss, its ``weight_decay`` (the L2
term (wd/2)‖θ‖² that belongs in the curvature as wd·I), how a batch of any structure is split
into model inputs and targets, and the *query* measured at test points (default: the loss).
The default :class:`ClassificationTask` is softmax cross-entropy on logits. For another loss,
subclass it and override :meth:`Task.loss_from_output` and, if you know it in closed form,
:meth:`Task.output_hessian_vector` (the GGN's Λ·u); the generic fallback differentiates the loss
twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from repif.data import Batch, batch_len
from repif.modules import forward_hooks
from repif.params import ParameterSpace
from repif.validation import check_finite_number, check_labels

#: Key of the targets in a dict batch, as in Hugging Face datasets.
DEFAULT_TARGET_KEY = "labels"


def output_tensor(out: Any) -> Any:
    """The output tensor in what a model returned, as models come: a tensor itself; an object
    with a tensor ``.logits`` attribute (a Hugging Face ``ModelOutput``); a dict with a tensor
    under ``"logits"``; a tuple or list whose first element is a tensor (``return_dict=False``,
    or a model returning ``(logits, extras…)``). Anything else is returned unchanged (and
    refused later with the fix named)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out


class Task:
    """Objective and batch layout; subclass and override what differs from the defaults.

    Defaults: a tuple batch ``(x, y)`` (or ``(x1, …, xk, y)``) calls ``model(x)`` (or
    ``model(x1, …, xk)``) with targets ``y``; a dict batch calls ``model(**rest)`` with targets
    ``batch[target_key]``; anything else is rejected with the fix named.
    """

    def __init__(self, weight_decay: float = 0.0, target_key: str = DEFAULT_TARGET_KEY) -> None:
        check_finite_number(weight_decay, "weight_decay")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.target_key = target_key

    # ------------------------------------------------------------------ regulariser
    def regularizer_gradient(self, theta: Tensor) -> Tensor:
        """∇ of the objective's L2 term (wd/2)‖θ‖² at ``theta``: wd·θ, same shape."""
        return self.weight_decay * theta

    def regularizer_hvp(self, v: Tensor) -> Tensor:
        """The L2 term's Hessian wd·I times ``v`` ((p,) or (k, p) rows alike)."""
        return self.weight_decay * v

    # ------------------------------------------------------------------ batch layout
    def split(self, batch: Batch) -> tuple[Any, Any]:
        """A collated batch → (model inputs, targets); inputs are passed to :meth:`forward`."""
        if isinstance(batch, Mapping):
            if self.target_key not in batch:
                raise ValueError(
                    f"a dict batch needs its targets under {self.target_key!r}; it has keys "
                    f"{sorted(batch)} — pass target_key=… to the task"
                )
            return {k: v for k, v in batch.items() if k != self.target_key}, batch[
                self.target_key
            ]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
            return inputs, batch[-1]
        raise TypeError(
            f"cannot split a batch of type {type(batch).__name__} into inputs and targets; "
            "use (x, y) tuples or dicts with a 'labels' key, or subclass Task and override split"
        )

    def forward(self, call: Callable[..., Any], inputs: Any) -> Tensor:
        """Model output for ``inputs``; ``call`` is the model (called functionally). What the
        model returns goes through :func:`output_tensor`: a tensor, or the logits of a Hugging
        Face ``ModelOutput``, a dict or a tuple (see there)."""
        if isinstance(inputs, Mapping):
            return output_tensor(call(**inputs))
        if isinstance(inputs, tuple):
            return output_tensor(call(*inputs))
        return output_tensor(call(inputs))

    # ------------------------------------------------------------------ objective
    def loss_from_output(self, output: Tensor, targets: Any) -> Tensor:
        """(n, …) model output and targets → (n,) per-sample losses."""
        raise NotImplementedError("subclass Task and implement loss_from_output")

    def query_from_output(self, output: Tensor, targets: Any) -> Tensor:
        """(n,) measurement whose change influence predicts at query points (default: loss)."""
        return self.loss_from_output(output, targets)

    def output_hessian_vector(self, output: Tensor, targets: Any, u: Tensor) -> Tensor:
        """Λ_i u_i per sample: the Hessian of the loss w.r.t. the output, times ``u``.
        Generic: a forward-over-reverse product of :meth:`loss_from_output`."""

        def single(o: Tensor, yi: Any, ui: Tensor) -> Tensor:
            def loss(oo: Tensor) -> Tensor:
                return self.loss_from_output(oo[None], tree_map(lambda t: t[None], yi)).sum()

            return jvp(grad(loss), (o,), (ui,))[1]

        return vmap(single)(output, targets, u)

    def output_hessian_factor(self, output: Tensor, targets: Any) -> Tensor:
        """(n, C, C) factors B_i with B_iᵀ B_i = Λ_i, so the GGN is Σ w_i (B_i J_i)ᵀ(B_i J_i).
        Generic: a symmetric square root of Λ_i (negative eigenvalues clipped to 0)."""
        n, c = output.shape
        eye = torch.eye(c, dtype=output.dtype, device=output.device).expand(n, c, c)
        lam = torch.stack(
            [self.output_hessian_vector(output, targets, eye[:, :, j]) for j in range(c)], dim=-1
        )
        vals, vecs = torch.linalg.eigh(0.5 * (lam + lam.transpose(-1, -2)))
        return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)

    def sampled_output_gradient(self, output: Tensor, targets: Any, uniform: Tensor) -> Tensor:
        """(n, C) random vectors u_i with E[u_i u_iᵀ] = Λ_i, from ``uniform`` (n, C) independent
        U(0, 1) draws: one backward of Σ u_iᵀ f_i then gives a sampled-Fisher (Monte Carlo GGN)
        statistic (K-FAC's ``fisher="sampled"``). Generic: u_i = B_iᵀ ε_i with ε_i ~ N(0, I)."""
        b = self.output_hessian_factor(output, targets)
        eps = math.sqrt(2.0) * torch.erfinv(2.0 * uniform.clamp(1e-12, 1 - 1e-12) - 1.0)
        return (b.transpose(-1, -2) @ eps.unsqueeze(-1)).squeeze(-1)

    def check_targets(self, targets: Any, output_dim: int) -> None:  # noqa: B027 - optional
        """Raise a clear error for targets the loss cannot take (default: accept)."""

    def feature_module(self, model: nn.Module) -> nn.Module:
        """The module whose *input* is the penultimate feature: the last ``nn.Linear``."""
        last = None
        for m in model.modules():
            if isinstance(m, nn.Linear):
                last = m
        if last is None:
            raise ValueError(
                "the model has no nn.Linear layer, so the default task cannot find its features; "
                "subclass the task and override feature_module"
            )
        return last


class ClassificationTask(Task):
    """Per-sample softmax cross-entropy; features are the input of the last ``nn.Linear``."""

    def loss_from_output(self, output: Tensor, y: Tensor) -> Tensor:
        """(n, C) logits and (n,) labels → (n,) per-sample losses."""
        return F.cross_entropy(output, y, reduction="none")

    def _closed_form(self) -> bool:
        """Whether the cross-entropy closed forms apply (the loss was not overridden)."""
        return type(self).loss_from_output is ClassificationTask.loss_from_output

    def output_hessian_vector(self, output: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Cross-entropy: Λ = diag(p) − p pᵀ, so Λu = p ⊙ u − p (pᵀu)."""
        if not self._closed_form():
            return super().output_hessian_vector(output, y, u)
        p = torch.softmax(output, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def output_hessian_factor(self, output: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy: row c of B is √p_c (e_c − p)."""
        if type(self).output_hessian_vector is not ClassificationTask.output_hessian_vector or (
            not self._closed_form()
        ):
            return super().output_hessian_factor(output, y)
        p = torch.softmax(output, dim=-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        return p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(-2))

    def sampled_output_gradient(self, output: Tensor, y: Tensor, uniform: Tensor) -> Tensor:
        """Cross-entropy: p − e_ŷ, the loss gradient at a label ŷ drawn from the model's
        predictive p (by inverse CDF of ``uniform[:, 0]``); E[(p − e_ŷ)(p − e_ŷ)ᵀ] =
        diag(p) − ppᵀ = Λ, the true Fisher."""
        if type(self).output_hessian_factor is not ClassificationTask.output_hessian_factor or (
            type(self).output_hessian_vector is not ClassificationTask.output_hessian_vector
        ) or not self._closed_form():
            return super().sampled_output_gradient(output, y, uniform)
        p = torch.softmax(output, dim=-1)
        cdf = p.cumsum(-1)
        label = torch.searchsorted(cdf, (uniform[:, :1] * cdf[:, -1:]).contiguous())
        label = label.clamp_max(p.shape[-1] - 1).squeeze(-1)
        return p - F.one_hot(label, p.shape[-1]).to(p.dtype)

    def check_targets(self, y: Tensor, output_dim: int) -> None:
        """Labels must be integers in [0, C)."""
        check_labels(y, output_dim)


class FunctionalModel:
    """A module seen as a pure function of a flat parameter vector (via ``functional_call``).

    Holds the module (in eval mode during influence computations), its task, its
    trainable-parameter space, its buffers and its other (frozen) parameters. Inputs are the
    task's model inputs (any structure of tensors with the points along dimension 0).
    """

    def __init__(self, model: nn.Module, task: Task | None = None) -> None:
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

    def at(self, theta: Tensor) -> FunctionalModel:
        """The same model and task with parameters ``theta`` (the caller's module untouched)."""
        other = object.__new__(FunctionalModel)
        other.__dict__.update(self.__dict__)
        other.theta = theta.detach()
        return other

    def output(self, theta: Tensor, inputs: Any) -> Tensor:
        """Model output (n, C) at flat parameters ``theta`` (p,) for model inputs ``inputs``."""
        state = {**self.buffers, **self.frozen, **self.space.unflatten(theta)}

        def call(*args: Any, **kwargs: Any) -> Tensor:
            return functional_call(self.model, state, args, kwargs)

        return self.task.forward(call, inputs)

    def output_dim(self, inputs: Any) -> int:
        """The model's output size C, from one forward on (the first point of) ``inputs``.

        A model that cannot run on these inputs, returns something other than a tensor, or (for
        the default cross-entropy task) gives other than (n, C) logits raises ValueError
        naming the shapes and how batches become model calls.
        """
        first = tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, inputs)
        try:
            with torch.no_grad():
                out = self.output(self.theta, first)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise ValueError(
                f"the model fails on one point of the data, called as {_call(first)}: "
                f"{type(err).__name__}: {err}. A tuple batch (x, y) calls model(x), "
                "(x1, …, xk, y) calls model(x1, …, xk), a dict calls model(**inputs) with the "
                f"targets under {getattr(self.task, 'target_key', 'labels')!r}: pass data of the "
                "shape and layout the model takes, or a repif.Task that overrides split/forward"
            ) from err
        if not isinstance(out, Tensor):
            raise ValueError(
                f"the model returned a {type(out).__name__}, not a tensor of outputs (nor an "
                "object with .logits, a dict with 'logits' or a tuple with the logits first); "
                "wrap it to return the logits, or subclass repif.Task and override forward to "
                "pick them"
            )
        plain_ce = isinstance(self.task, ClassificationTask) and self.task._closed_form()
        if out.ndim < 2 or (plain_ce and out.ndim != 2):
            raise ValueError(
                f"the model's output for one point has shape {tuple(out.shape)}, but "
                f"{type(self.task).__name__} needs (n, C) logits, one row per point: flatten or "
                "squeeze the extra dimensions in the model (e.g. end it with nn.Flatten()), or "
                "subclass repif.Task for outputs of another shape"
            )
        return int(out.shape[-1])

    def losses(self, theta: Tensor, inputs: Any, targets: Any) -> Tensor:
        """(n,) per-sample losses at ``theta``."""
        output = self.output(theta, inputs)
        return _per_point(self.task.loss_from_output(output, targets), output, "loss_from_output")

    def queries(self, theta: Tensor, inputs: Any, targets: Any) -> Tensor:
        """(n,) per-sample query measurements at ``theta`` (default: the losses)."""
        output = self.output(theta, inputs)
        return _per_point(self.task.query_from_output(output, targets), output,
                          "query_from_output")

    @torch.no_grad()
    def check_task(self, inputs: Any, targets: Any) -> None:
        """Run the task's loss and query on a few points (``inputs``, ``targets``) and raise a
        ValueError naming the fix if they fail, are not one value per point (a batch mean, the
        commonest slip, would make every removal step the wrong length), or are not finite."""
        output = self.output(self.theta, inputs)
        for what in ("loss_from_output", "query_from_output"):
            try:
                values = getattr(self.task, what)(output, targets)
            except (RuntimeError, TypeError, IndexError, ValueError) as err:
                raise ValueError(
                    f"{type(self.task).__name__}.{what} fails on the first training points "
                    f"(targets {_describe(targets)}): {type(err).__name__}: {err}. Return one "
                    "loss per point from the model output and targets of a batch; check the "
                    "targets' dtype (class labels are integers, regression targets floats)"
                ) from err
            values = _per_point(values, output, what)
            bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
            if bad:
                raise ValueError(
                    f"{type(self.task).__name__}.{what} is not finite (NaN or inf) for the "
                    f"first training point(s) {bad}: check the data and the model's parameters "
                    "(a model whose loss is not finite at its own training points has no "
                    "influence to measure)"
                )

    @torch.no_grad()
    def activation_numel(self, inputs: Any) -> int:
        """Number of elements all leaf modules output for one point (the first of ``inputs``):
        an estimate of one point's activation memory, in elements; at least the output size."""
        total = [0]

        def count(_module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                total[0] += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        with forward_hooks(leaves, count):
            first = tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, inputs)
            out = self.output(self.theta, first)
        return max(total[0], out.numel())

    def sample_fn(self, measure: str = "loss") -> Callable[[Tensor, Any, Any], Tensor]:
        """f(θ, inputs_i, targets_i) for one unbatched sample (the form ``vmap(grad(·))``
        needs): its loss, or its query measurement when ``measure="query"``."""
        batched = self.queries if measure == "query" else self.losses

        def single(theta: Tensor, xi: Any, yi: Any) -> Tensor:
            add = tree_map(lambda t: t.unsqueeze(0), (xi, yi))
            return batched(theta, *add).squeeze(0)

        return single

    @torch.no_grad()
    def logits_and_features(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """(n, C) outputs and (n, d) penultimate features at the current parameters."""
        captured: list[Tensor] = []
        module = self.task.feature_module(self.model)
        with forward_hooks([module], lambda _m, ins, _o: captured.append(
                ins[0].detach().flatten(1))):
            out = self.output(self.theta, inputs)
        return out, captured[0]


#: Phrases of torch.func's error for a model whose forward branches on the values of its inputs
#: (e.g. Hugging Face's attention masks: ``if padding_mask.all()``), which ``vmap`` cannot batch.
_DATA_DEPENDENT = ("data-dependent control flow", "calling .item()")


def vmap_points(fn: Callable[..., Tensor], in_dims: tuple[Any, ...]) -> Callable[..., Tensor]:
    """``vmap(fn, in_dims)`` over points, falling back to a loop over the points (same result,
    one point per call) when the model's forward branches on its inputs' values, which
    ``vmap`` refuses. The first argument with ``in_dims`` 0 sets the number of points."""
    batched = vmap(fn, in_dims=in_dims)
    state = {"loop": False}

    def loop(*args: Any) -> Tensor:
        n = next(batch_len(a) for a, d in zip(args, in_dims, strict=True) if d == 0)
        outs = []
        for i in range(n):
            one = [tree_map(lambda t, i=i: t[i] if isinstance(t, Tensor) else t, a) if d == 0
                   else a for a, d in zip(args, in_dims, strict=True)]
            outs.append(fn(*one))
        return torch.stack(outs)

    def run(*args: Any) -> Tensor:
        if not state["loop"]:
            try:
                return batched(*args)
            except RuntimeError as err:
                if not any(p in str(err) for p in _DATA_DEPENDENT):
                    raise
                state["loop"] = True
        return loop(*args)

    return run


def _per_point(values: Any, output: Tensor, what: str) -> Tensor:
    """``values`` if it holds one floating-point value per row of ``output``, else ValueError."""
    n = output.shape[0] if output.ndim else 1
    if not isinstance(values, Tensor) or values.shape != (n,) or not values.is_floating_point():
        got = (f"shape {tuple(values.shape)} ({values.dtype})" if isinstance(values, Tensor)
               else type(values).__name__)
        raise ValueError(
            f"the task's {what} must return one floating-point value per point, shape ({n},), "
            f"for a batch of {n}; got {got}. A loss averaged or summed over the batch (e.g. "
            "F.cross_entropy(output, y) with its default reduction='mean') makes every removal "
            "step the wrong length: pass reduction='none'"
        )
    return values


def _describe(t: Any) -> str:
    """A short description of a tensor tree (dtype and shape of each tensor leaf)."""
    leaves = [x for x in tree_flatten(t)[0] if isinstance(x, Tensor)]
    return ", ".join(f"{x.dtype} {tuple(x.shape)}" for x in leaves) or type(t).__name__


def _call(inputs: Any) -> str:
    """``model(x: (1, 5) float64)``-style description of a call on ``inputs``."""

    def arg(t: Any) -> str:
        if isinstance(t, Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        return type(t).__name__

    if isinstance(inputs, Mapping):
        return "model(" + ", ".join(f"{k}={arg(v)}" for k, v in inputs.items()) + ")"
    if isinstance(inputs, tuple):
        return "model(" + ", ".join(arg(v) for v in inputs) + ")"
    return f"model({arg(inputs)})"
