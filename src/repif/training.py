"""Training the reference models, deterministically, with an optional safetensors cache.

Objective: mean cross-entropy over the training set plus ``(weight_decay / 2) * ||θ||²`` over
all trainable parameters. The L2 term enters through the optimiser's ``weight_decay=`` argument,
which adds ``weight_decay * θ`` to each gradient (plain L2 for Adam and SGD, *not* AdamW's
decoupled decay) — exactly the gradient of that term. Influence curvature must therefore add
``weight_decay * I`` (docs/design.md, "Maths").

Determinism: batches are shuffled by a ``torch.Generator`` seeded with ``seed`` and any other
randomness runs inside ``torch.random.fork_rng`` seeded with ``seed``, so the same model, data,
recipe and seed give the same weights, bit for bit, on the same machine and torch build; the
global RNG state is left untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repif import io
from repif.data import as_tensors
from repif.recording import ATTRIBUTE, PoolStatistics, StatisticsRecorder

#: Recorded statistics travel in a cached model's file under these keys (not model state).
STATS_PREFIX = "repif_statistics."
STATS_FIELDS = ("logits", "features", "targets")

DEFAULT_LR = {"adam": 1e-2, "sgd": 0.1}
OPTIMIZERS = tuple(DEFAULT_LR)
#: Learning-rate schedules: constant, or cosine decay to 0 over all steps (ends with small
#: steps, so BatchNorm's running statistics settle on the final weights).
SCHEDULES = ("constant", "cosine")


def train(
    model: nn.Module,
    train: Any,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    optimizer: str = "adam",
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_key: dict[str, Any] | None = None,
    schedule: str = "constant",
    momentum: float | None = None,
    record_statistics: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``train`` and return the same module, in ``eval()`` mode.

    ``record_statistics=True`` keeps every training point's logits and penultimate features as
    the last epoch computes them (:mod:`repif.recording`) and leaves them on the returned model
    as ``model.repif_statistics`` (stored with a cached model too), where an
    :class:`~repif.InfluenceEstimator` of that model and data picks them up instead of making
    its own pass.

    ``train`` is a tuple ``(x, y)`` of tensors or a torch ``Dataset`` of ``(x, y)`` pairs; ``y``
    holds integer class labels in ``[0, num_classes)``, where ``num_classes`` is the output size
    of the model's last ``nn.Linear``. ``optimizer`` is ``"adam"`` (default lr 1e-2) or ``"sgd"``
    (default lr 0.1; ``momentum`` default 0.9, e.g. 0 for plain SGD); the learning rate is
    constant unless ``schedule="cosine"``.

    With ``cache_dir`` the trained weights are stored as ``model-<hash>.safetensors`` there and
    reused when the stored metadata matches exactly: the recipe, the model class and a hash of
    its initial weights, ``cache_key`` (default: a hash of the training tensors) and the torch
    and repif versions. A corrupt cache file is reported with a warning and retrained over.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if momentum is not None:
        if optimizer != "sgd":
            raise ValueError(f"momentum applies to optimizer='sgd' only, got optimizer="
                             f"{optimizer!r}; leave momentum unset")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
                0 <= momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    x, y = as_tensors(train)
    num_classes = _num_classes(model, x)
    check_training_data(x, y, num_classes)
    dev = torch.device(device) if device is not None else _model_device(model)

    recipe = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": lr,
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "optimizer": optimizer,
        "objective": "mean cross-entropy + weight_decay/2 * ||theta||^2",
    }
    if schedule != "constant":  # absent for the default, so earlier cache keys still hit
        recipe["schedule"] = schedule
    if momentum is not None:  # likewise absent when unset (SGD's default 0.9)
        recipe["momentum"] = float(momentum)
    path = meta = None
    if cache_dir is not None:
        meta = _cache_metadata(model, x, y, recipe, cache_key)
        path = Path(cache_dir) / f"model-{_digest(meta)[:20]}.safetensors"
        if _try_load(model, path, meta):
            return model.to(dev).eval()

    model.to(dev)
    recorder = StatisticsRecorder(len(y), model) if record_statistics else None
    try:
        _fit(model, x, y, dev, recipe, progress, recorder)
    finally:
        if recorder is not None:
            recorder.close()
    model.eval()
    if recorder is not None and recipe["epochs"] > 0:
        setattr(model, ATTRIBUTE, recorder.statistics(model))
    if path is not None:
        state = {k: v for k, v in model.state_dict().items()}
        stats = getattr(model, ATTRIBUTE, None)
        if stats is not None:
            state.update({f"{STATS_PREFIX}{k}": getattr(stats, k) for k in STATS_FIELDS})
        extra = {"statistics_digest": stats.model_digest} if stats is not None else {}
        io.save_tensors_atomic(path, state, {"key": meta, **extra})
    return model


def load_or_train(
    dataset: Any,
    model_name: str,
    *,
    seed: int = 0,
    epochs: int = 30,
    weight_decay: float = 0.0,
    lr: float | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    optimizer: str = "adam",
    hidden: int | tuple[int, ...] | None = None,
    width: int | None = None,
    schedule: str = "constant",
    momentum: float | None = None,
    record_statistics: bool = False,
) -> nn.Module:
    """Build ``model_name`` for ``dataset`` with ``seed`` and train it on ``dataset.train``,
    reusing a cached model from ``cache_dir`` when its metadata (dataset name, sizes, shapes and a
    hash of its training data; architecture and its ``hidden`` / ``width``; seed; recipe; torch
    version) matches exactly. ``hidden`` and ``width`` go to :func:`repif.models.build`."""
    from repif import models

    model = models.build(model_name, dataset, seed=seed, hidden=hidden, width=width)
    x, y = dataset.train
    key = {
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "n_train": len(y),
        "n_test": len(dataset.test[1]),
        "input_shape": list(dataset.input_shape),
        "num_classes": int(dataset.num_classes),
        "train_sha256": tensor_digest(x, y),
        "architecture": model_name,
        "hidden": list(hidden) if isinstance(hidden, (list, tuple)) else hidden,
    }
    if width is not None:  # absent when unset, so keys written before ``width`` existed still hit
        key["width"] = int(width)
    return train(
        model,
        (x, y),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        optimizer=optimizer,
        progress=progress,
        cache_dir=cache_dir,
        cache_key=key,
        schedule=schedule,
        momentum=momentum,
        record_statistics=record_statistics,
    )


def check_training_data(x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
    """Raise ValueError for non-finite inputs, non-integer labels or labels out of range."""
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"x contains {bad} non-finite values (NaN or inf); remove or impute those samples "
                "(e.g. x = torch.nan_to_num(x)) before training"
            )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}; use y.long()")
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-d tensor of class indices, got shape {list(y.shape)}")
    if len(y) == 0:
        raise ValueError("the training set is empty")
    if num_classes is not None:
        out = (y < 0) | (y >= num_classes)
        if out.any():
            value = int(y[out][0])
            raise ValueError(
                f"label {value} is outside [0, {num_classes}) ({int(out.sum())} bad labels); the "
                f"model has {num_classes} outputs"
            )


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 over the dtypes, shapes and bytes of ``tensors`` (a cache fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    recipe: dict[str, Any],
    progress: bool,
    recorder: StatisticsRecorder | None = None,
) -> None:
    """The training loop: shuffled mini-batches, mean cross-entropy, L2 via the optimiser;
    ``recorder`` keeps the last epoch's logits and features."""
    params = [p for p in model.parameters() if p.requires_grad]
    wd = recipe["weight_decay"]
    if recipe["optimizer"] == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=recipe["lr"], weight_decay=wd)
    else:
        opt = torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe.get("momentum", 0.9),
                              weight_decay=wd)
    gen = torch.Generator().manual_seed(recipe["seed"])
    n, bs = len(y), recipe["batch_size"]
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total_steps = recipe["epochs"] * -(-n // bs)
    step = 0
    # one tick per mini-batch: a full-width ResNet-18 epoch on a CPU takes minutes
    bar = tqdm(total=total_steps, desc="training", unit="batch", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar:
        torch.manual_seed(recipe["seed"])
        for epoch in range(recipe["epochs"]):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, bs):
                if recipe.get("schedule") == "cosine":
                    decay = 0.5 * (1 + math.cos(math.pi * step / total_steps))
                    for group in opt.param_groups:
                        group["lr"] = recipe["lr"] * decay
                step += 1
                idx = order[start : start + bs]
                xb, yb = x[idx].to(device), y[idx].to(device).long()
                opt.zero_grad(set_to_none=True)
                out = model(xb)
                if recorder is not None and epoch == recipe["epochs"] - 1:
                    recorder.record(idx, out, yb)
                loss = loss_fn(out, yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                bar.update()
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"training loss became {total / n}; lower the learning rate (lr={recipe['lr']})"
                )
            bar.set_postfix(epoch=f"{epoch + 1}/{recipe['epochs']}", loss=f"{total / n:.4f}")


def _num_classes(model: nn.Module, x: Tensor) -> int:
    from repif.models import head

    try:
        return head(model).out_features
    except ValueError:
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            return int(probe(x[:1].to(_model_device(model))).shape[-1])


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _cache_metadata(
    model: nn.Module, x: Tensor, y: Tensor, recipe: dict[str, Any], cache_key: dict | None
) -> dict[str, Any]:
    state = model.state_dict()
    data = cache_key if cache_key is not None else {"train_sha256": tensor_digest(x, y)}
    meta = {
        "format": "repif-trained-model/1",
        "data": data,
        "model": {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "init_sha256": tensor_digest(*state.values()),
            "shapes": {k: list(v.shape) for k, v in state.items()},
        },
        "recipe": recipe,
        "env": {k: v for k, v in io.environment_metadata().items() if k != "python"},
    }
    return json.loads(json.dumps(meta))  # normalise to what a JSON round trip gives


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _try_load(model: nn.Module, path: Path, meta: dict[str, Any]) -> bool:
    """Load cached weights into ``model`` when ``path`` holds them for exactly ``meta``."""
    if not path.is_file():
        return False
    try:
        tensors, stored = io.load_tensors(path)
    except ValueError as e:
        warnings.warn(f"ignoring corrupt model cache ({e}); retraining", stacklevel=3)
        return False
    if stored.get("key") != meta:
        return False
    recorded = {k.removeprefix(STATS_PREFIX): tensors.pop(k) for k in list(tensors)
                if k.startswith(STATS_PREFIX)}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        warnings.warn(
            f"ignoring model cache {path} that does not fit ({e}); retraining", stacklevel=3
        )
        return False
    if set(recorded) == set(STATS_FIELDS):
        setattr(model, ATTRIBUTE, PoolStatistics(**recorded,
                                                 model_digest=stored.get("statistics_digest")))
    return True
