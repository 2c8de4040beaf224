"""Per-sample gradients from one ordinary batched backward, layer by layer.

Hooks capture each layer's input activations a and output gradients g during one batched
forward+backward of the summed per-sample losses; a sample's parameter gradient is then given by
the layer's rule (:mod:`repif.layers`; docs/design.md, "Scale"): a closed form in (a_i, g_i)
for ``nn.Linear``, ``nn.Conv2d``, BatchNorm (eval), ``nn.LayerNorm``, ``nn.Embedding`` and
Hugging Face's ``Conv1D``, and for any other module the generic rule, which reruns that module
alone per point under ``vmap`` with its captured output gradient.

This costs about one backward pass plus one extra product per layer, where ``vmap(grad)`` of the
whole model costs several times the pass on convolutions. Gradients are produced one layer at a
time, so scores against a query block never need the full p-vector of a point; rules that can
(``nn.Linear``; ``nn.Conv2d`` for few queries) contract scores from (a, g) without forming
per-sample gradients at all. Models with a parameter shared by two modules, a layer called
twice per forward, or train-mode BatchNorm are not eligible; :func:`layer_engine` then returns
None and the ``torch.func`` path is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from repif.data import batch_len
from repif.gradients.streaming import per_sample_gradients, split_batch
from repif.layers import GENERIC, GenericRule, LayerBlock, LayerRule, is_conv1d, rule_for
from repif.layers.conv import (  # noqa: F401  (names kept importable from here)
    CONV_GRADIENT_ROUTES,
    CONV_SCORE_ROUTES,
    MATERIALISE_ELEMENT_MACS,
    SLICES_MIN_POSITIONS,
    conv_gradient_route,
    conv_route,
)
from repif.modules import forward_hooks
from repif.task import FunctionalModel
from repif.validation import check_choice

__all__ = ["LayerBlock", "LayerGradientEngine", "choose_engine", "is_conv1d", "layer_engine",
           "unsupported_layers"]

#: Agreement with the torch.func engine required on the self-check, per dtype: round-off of a
#: different summation order, far below any real disagreement (a wrong formula is O(1) off).
SELF_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


class LayerGradientEngine:
    """Per-sample gradients of a :class:`FunctionalModel` at its parameters, by hooks."""

    def __init__(
        self, fm: FunctionalModel, blocks: list[LayerBlock], conv_scores: str = "auto"
    ) -> None:
        self.fm = fm
        self.blocks = blocks
        self.workspace_numel = 0  # one point's largest per-layer temporary, set by the probe
        self.conv_scores = conv_scores

    @property
    def conv_scores(self) -> str:
        """How :meth:`scores` treats ``nn.Conv2d`` blocks: "auto" (per layer, from
        :func:`~repif.layers.conv.conv_route`), or "contract" / "materialise" for all."""
        return self._conv_scores

    @conv_scores.setter
    def conv_scores(self, route: str) -> None:
        check_choice(route, CONV_SCORE_ROUTES, "conv_scores")
        self._conv_scores = route

    def row_bytes(self, materialise: bool) -> int:
        """Bytes one point adds beyond its backward pass: the largest layer's temporaries
        (unfolded patches, its gradient block, its einsum output) and, when the full gradient
        is materialised, the p-vector."""
        extra = self.workspace_numel + 2 * self.largest_block
        if materialise:
            extra += self.fm.space.size
        return extra * self.fm.theta.element_size()

    @property
    def largest_block(self) -> int:
        return max(b.numel for b in self.blocks)

    def forward(self, run: Callable[[Tensor], Tensor], n: int
                ) -> tuple[Tensor, dict[nn.Module, Any], dict[nn.Module, Any]]:
        """``run(theta)`` (a forward of ``n`` points at the engine's parameters, requiring
        grad) with every block's module hooked: its result, and per module the captured input
        and the output(s) to take gradients at, as the module's rule keeps them."""
        acts: dict[nn.Module, Any] = {}
        outs: dict[nn.Module, Tensor | tuple[Tensor, ...]] = {}
        rules = {b.module: b.rule for b in self.blocks}

        def fwd(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            acts[module], outs[module], passed = rules[module].capture(module, args, kwargs,
                                                                       out, n)
            return passed

        with forward_hooks([b.module for b in self.blocks], fwd, with_kwargs=True):
            value = run(self.fm.theta.detach().requires_grad_(True))
        return value, acts, outs

    @staticmethod
    def backward(value: Tensor, outs: dict[nn.Module, Any], grad_outputs: Tensor | None = None,
                 retain_graph: bool = False) -> dict[nn.Module, Any]:
        """Per module, the gradient(s) of ``value`` (weighted by ``grad_outputs``) at its
        captured output(s); zeros where the value does not depend on one."""
        flat = [(m, o) for m, os in outs.items() for o in (os if isinstance(os, tuple)
                                                            else (os,))]
        grads = torch.autograd.grad(value, [o for _, o in flat], grad_outputs=grad_outputs,
                                    retain_graph=retain_graph, allow_unused=True)
        per: dict[nn.Module, list[Tensor]] = {m: [] for m in outs}
        for (m, o), g in zip(flat, grads, strict=True):
            per[m].append(g if g is not None else torch.zeros_like(o))
        return {m: tuple(per[m]) if isinstance(outs[m], tuple) else per[m][0] for m in outs}

    def _capture(self, inputs: Any, targets: Any, measure: str) -> dict[nn.Module, tuple]:
        """One forward and one backward to the hooked layers' outputs only (no parameter
        gradients are formed): (captured input, output gradient(s)) per hooked module."""
        fm = self.fm
        values = fm.queries if measure == "query" else fm.losses
        total, acts, outs = self.forward(lambda theta: values(theta, inputs, targets).sum(),
                                         batch_len(targets))
        grads = self.backward(total, outs)
        return {m: (acts[m], grads[m]) for m in outs}

    def _state(self, block: LayerBlock) -> dict[str, Tensor] | None:
        """The parameters and buffers of ``block``'s module at the engine's point, by names
        relative to the module (for rules that rerun it), else None."""
        if not isinstance(block.rule, GenericRule):
            return None
        fm, prefix = self.fm, (block.path + "." if block.path else "")
        every = {**fm.buffers, **fm.frozen, **fm.space.unflatten(fm.theta.detach())}
        return {k[len(prefix):]: v for k, v in every.items() if k.startswith(prefix)}

    def _named(self, block: LayerBlock, a: Any, g: Any) -> dict[str, Tensor]:
        return block.rule.per_sample(block, a, g, self._state(block))

    def layer_gradients(
        self, inputs: Any, targets: Any, measure: str = "loss"
    ) -> Iterator[tuple[int, Tensor]]:
        """(flat offset, (b, numel) per-sample gradients) for each trainable parameter, one
        layer at a time, in parameter order; nothing is copied into a p-wide row."""
        captured = self._capture(inputs, targets, measure)
        b = batch_len(targets)
        for block in self.blocks:
            a, g = captured.pop(block.module)
            named = self._named(block, a, g)
            for name, off in zip(block.names, block.offsets, strict=True):
                yield off, named.pop(name).reshape(b, -1)

    def gradients(self, inputs: Any, targets: Any, measure: str = "loss") -> Tensor:
        """(b, p) per-sample gradients, in the flat parameter order."""
        out: Tensor | None = None
        for off, g in self.layer_gradients(inputs, targets, measure):
            if out is None:
                out = torch.empty(g.shape[0], self.fm.space.size, dtype=g.dtype,
                                  device=g.device)
            out[:, off : off + g.shape[1]] = g
        assert out is not None
        return out

    def scores(self, factors: Tensor, inputs: Any, targets: Any) -> Tensor:
        """(k, b) = factors (k, p) · per-sample gradients (b, p)ᵀ, one layer at a time.

        A layer whose rule contracts scores from (a, g) (``nn.Linear``: Σ_t g_tᵀ V a_t, one
        matrix product of the inputs with all k query matrices; ``nn.Conv2d`` where its cost
        model finds that cheaper, i.e. few queries) forms no per-sample gradient; every other
        layer forms its per-parameter gradients and takes a product with the factors.
        """
        captured = self._capture(inputs, targets, "loss")
        b = batch_len(targets)
        out: Tensor | None = None
        for block in self.blocks:
            a, g = captured.pop(block.module)
            part = block.rule.scores(block, factors, a, g, self.workspace_numel,
                                     self.conv_scores)
            if part is None:
                named = self._named(block, a, g)
                part = sum(
                    factors[:, off : off + size] @ named.pop(name).reshape(b, -1).T
                    for name, off, size in zip(block.names, block.offsets, block.numels,
                                               strict=True)
                )
            out = part if out is None else out.add_(part)
        assert out is not None
        return out


def _offsets(fm: FunctionalModel) -> dict[str, tuple[int, int]]:
    offsets, off = {}, 0
    for name, numel in zip(fm.space.names, fm.space.numels, strict=True):
        offsets[name] = (off, numel)
        off += numel
    return offsets


def _call_counts(fm: FunctionalModel, inputs: Any) -> dict[nn.Module, int]:
    """How often each module is called in one no-grad forward on ``inputs``."""
    calls: dict[nn.Module, int] = {}
    with forward_hooks(fm.model.modules(),
                       lambda m, _i, _o: calls.__setitem__(m, calls.get(m, 0) + 1)), \
            torch.no_grad():
        fm.output(fm.theta, inputs)
    return calls


def plan_blocks(fm: FunctionalModel, probe_inputs: Any) -> list[LayerBlock] | None:
    """Trainable parameters grouped by the module whose rule gives their per-sample gradients,
    in parameter order; None when the hook engine cannot take the model (a parameter shared by
    two modules, a module called more than once per forward, a rule that is not eligible, e.g.
    BatchNorm in training mode).

    A module with its own rule takes its parameters; any other module takes its own through the
    generic rule; a module never called (its parameters used by its parent, as
    ``nn.MultiheadAttention`` uses ``out_proj``) is absorbed into its nearest called ancestor's
    generic block. A generic block on the model itself (a bare parameter at its top) would rerun
    the whole model per point, which is the ``torch.func`` path plus the hooks: None.
    """
    offsets = _offsets(fm)
    calls = _call_counts(fm, probe_inputs)
    modules = dict(fm.model.named_modules())
    owners: dict[int, int] = {}
    for m in modules.values():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen: dict[str, tuple[LayerRule, list[str]]] = {}  # host path → (rule, names in it)
    for path, m in modules.items():
        own = [n for n, _ in m.named_parameters(recurse=False)
               if (f"{path}.{n}" if path else n) in offsets]
        if not own:
            continue
        if any(owners[id(getattr(m, n))] > 1 for n in own):
            return None
        host = path
        while calls.get(modules[host], 0) == 0:  # used, not called: the caller's parameters
            if not host:
                return None
            host = host.rpartition(".")[0]
        if calls[modules[host]] > 1:
            return None
        if host == path:
            rule = rule_for(m)
            if rule is not None and not rule.eligible(m):
                return None
            if rule is None or not set(own) <= set(rule.parameters(m)):
                rule = GENERIC
            names = own
        else:
            rule = rule_for(modules[host])
            rule = rule if isinstance(rule, GenericRule) else GENERIC
            names = [f"{path[len(host) + 1 if host else 0:]}.{n}" for n in own]
        if host in chosen:  # the host's block absorbs a child: one rerun-the-module block
            old_rule, old_names = chosen[host]
            rule = old_rule if isinstance(old_rule, GenericRule) else GENERIC
            names = old_names + names
        chosen[host] = (rule, names)
    root = chosen.get("")
    if root is not None and isinstance(root[0], GenericRule):
        return None  # the whole model rerun per point is torch.func's path, without the hooks
    params = dict(fm.model.named_parameters())
    blocks = []
    for path, (rule, rel) in chosen.items():
        full = [f"{path}.{n}" if path else n for n in rel]
        blocks.append(LayerBlock(
            modules[path], tuple(rel), tuple(offsets[f][0] for f in full),
            tuple(offsets[f][1] for f in full), rule, path,
            tuple(tuple(params[f].shape) for f in full)))
    return sorted(blocks, key=lambda b: b.offsets[0])


def unsupported_layers(fm: FunctionalModel) -> list[str]:
    """``"name (Type)"`` of every module owning trainable parameters whose rule refuses it as
    configured (e.g. BatchNorm in training mode); those make the model fall back to
    ``torch.func``."""
    trainable = set(fm.space.names)
    out = []
    for mod_name, m in fm.model.named_modules():
        own = [f"{mod_name}.{n}" if mod_name else n for n, _ in m.named_parameters(recurse=False)]
        rule = rule_for(m)
        if any(f in trainable for f in own) and rule is not None and not rule.eligible(m):
            out.append(f"{mod_name or '(model)'} ({type(m).__name__})")
    return out


def generic_layers(engine: LayerGradientEngine) -> list[str]:
    """``"name (Type)"`` of the modules the engine handles with the generic rule (rerun per
    point; slower than a closed form)."""
    return [f"{b.path or '(model)'} ({type(b.module).__name__})" for b in engine.blocks
            if isinstance(b.rule, GenericRule)]


def layer_engine(fm: FunctionalModel, probe_inputs: Any, probe_targets: Any) -> (
    LayerGradientEngine | None
):
    """The hook engine for ``fm`` if every trainable parameter has a block
    (:func:`plan_blocks`) and a self-check on the probe points agrees with ``torch.func``;
    else None."""
    try:
        blocks = plan_blocks(fm, probe_inputs)
    except (RuntimeError, TypeError, ValueError):
        return None
    if not blocks:
        return None
    engine = LayerGradientEngine(fm, blocks)
    try:
        engine.workspace_numel = _workspace_numel(fm, blocks, probe_inputs)
        mine = engine.gradients(probe_inputs, probe_targets)
    except (RuntimeError, TypeError, KeyError, ValueError, IndexError):
        return None
    ref = per_sample_gradients(fm, probe_inputs, probe_targets)
    tol = SELF_CHECK_TOL.get(fm.dtype, 1e-4)
    if float((mine - ref).norm()) > tol * max(float(ref.norm()), 1e-30):
        return None
    return engine


def _workspace_numel(fm: FunctionalModel, blocks: list[LayerBlock], inputs: Any) -> int:
    """One point's largest per-layer temporary (a convolution's unfolded patches, or a layer's
    input), in elements, measured by a no-grad forward on the first point of ``inputs``."""
    sizes: list[int] = []
    rules = {b.module: b.rule for b in blocks}

    def measure(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        a, _, _ = rules[m].capture(m, args, kwargs, out, 1)
        sizes.append(rules[m].workspace(m, a))

    first = tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, inputs)
    with forward_hooks([b.module for b in blocks], measure, with_kwargs=True), torch.no_grad():
        fm.output(fm.theta, first)
    return max(sizes) if sizes else 0


#: Per-sample gradient engines: "auto" (hooks where eligible, else torch.func), "hooks", "func".
PER_SAMPLE_ENGINES = ("auto", "hooks", "func")

#: Training points the hook engine is checked on against torch.func before it is used.
PROBE_POINTS = 2


def choose_engine(fm: FunctionalModel, source: Any, per_sample: str
                  ) -> LayerGradientEngine | None:
    """The hook-based per-sample engine for ``fm`` ("hooks", or "auto" where the model is
    eligible and agrees with torch.func on a probe of ``source``'s first training points), else
    None (torch.func); "hooks" on a model the engine cannot take is a ValueError naming why."""
    check_choice(per_sample, PER_SAMPLE_ENGINES, "per_sample")
    if per_sample == "func":
        return None
    probe = source.gather(torch.arange(min(PROBE_POINTS, len(source))))
    engine = layer_engine(fm, *split_batch(fm, probe))
    if engine is None and per_sample == "hooks":
        missing = unsupported_layers(fm)
        raise ValueError(
            "per_sample='hooks' needs every module that owns trainable parameters called once "
            "per forward, no parameter shared by two modules, and BatchNorm in eval mode"
            + (f"; refused as configured: {', '.join(missing[:10])}" if missing else
               " (a layer is called twice, a parameter is shared, or the self-check against "
               "torch.func disagreed)")
            + "; use per_sample='auto' or 'func'"
        )
    return engine
