"""Reference architectures: logistic regression, a tanh MLP, a small CNN, a tiny ResNet and the
CIFAR ResNet-18.

In every model the last ``nn.Linear`` (in ``model.modules()`` order) is the classifier head, so
its input is the penultimate feature vector that the samplers use. Initialisation is
deterministic per ``seed`` and does not touch the global RNG state.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class _HasShape(Protocol):
    input_shape: tuple[int, ...]
    num_classes: int


class LogisticRegression(nn.Sequential):
    """Flatten → Linear(in, classes): multinomial logistic regression (with softmax
    cross-entropy). It has no hidden size; its features are its (flattened) inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class MLP(nn.Sequential):
    """Flatten → Linear(in, hidden) → Tanh → Linear(hidden, classes); ``hidden`` may also be a
    sequence of widths, one Linear → Tanh pair each (e.g. (128, 64): 784-128-64-10 on MNIST)."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: int | Sequence[int] = 64
    ) -> None:
        widths = [math.prod(input_shape), *_widths(hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.Tanh()]
        super().__init__(*layers, nn.Linear(widths[-1], num_classes))


def _widths(hidden: int | Sequence[int]) -> list[int]:
    return [int(hidden)] if isinstance(hidden, numbers.Integral) else [int(h) for h in hidden]


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


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: conv3×3(stride)-BN-ReLU-conv3×3-BN plus a shortcut, then ReLU.

    The shortcut is the identity when the shape is kept and a 1×1 conv (same stride) + BN
    projection otherwise. ``(N, in_channels, H, W) → (N, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


#: ResNet-18's stages: (channel multiple of the base width, stride of the first block). Each
#: stage holds two :class:`BasicBlock` s; 1 + 4·2·2 convolutions + the head = 18 weight layers.
RESNET18_STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))
RESNET18_BLOCKS_PER_STAGE = 2

#: ResNet-18's base width: 64 is He et al.'s choice and the one every CIFAR-10 ResNet-18 figure
#: (11.17 M parameters) refers to; smaller widths (e.g. 4–16) keep CPU tests and studies cheap.
DEFAULT_RESNET18_WIDTH = 64


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 (He et al. 2016, as used throughout the CIFAR-10 literature).

    Stem: 3×3 conv (stride 1) + BN + ReLU, no max-pool. Four stages of two
    :class:`BasicBlock` s with ``width``, 2·``width``, 4·``width``, 8·``width`` channels and
    strides 1, 2, 2, 2; global average pooling; ``Linear(8·width → classes)`` head.
    ``(N, C, H, W) → (N, num_classes)`` for any H, W ≥ 1 (28×28 MNIST, 8×8 digits, 32×32 CIFAR).
    PyTorch's default initialisation. At ``width=64`` with 10 classes it has 11,173,962 parameters
    on 3-channel and 11,172,810 on 1-channel inputs. Use ``eval()`` mode for influence work.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = DEFAULT_RESNET18_WIDTH
    ) -> None:
        super().__init__()
        c, _, _ = _chw(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        channels = width
        for multiple, stride in RESNET18_STAGES:
            out = multiple * width
            blocks = [BasicBlock(channels, out, stride)]
            blocks += [BasicBlock(out, out) for _ in range(RESNET18_BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) != 3:
        raise ValueError(f"convolutional models need an input shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "linear": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet": TinyResNet,
    "resnet18": ResNet18,
}

#: Default size per model: the MLP's hidden width, the CNN's penultimate width, the tiny ResNet's
#: channel count and ResNet-18's base width.
DEFAULT_HIDDEN = {"mlp": 64, "cnn": 32, "resnet": 16, "resnet18": DEFAULT_RESNET18_WIDTH}

#: The constructor argument that takes the size, where it is not ``hidden``.
_SIZE_ARG = {"resnet18": "width"}


def names() -> list[str]:
    """The architecture names :func:`build` accepts."""
    return list(_BUILDERS)


def build(
    name: str,
    dataset: _HasShape,
    *,
    seed: int = 0,
    hidden: int | Sequence[int] | None = None,
    width: int | None = None,
) -> nn.Module:
    """Build architecture ``name`` for ``dataset`` (uses ``input_shape`` and ``num_classes``).

    ``"linear"`` is multinomial logistic regression (no hidden size). ``hidden`` is the MLP's
    hidden width (or a sequence of widths, one hidden layer each), the CNN's penultimate width
    or the ResNet's channel count; ``width`` is ResNet-18's base width (its head then sees
    ``8 * width`` features). Either name sets the size of any model; giving both with different
    values is an error. Defaults are in :data:`DEFAULT_HIDDEN`. The same ``seed`` gives the same
    weights, bit for bit; the global RNG state is left as it was.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    if name == "linear":
        if hidden is not None or width is not None:
            raise ValueError("model 'linear' (logistic regression) has no hidden size; leave "
                             "hidden / width (--hidden, --width) unset")
        kwargs: dict[str, Any] = {}
    else:
        kwargs = {_SIZE_ARG.get(name, "hidden"): _size(name, hidden, width)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[name](tuple(dataset.input_shape), int(dataset.num_classes), **kwargs)
    return model


def _size(name: str, hidden: Any, width: int | None) -> int | tuple[int, ...]:
    """The model size from ``hidden`` / ``width`` (aliases), validated; the default if neither.
    The MLP also takes a sequence of hidden widths."""
    if name == "mlp" and isinstance(hidden, (list, tuple)):
        if not hidden or any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1
                             for h in hidden):
            raise ValueError(f"hidden must be a positive integer or a non-empty sequence of "
                             f"them, got {hidden!r}; e.g. hidden=(128, 64)")
        if width is not None:
            raise ValueError("hidden=(…) and width both set the MLP's size; pass only hidden")
        return tuple(int(h) for h in hidden)
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(
                f"width must be a positive integer, got {width!r}; pass e.g. width="
                f"{DEFAULT_HIDDEN[name]} (the default for {name!r}) or leave it unset"
            )
        width = int(width)
        if hidden is not None and int(hidden) != width:
            raise ValueError(
                f"hidden={hidden!r} and width={width!r} both set the size of {name!r}; "
                "pass only one of them"
            )
        return width
    return DEFAULT_HIDDEN[name] if hidden is None else int(hidden)


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
