"""The hook-based per-sample gradient engine against torch.func's vmap(grad) (a second
implementation), on every layer type it handles, and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repif
from repif import datasets, models
from repif.gradients.hooks import layer_engine
from repif.gradients.streaming import per_sample_gradients
from repif.task import FunctionalModel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _perturb_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so their rules are exercised."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
    return model


class TokenClassifier(nn.Module):
    """Embedding → LayerNorm → Linear applied per token (3-D input) → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.norm(self.emb(ids)))).mean(1))


@pytest.fixture(scope="module")
def digits():
    ds = datasets.load("digits")
    return ds, ds.train[0][:24].double(), ds.train[1][:24]


@pytest.mark.parametrize("name,kw", [("mlp", {}), ("cnn", {}), ("resnet", {}),
                                     ("resnet18", {"width": 4})])
def test_engine_matches_torch_func(digits, name, kw):
    ds, x, y = digits
    model = _perturb_norms(models.build(name, ds, **kw).double().eval())
    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None
    ref = per_sample_gradients(fm, x, y)
    assert _rel(engine.gradients(x, y), ref) <= 1e-10
    factors = torch.randn(3, fm.space.size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    assert _rel(engine.scores(factors, x, y), factors @ ref.T) <= 1e-10


def test_engine_handles_embeddings_layernorm_and_token_dimensions():
    torch.manual_seed(0)
    model = TokenClassifier().double().eval()
    ids = torch.randint(0, 11, (9, 5))
    y = torch.randint(0, 3, (9,))
    fm = FunctionalModel(model)
    engine = layer_engine(fm, ids[:2], y[:2])
    assert engine is not None
    ref = per_sample_gradients(fm, ids, y)
    assert _rel(engine.gradients(ids, y), ref) <= 1e-10
    factors = torch.randn(4, fm.space.size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    # Linear layers on token sequences are contracted without per-sample gradients
    assert _rel(engine.scores(factors, ids, y), factors @ ref.T) <= 1e-10


class Shared(nn.Module):
    """One Linear applied twice: its per-sample rule would miss the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class TrainModeNorm(nn.Module):
    """A BatchNorm in training mode: its statistics couple the points of a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def eval(self):  # stays in training mode where the estimator asks for eval
        return self


@pytest.mark.parametrize("cls", [Shared])
def test_ineligible_models_fall_back_and_still_agree(cls):
    torch.manual_seed(0)
    model = cls().double().eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    fm = FunctionalModel(model)
    assert layer_engine(fm, x[:2], y[:2]) is None
    auto = repif.InfluenceEstimator(model, (x, y), damping=0.1)
    assert auto.cost.engine is None
    func = repif.InfluenceEstimator(model, (x, y), damping=0.1, per_sample="func")
    torch.testing.assert_close(auto.influence((x[:3], y[:3])), func.influence((x[:3], y[:3])))
    with pytest.raises(ValueError, match="per_sample='hooks' needs"):
        repif.InfluenceEstimator(model, (x, y), per_sample="hooks")


def test_train_mode_batchnorm_is_refused_by_name():
    torch.manual_seed(0)
    model = TrainModeNorm().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    fm = FunctionalModel(model)
    assert layer_engine(fm, x[:2], torch.zeros(2, dtype=torch.long)) is None
    from repif.gradients.hooks import unsupported_layers
    assert unsupported_layers(fm) == ["norm (BatchNorm1d)"]


def test_hooks_and_func_give_the_same_influence(digits):
    ds, x, y = digits
    model = _perturb_norms(models.build("resnet", ds).double().eval())
    kw = dict(damping=0.1, solver="cg", sampler="random", sample_size=8, seed=2)
    hooks = repif.InfluenceEstimator(model, (x, y), per_sample="hooks", **kw)
    func = repif.InfluenceEstimator(model, (x, y), per_sample="func", **kw)
    assert hooks.cost.engine is not None and func.cost.engine is None
    test = (x[:4], y[:4])
    assert _rel(hooks.influence(test), func.influence(test)) <= 1e-9
    assert _rel(hooks.self_influence(), func.self_influence()) <= 1e-9
    with pytest.raises(ValueError, match="per_sample must be one of"):
        repif.InfluenceEstimator(model, (x, y), per_sample="fast")


class ConvZoo(nn.Module):
    """Convolutions with stride, padding, dilation, groups (and depthwise), with and without
    bias, and a BatchNorm1d after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.c3 = nn.Conv2d(6, 6, (3, 1), padding=(1, 0), groups=6)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        return self.head(torch.tanh(self.bn(self.fc(h.flatten(1)))))


def test_engine_on_strided_dilated_grouped_convolutions():
    torch.manual_seed(0)
    model = _perturb_norms(ConvZoo().double().eval())
    x, y = torch.randn(7, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None
    ref = per_sample_gradients(fm, x, y)
    assert _rel(engine.gradients(x, y), ref) <= 1e-10
    factors = torch.randn(4, fm.space.size, dtype=torch.float64)
    assert _rel(engine.scores(factors, x, y), factors @ ref.T) <= 1e-10


class _OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, x: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            self.head = nn.Linear(conv(x[:1]).numel(), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("route", ["unfold", "slices", "grouped", "auto"])
@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=(2, 1), padding=(2, 0),
         groups=2),
    dict(in_channels=3, out_channels=4, kernel_size=1, stride=2),
    dict(in_channels=2, out_channels=2, kernel_size=3, stride=(1, 2), padding=(0, 1)),
])
def test_conv_weight_routes_match_torch_func(monkeypatch, route, conv):
    """Per-sample convolution gradients by unfolded patches and by shifted slices (and the
    per-layer rule choosing between them) against torch.func's vmap(grad)."""
    from repif.layers import conv as conv_rule

    monkeypatch.setattr(conv_rule, "conv_gradient_mode", route)
    torch.manual_seed(0)
    x = torch.randn(5, conv["in_channels"], 9, 10, dtype=torch.float64)
    model = _OneConv(nn.Conv2d(**conv).double(), x).double().eval()
    y = torch.randint(0, 3, (5,))
    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None
    assert _rel(engine.gradients(x, y), per_sample_gradients(fm, x, y)) <= 1e-10


def test_conv_route_rule():
    from repif.gradients.hooks import SLICES_MIN_POSITIONS, conv_gradient_route
    from repif.layers.conv import GROUPED_MIN_CHANNELS as C

    three, one = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
    assert conv_gradient_route(three, SLICES_MIN_POSITIONS) == "slices"
    assert conv_gradient_route(three, SLICES_MIN_POSITIONS - 1) == "unfold"
    assert conv_gradient_route(one, 1) == "slices"
    wide = nn.Conv2d(C, C, 3)
    assert conv_gradient_route(wide, C) == "grouped"
    assert conv_gradient_route(wide, C - 1) == "unfold"
    assert conv_gradient_route(nn.Conv2d(C, C, 1), 4 * C) == "slices"
    assert conv_gradient_route(nn.Conv2d(2 * C, 2 * C, 3, groups=2), C) == "grouped"


def test_in_place_activations_keep_the_hook_engine():
    """ReLU(inplace=True) after a conv or BatchNorm (VGG, ResNet) overwrote the captured output,
    so the self-check failed and the model fell back to torch.func; the next layer now gets a
    copy and the engine's gradients equal torch.func's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(144, 3)).double().eval()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None
    torch.testing.assert_close(engine.gradients(x, y), per_sample_gradients(fm, x, y))
