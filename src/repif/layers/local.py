"""The generic rule: per-sample gradients of any module's own parameters from its captured call.

A module no specific rule takes (a custom layer, the ``cls_token`` and position embeddings of a
Hugging Face ViT, ``nn.MultiheadAttention``, a convolution with reflect padding) is rerun on each
point of the batch on its own, under ``torch.func.vmap(grad(...))``, with the output gradient the
batched backward captured: for point i, ∇_θ ⟨f(θ; args_i), g_i⟩ with f the module, θ its own
parameters and g_i the gradient of the summed losses at its output. Only the module is rerun, not
the model, so this costs about one forward+backward of that module per point: cheaper than the
whole model under ``vmap``, dearer than a closed form.

The captured call: tensors whose first dimension is the batch size are split by point (the
module sees each point with a batch dimension of 1); every other argument is passed whole. A
module whose parameters are used by its parent without calling it (``nn.MultiheadAttention``'s
``out_proj``) is absorbed into the parent's block. The per-sample engine checks the result
against ``torch.func`` on probe points before it is used.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from repif.layers.base import LayerBlock, LayerRule


def _tensors(out: Any) -> tuple[Tensor | None, ...]:
    """The output's tensors (a tensor, or a tuple/list of tensors and Nones)."""
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, Tensor) for o in out):
        return tuple(out)
    raise TypeError(f"the generic layer rule takes a module returning a tensor or a tuple of "
                    f"tensors, not {type(out).__name__}")


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class GenericRule(LayerRule):
    """Any module, by rerunning it per point (module doc). Not registered: it is what the engine
    uses when no registered rule matches."""

    def parameters(self, m: nn.Module) -> tuple[str, ...]:
        return tuple(n for n, _ in m.named_parameters(recurse=False))

    # --------------------------------------------------------------- batch dimensions
    def input_dims(self, m: nn.Module, args: tuple, kwargs: dict, n: int
                   ) -> tuple[tuple, dict]:
        """Per argument, the dimension along which it holds the ``n`` points (None: shared)."""
        def dim(x: Any) -> int | None:
            return 0 if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n else None
        return tuple(dim(x) for x in args), {k: dim(v) for k, v in kwargs.items()}

    def output_dims(self, m: nn.Module, outs: tuple[Tensor | None, ...], n: int
                    ) -> tuple[int | None, ...]:
        """Per output tensor, its batch dimension; an output without one is refused."""
        dims = []
        for o in outs:
            if o is not None and (o.ndim == 0 or o.shape[0] != n):
                raise TypeError(f"{type(m).__name__}: an output of shape {tuple(o.shape)} has "
                                f"no batch dimension of size {n}")
            dims.append(None if o is None else 0)
        return tuple(dims)

    # --------------------------------------------------------------- capture and gradients
    def capture(self, m: nn.Module, args: tuple, kwargs: dict, out: Any, n: int
                ) -> tuple[Any, tuple[Tensor, ...], Any]:
        outs = _tensors(out)
        args, kwargs = tuple(_detach(x) for x in args), {k: _detach(v) for k, v in kwargs.items()}
        in_dims = self.input_dims(m, args, kwargs, n)
        out_dims = self.output_dims(m, outs, n)
        copies = tuple(None if o is None else o.clone() for o in outs)
        passed = copies[0] if isinstance(out, Tensor) else type(out)(copies)
        kept = tuple(o for o in outs if o is not None)
        return (args, kwargs, in_dims, out_dims), kept, passed

    def per_sample(self, block: LayerBlock, a: Any, g: Any, state: dict[str, Tensor] | None
                   ) -> dict[str, Tensor]:
        """vmap over points of ∇_θ ⟨module(θ; args_i), g_i⟩ (module doc); ``g`` holds one
        gradient per kept output tensor, ``state`` the module's parameters and buffers."""
        assert state is not None, "the generic rule needs the module's parameters"
        m = block.module
        args, kwargs, (arg_dims, kwarg_dims), out_dims = a
        params = {n: state[n] for n in block.names}
        rest = {k: v for k, v in state.items() if k not in params}
        kept = [d for d in out_dims if d is not None]

        def one(p: dict, args_i: tuple, kwargs_i: dict, g_i: tuple) -> Tensor:
            args_i = tuple(x if d is None else x.unsqueeze(d)
                           for x, d in zip(args_i, arg_dims, strict=True))
            kwargs_i = {k: v if kwarg_dims[k] is None else v.unsqueeze(kwarg_dims[k])
                        for k, v in kwargs_i.items()}
            outs = [o for o in _tensors(functional_call(m, {**rest, **p}, args_i, kwargs_i))
                    if o is not None]
            return sum((o * gi.unsqueeze(d)).sum() for o, gi, d in zip(outs, g_i, kept,
                                                                       strict=True))

        grads = vmap(grad(one), in_dims=(None, arg_dims, kwarg_dims, tuple(kept)))(
            params, args, kwargs, tuple(g))
        return dict(grads)

    def workspace(self, m: nn.Module, a: Any) -> int:
        args, kwargs = a[0], a[1]
        return sum(int(x.numel()) for x in (*args, *kwargs.values()) if isinstance(x, Tensor))


GENERIC = GenericRule()


class MultiheadAttentionRule(GenericRule):
    """``nn.MultiheadAttention``: the generic rule with its batch layout — query, key and value
    hold the points along dimension 1 unless ``batch_first``, ``key_padding_mask`` along 0, a
    2-D ``attn_mask`` is shared; its ``out_proj`` (used, not called) is absorbed. A per-head
    3-D ``attn_mask`` mixes points and heads in one dimension and is refused (the engine then
    uses torch.func)."""

    name = "multihead-attention"
    types = (nn.MultiheadAttention,)

    def capture(self, m: nn.Module, args: tuple, kwargs: dict, out: Any, n: int
                ) -> tuple[Any, tuple[Tensor, ...], Any]:
        bound = inspect.signature(m.forward).bind(*args, **kwargs)
        return super().capture(m, (), dict(bound.arguments), out, n)

    def input_dims(self, m: nn.Module, args: tuple, kwargs: dict, n: int
                   ) -> tuple[tuple, dict]:
        seq = 0 if m.batch_first else 1
        dims: dict[str, int | None] = {}
        for k, v in kwargs.items():
            if not isinstance(v, Tensor):
                dims[k] = None
            elif k in ("query", "key", "value"):
                if v.ndim != 3:
                    raise TypeError("nn.MultiheadAttention called on unbatched inputs")
                dims[k] = seq
            elif k == "key_padding_mask":
                dims[k] = 0
            elif k == "attn_mask" and v.ndim == 2:
                dims[k] = None
            else:
                raise TypeError(f"nn.MultiheadAttention's {k} of shape {tuple(v.shape)} is not "
                                "split by point by this rule")
        return (), dims

    def output_dims(self, m: nn.Module, outs: tuple[Tensor | None, ...], n: int
                    ) -> tuple[int | None, ...]:
        seq = 0 if m.batch_first else 1
        return tuple(None if o is None else (seq if i == 0 else 0) for i, o in enumerate(outs))
