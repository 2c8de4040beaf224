"""The per-layer rule registry: the generic rule (a module rerun per point) on layers with no
closed form — bare parameters, nn.MultiheadAttention in both batch layouts, a transformer
encoder, a reflect-padded convolution, a Hugging Face ViT — against torch.func's vmap(grad) of
the whole model (a second implementation), and a user's own rule taking precedence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repif
from repif.gradients.hooks import generic_layers, layer_engine
from repif.gradients.streaming import per_sample_gradients
from repif.layers import LinearRule, MultiheadAttentionRule, names, register, rules
from repif.task import FunctionalModel

#: Same sums in another order (float64): round-off only.
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check(model: nn.Module, x, y, generic: list[str]) -> None:
    fm = FunctionalModel(model)
    engine = layer_engine(fm, *((x[:2], y[:2]) if isinstance(x, torch.Tensor) else (x, y)))
    assert engine is not None
    assert generic_layers(engine) == generic
    ref = per_sample_gradients(fm, x, y)
    assert _rel(engine.gradients(x, y), ref) <= TOL
    factors = torch.randn(3, fm.space.size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    assert _rel(engine.scores(factors, x, y), factors @ ref.T) <= TOL


class FreeParameter(nn.Module):
    """A bare nn.Parameter outside any layer with a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * self.scale)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = FreeParameter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_bare_parameters_take_the_generic_rule():
    torch.manual_seed(0)
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    _check(Wrapped().double().eval(), x, y, ["inner (FreeParameter)"])


def test_a_bare_parameter_at_the_top_leaves_the_model_to_torch_func():
    """Rerunning the whole model per point is torch.func's own path: no hooks then."""
    torch.manual_seed(0)
    model = FreeParameter().double().eval()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert layer_engine(FunctionalModel(model), x[:2], y[:2]) is None
    est = repif.InfluenceEstimator(model, (x, y), damping=0.1)
    assert est.cost.engine is None


class Attention(nn.Module):
    """Token embeddings → self-attention (with a padding mask) → mean → head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(13, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        pad = ids == 0
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.attn(h, h, h, key_padding_mask=pad)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_both_layouts(batch_first):
    torch.manual_seed(0)
    ids = torch.randint(1, 13, (6, 5))
    ids[0, -2:] = 0  # padded tokens, masked
    y = torch.randint(0, 3, (6,))
    model = Attention(batch_first).double().eval()
    _check(model, ids, y, ["attn (MultiheadAttention)"])
    engine = layer_engine(FunctionalModel(model), ids[:2], y[:2])
    block = next(b for b in engine.blocks if b.path == "attn")
    assert isinstance(block.rule, MultiheadAttentionRule)
    assert set(block.names) == {"in_proj_weight", "in_proj_bias", "out_proj.weight",
                                "out_proj.bias"}


def test_transformer_encoder_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                         batch_first=True), 2,
                              enable_nested_tensor=False),
        nn.Flatten(), nn.Linear(4 * 8, 3)).double().eval()
    x, y = torch.randn(5, 4, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    _check(model, x, y, ["0.layers.0.self_attn (MultiheadAttention)",
                         "0.layers.1.self_attn (MultiheadAttention)"])


def test_reflect_padded_convolution_takes_the_generic_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).double().eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    _check(model, x, y, ["0 (Conv2d)"])


def test_estimator_uses_hooks_on_attention_and_agrees_with_func():
    torch.manual_seed(0)
    ids, y = torch.randint(1, 13, (20, 5)), torch.randint(0, 3, (20,))
    model = Attention(True).double().eval()
    kw = dict(damping=0.1, solver="cg", sampler="random", sample_size=8, seed=1)
    hooks = repif.InfluenceEstimator(model, (ids, y), per_sample="hooks", **kw)
    func = repif.InfluenceEstimator(model, (ids, y), per_sample="func", **kw)
    assert hooks.cost.engine is not None
    assert _rel(hooks.influence((ids[:3], y[:3])), func.influence((ids[:3], y[:3]))) <= 1e-8


def test_hugging_face_vit_embeddings():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, num_labels=3,
                                    attn_implementation="eager")
    model = transformers.ViTForImageClassification(config).double().eval()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    _check(model, x, y, ["vit.embeddings (ViTEmbeddings)"])


def test_a_users_rule_wins_over_the_built_in():
    calls = []

    class CountingLinear(LinearRule):
        name = "counting-linear"

        def per_sample(self, block, a, g, state=None):
            calls.append(block.path)
            return super().per_sample(block, a, g, state)

    try:
        assert names()[0] == "counting-linear"
        torch.manual_seed(0)
        x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        _check(Wrapped().double().eval(), x, y, ["inner (FreeParameter)"])
        assert "inner.head" in calls
    finally:
        from repif.layers import base
        base._RULES[:] = [r for r in rules() if r.name != "counting-linear"]
    assert "counting-linear" not in names()
    register(LinearRule())  # re-registering a built-in keeps one of it
    assert names().count("linear") == 1


class MyScale(nn.Module):
    """y = x ⊙ weight: the custom layer of the documentation's rule example."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_the_documented_custom_rule_replaces_the_generic_one():
    from repif.layers import LayerRule, base

    class ScaleRule(LayerRule):
        name = "my-scale"
        types = (MyScale,)

        def parameters(self, m):
            return ("weight",)

        def per_sample(self, block, a, g, state=None):
            return {"weight": (a * g).reshape(a.shape[0], -1, a.shape[-1]).sum(1)}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), MyScale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    try:
        _check(model.eval(), x, y, [])  # a closed form now: no generic block
    finally:
        base._RULES[:] = [r for r in rules() if r.name != "my-scale"]
    _check(model.eval(), x, y, ["1 (MyScale)"])  # without it: the generic rule
