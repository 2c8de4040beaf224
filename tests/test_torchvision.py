"""torchvision's ResNet-18, VGG-11 and ShuffleNetV2 as they come (num_classes=10, 3×32×32
inputs, a few images): fit, influence, top-k, self-influence and removal run end to end, every
layer handled by the hook engine or by torch.func, and Kronecker curvatures report the layers
they leave to ``other_layers``. Skipped where torchvision is not installed."""

from __future__ import annotations

import pytest
import torch

import repif
from repif.curvature.kfac import kronecker_layers
from repif.task import FunctionalModel

torchvision = pytest.importorskip("torchvision")

N, CLASSES = 12, 10
ARCHITECTURES = ("resnet18", "vgg11", "shufflenet_v2_x0_5")


def build(name: str) -> torch.nn.Module:
    """The model as torchvision gives it. VGG-11's ImageNet classifier holds 119M of its 129M
    parameters in two Linear layers (25,088 → 4,096 → 4,096); per-sample gradients of all of
    them are gigabytes per image, so here they are frozen (requires_grad=False, the usual way
    to restrict influence to a part of a model) and the convolutions and last layer scored."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=CLASSES).eval()
    if name == "vgg11":
        for layer in (model.classifier[0], model.classifier[3]):
            layer.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 32, 32, generator=g)
    y = torch.arange(N) % CLASSES
    return x, y


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_end_to_end(name, images):
    x, y = images
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = repif.InfluenceEstimator(model, (x, y), solver="cg", damping=0.1, sampler="random",
                                   sample_size=4, seed=0, max_iter=5, tol=1e-3).fit()
    scores = est.influence((x[:2], y[:2]), train_indices=torch.arange(6))
    assert scores.shape == (2, 6) and bool(torch.isfinite(scores).all())
    top = est.top_k((x[0], y[0]), k=3)
    assert top.proponents.shape == (3,)
    self_inf = est.self_influence(torch.arange(3))
    assert self_inf.shape == (3,) and bool(torch.isfinite(self_inf).all())
    removed = est.remove(y == 1, scale=1.0)
    assert isinstance(removed, type(model))
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_layer_is_handled_or_reported(name, images):
    """Every trainable module is Conv2d (grouped in ShuffleNet), Linear or eval-mode
    BatchNorm2d: the hook engine takes them all (checked against torch.func when the estimator
    is built). K-FAC leaves BatchNorm and grouped convolutions to ``other_layers`` and names
    each of them when told to refuse them."""
    x, y = images
    model = build(name)
    est = repif.InfluenceEstimator(model, (x, y), solver="cg", per_sample="hooks")
    assert est.cost.engine is not None
    fm = FunctionalModel(est.model)
    layers, others = kronecker_layers(fm, "identity")
    assert layers
    modules = dict(fm.model.named_modules())
    for param, _, _ in others:
        owner = modules[param.rsplit(".", 1)[0]]
        assert isinstance(owner, torch.nn.BatchNorm2d) or (
            isinstance(owner, torch.nn.Conv2d) and owner.groups > 1), param
    if others:
        with pytest.raises(ValueError, match="other_layers") as info:
            kronecker_layers(fm, "error")
        assert others[0][0].rsplit(".", 1)[0] in str(info.value)


@pytest.mark.parametrize("name", ["resnet18"])
def test_ekfac_eigen_runs(name, images):
    x, y = images
    est = repif.InfluenceEstimator(
        build(name), (x, y), curvature="ekfac", solver="eigen", damping=0.1,
        sampler="random", sample_size=6, kronecker_options={"other_layers": "identity"}).fit()
    scores = est.influence((x[:2], y[:2]))
    assert scores.shape == (2, N) and bool(torch.isfinite(scores).all())
    est.set_damping(1.0)  # no refit
    assert bool(torch.isfinite(est.influence((x[:1], y[:1]))).all())
