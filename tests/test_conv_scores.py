"""Scores of nn.Conv2d layers contracted with the queries (one convolution of the layer input
with the stacked query filters) against the materialised per-sample route and torch.func, and
the per-layer choice between the two routes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repif.gradients.hooks import conv_route, layer_engine
from repif.gradients.streaming import per_sample_gradients
from repif.layers import conv as conv_rule
from repif.task import FunctionalModel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class OneConv(nn.Module):
    """One convolution (the layer under test) → tanh → Linear head."""

    def __init__(self, conv: nn.Conv2d, size: int) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            n = conv(torch.zeros(1, conv.in_channels, size, size)).numel()
        self.head = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Block(nn.Module):
    """A residual block: conv → BN → relu → conv → BN, plus a strided 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.skip(x))


class TinyResNet(nn.Module):
    """Stem conv (with bias) → two residual blocks → pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(4, 4, 1), Block(4, 8, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


def _perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
    return model


def _routes_agree(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    """Contracted, materialised and torch.func scores of k random queries agree."""
    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None
    ref = per_sample_gradients(fm, x, y)
    factors = torch.randn(k, fm.space.size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(k))
    expected = factors @ ref.T
    engine.conv_scores = "contract"
    contracted = engine.scores(factors, x, y)
    engine.conv_scores = "materialise"
    materialised = engine.scores(factors, x, y)
    assert _rel(contracted, expected) <= 1e-10
    assert _rel(materialised, expected) <= 1e-10
    assert _rel(contracted, materialised) <= 1e-10
    engine.conv_scores = "contract"
    engine.workspace_numel = 1  # one query per convolution: the query blocking is exact too
    assert _rel(engine.scores(factors, x, y), expected) <= 1e-10


CONVS = {
    "stride-padding": dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
    "dilation": dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "groups-no-bias": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, bias=False),
    "depthwise": dict(in_channels=4, out_channels=8, kernel_size=(3, 1), padding=(1, 0),
                      groups=4),
    "rect-stride-no-bias": dict(in_channels=2, out_channels=3, kernel_size=(2, 3),
                                stride=(2, 1), padding=(0, 1), bias=False),
}


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("name", list(CONVS))
def test_contracted_conv_scores_match_materialised_and_torch_func(name, k):
    torch.manual_seed(0)
    cfg = CONVS[name]
    model = OneConv(nn.Conv2d(**cfg), 7).double().eval()
    x = torch.randn(5, cfg["in_channels"], 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _routes_agree(model, x, y, k)


@pytest.mark.parametrize("k", [1, 7])
def test_contracted_scores_on_a_resnet_like_model(k):
    torch.manual_seed(1)
    model = _perturb_norms(TinyResNet().double().eval())
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    _routes_agree(model, x, y, k)


def test_cost_model_contracts_few_queries_and_materialises_many():
    wide = nn.Conv2d(16, 16, 3, padding=1)  # 28×28 output: many positions, small weight
    deep = nn.Conv2d(128, 128, 3, padding=1)  # 4×4 output: few positions, large weight
    assert conv_route(wide, 28 * 28, 1) == "contract"
    assert conv_route(deep, 4 * 4, 1) == "contract"
    assert conv_route(wide, 28 * 28, 10) == "materialise"
    assert conv_route(deep, 4 * 4, 10) == "contract"
    assert conv_route(wide, 28 * 28, 100) == "materialise"
    assert conv_route(deep, 4 * 4, 100) == "materialise"
    reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
    assert conv_route(reflect, 28 * 28, 1) == "materialise"


def test_engine_follows_the_cost_model(monkeypatch):
    torch.manual_seed(2)
    model = OneConv(nn.Conv2d(3, 8, 3, padding=1), 12).double().eval()
    x, y = torch.randn(4, 3, 12, 12, dtype=torch.float64), torch.randint(0, 3, (4,))
    engine = layer_engine(FunctionalModel(model), x[:2], y[:2])
    assert engine is not None and engine.conv_scores == "auto"
    calls = []
    original = conv_rule.conv_scores

    def spy(*args):
        calls.append(args[1].shape[0])
        return original(*args)

    monkeypatch.setattr(conv_rule, "conv_scores", spy)
    p = engine.fm.space.size
    assert conv_route(model.conv, 144, 1) == "contract"
    assert conv_route(model.conv, 144, 50) == "materialise"
    engine.scores(torch.randn(1, p, dtype=torch.float64), x, y)
    engine.scores(torch.randn(50, p, dtype=torch.float64), x, y)
    assert calls == [1]
    engine.conv_scores = "contract"
    engine.scores(torch.randn(50, p, dtype=torch.float64), x, y)
    assert calls == [1, 50]
    with pytest.raises(ValueError, match="conv_scores must be one of"):
        engine.conv_scores = "fast"
