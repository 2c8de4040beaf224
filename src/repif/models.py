"""Reference architectures: a tanh MLP, a small CNN and a tiny ResNet.

In every model the last ``nn.Linear`` (in ``model.modules()`` order) is the classifier head, so
its input is the penultimate feature vector that the samplers use. Initialisation is
deterministic per ``seed`` and does not touch the global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class _HasShape(Protocol):
    input_shape: tuple[int, ...]
    num_classes: int


class MLP(nn.Sequential):
    """Flatten → Linear(in, hidden) → Tanh → Linear(hidden, classes)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 64) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Sequential):
    """Two 3×3 conv blocks (8 and 16 channels, ReLU, 2×2 max-pool), adaptive pooling to at most
    4×4, then Linear(→ hidden) → ReLU → Linear(hidden → classes). Works on 8×8 to 32×32 inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 32) -> None:
        c, h, w = _chw(input_shape)
        out_h, out_w = min(4, max(h // 4, 1)), min(4, max(w // 4, 1))
        super().__init__(
            nn.Conv2d(c, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d((out_h, out_w)),
            nn.Flatten(),
            nn.Linear(16 * out_h * out_w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """Stem conv + BatchNorm, two residual blocks, global average pooling, Linear head.

    Put it in ``eval()`` mode for influence computations (BatchNorm then uses running stats).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        c, _, _ = _chw(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.blocks = nn.Sequential(ResidualBlock(hidden), ResidualBlock(hidden))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) != 3:
        raise ValueError(f"convolutional models need an input shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet": TinyResNet,
}

DEFAULT_HIDDEN = {"mlp": 64, "cnn": 32, "resnet": 16}


def names() -> list[str]:
    """The architecture names :func:`build` accepts."""
    return list(_BUILDERS)


def build(name: str, dataset: _HasShape, *, seed: int = 0, hidden: int | None = None) -> nn.Module:
    """Build architecture ``name`` for ``dataset`` (uses ``input_shape`` and ``num_classes``).

    ``hidden`` is the MLP's hidden width, the CNN's penultimate width or the ResNet's channel
    count (defaults in :data:`DEFAULT_HIDDEN`). The same ``seed`` gives the same weights, bit for
    bit; the global RNG state is left as it was.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    kwargs: dict[str, Any] = {"hidden": DEFAULT_HIDDEN[name] if hidden is None else int(hidden)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[name](tuple(dataset.input_shape), int(dataset.num_classes), **kwargs)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` in ``model.modules()``."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as the head")
    return last


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
