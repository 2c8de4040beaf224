"""The CIFAR-style ResNet-18: exact parameter counts, shapes, determinism, the width option."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import repif
from repif import models
from repif.training import load_or_train


@dataclass
class Shape:
    """The two attributes :func:`repif.models.build` reads from a dataset."""

    input_shape: tuple[int, ...]
    num_classes: int = 10


CIFAR, MNIST = Shape((3, 32, 32)), Shape((1, 28, 28))
DIGITS, DIGITS_2D = Shape((1, 8, 8)), Shape((8, 8))  # datasets may give (H, W) for one channel
#: Width of the small models below: keeps every forward pass in the milliseconds.
SMALL = 4


def _input(shape: Shape, n: int = 3) -> torch.Tensor:
    c, h, w = shape.input_shape if len(shape.input_shape) == 3 else (1, *shape.input_shape)
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_parameter_counts_at_width_64():
    rgb = models.build("resnet18", CIFAR)
    assert models.num_parameters(rgb) == 11_173_962  # the standard CIFAR-10 ResNet-18 figure
    # the backbone alone (without the 512·10 + 10 head) is the other commonly quoted figure
    assert models.num_parameters(rgb) - models.num_parameters(models.head(rgb)) == 11_168_832
    # one input channel saves 2 · 64 · 3 · 3 = 1,152 stem weights
    for shape in (MNIST, DIGITS, DIGITS_2D):
        assert models.num_parameters(models.build("resnet18", shape)) == 11_172_810
    assert models.num_parameters(models.build("resnet18", CIFAR, width=64)) == 11_173_962


def test_architecture_layout():
    model = models.build("resnet18", CIFAR)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 17  # + the head = 18 weight layers
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [128, 256, 512]
    assert convs[0].stride == (1, 1) and convs[0].in_channels == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, models.BasicBlock) for m in model.modules()) == 8


@pytest.mark.parametrize("shape", [CIFAR, MNIST, DIGITS, DIGITS_2D],
                         ids=lambda s: "x".join(map(str, s.input_shape)))
def test_output_shapes_and_eval_determinism(shape):
    model = models.build("resnet18", shape, width=SMALL).eval()
    x = _input(shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 10)
        assert torch.equal(out, model(x))
        assert torch.isfinite(out).all()


def test_same_seed_same_weights():
    a = models.build("resnet18", MNIST, seed=3, width=SMALL)
    b = models.build("resnet18", MNIST, seed=3, width=SMALL)
    c = models.build("resnet18", MNIST, seed=4, width=SMALL)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)
    state = torch.random.get_rng_state()
    models.build("resnet18", MNIST, width=SMALL)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


@pytest.mark.parametrize("width", [SMALL, 64])
def test_head_is_last_linear_with_8w_inputs(width):
    model = models.build("resnet18", DIGITS, width=width)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [models.head(model)] and models.head(model) is model.head
    assert model.head.in_features == 8 * width and model.head.out_features == 10


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_width_validated(bad):
    message = re.escape(f"width must be a positive integer, got {bad!r}")
    with pytest.raises(ValueError, match=message):
        models.build("resnet18", DIGITS, width=bad)


def test_width_aliases_hidden_for_the_other_models():
    for name in ("mlp", "cnn", "resnet"):
        by_hidden = models.build(name, DIGITS, hidden=6)
        by_width = models.build(name, DIGITS, width=6)
        assert models.head(by_width).weight.shape == models.head(by_hidden).weight.shape
        assert all(torch.equal(p, q) for p, q in zip(by_hidden.parameters(),
                                                     by_width.parameters(), strict=True))
        assert models.build(name, DIGITS, hidden=6, width=6) is not None
        with pytest.raises(ValueError, match="pass only one"):
            models.build(name, DIGITS, hidden=6, width=7)
    assert models.head(models.build("resnet18", DIGITS, hidden=SMALL)).in_features == 8 * SMALL
    assert "resnet18" in models.names()


def test_trains_one_step():
    x = _input(DIGITS, n=8)
    y = torch.arange(8) % 10
    model = models.build("resnet18", DIGITS, width=SMALL)
    before = model.head.weight.detach().clone()
    repif.train(model, (x, y), epochs=1, batch_size=8)
    assert not model.training
    assert not torch.equal(before, model.head.weight)


def test_load_or_train_keeps_widths_apart(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(
        name="tiny", input_shape=(1, 8, 8), num_classes=10,
        train=(torch.randn(8, 1, 8, 8, generator=g), torch.arange(8) % 10),
        test=(torch.randn(2, 1, 8, 8, generator=g), torch.arange(2)),
    )
    a = load_or_train(data, "resnet18", epochs=1, batch_size=8, cache_dir=tmp_path, width=2)
    b = load_or_train(data, "resnet18", epochs=1, batch_size=8, cache_dir=tmp_path, width=SMALL)
    assert a.head.in_features == 16 and b.head.in_features == 8 * SMALL
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 2
    again = load_or_train(data, "resnet18", epochs=1, batch_size=8, cache_dir=tmp_path, width=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), again.parameters(), strict=True))
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 2


def test_cli_and_study_config_carry_width():
    import hashlib
    import json

    from repif.cli import _config, _parser
    from repif.studies.class_removal.config import _GRID_FIELDS, StudyConfig

    args = _parser().parse_args(["class-removal", "--model", "resnet18", "--width", "8"])
    config = _config(args)
    assert config.width == 8 and config.model == "resnet18"
    config.validate()
    assert _config(_parser().parse_args(["class-removal"])).width is None
    assert StudyConfig.from_dict(config.to_dict()).width == 8
    with pytest.raises(ValueError, match="--width"):
        StudyConfig(width=0).validate()
    # an unset width leaves the cell hash as it was before the field existed (results resume)
    # added since, None (or "all") by default
    later = ("width", "fisher", "other_layers", "weight_sharing", "eigh_dtype", "basis_size",
             "references")
    old = {k: v for k, v in StudyConfig().to_dict().items() if k not in (*_GRID_FIELDS, *later)}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert StudyConfig().cell_hash() == digest != StudyConfig(width=8).cell_hash()
