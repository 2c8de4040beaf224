"""Ground truth by retraining: recipes, LDS subsets and a checked cache of retrained models.

Every retrained model is stored as ``<folder>/<kind>-<indices hash>-s<seed>.safetensors`` (its
weights under ``model.``, its logits on every test point under ``test_logits``) with metadata
naming the recipe, the data and the exact training indices; a file is reused only when that
metadata matches and its SHA-256 checksum holds (docs/design.md, "Caches"), else the model is
retrained with a warning. Writes are atomic, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repif import distributed, io
from repif.training import tensor_digest

#: Fewest LDS subsets accepted: a Spearman correlation over S pairs has a standard error of
#: about 1/√(S − 3), ±0.38 at S = 10; fewer makes every per-test LDS mostly noise.
MIN_SUBSETS = 10


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Recipe:
    """How a ground-truth model is built and trained; deterministic per seed.

    ``build(seed)`` returns a fresh, untrained model; ``fit(model, (x, y), seed)`` trains it on
    the given points and returns it. ``key`` (JSON) identifies the recipe in cache keys: change
    it whenever the recipe changes in a way its code does not show (e.g. a closure's values).
    ``weight_decay`` is the objective's L2 coefficient (the influence curvature adds it).
    """

    build: Callable[[int], nn.Module]
    fit: Callable[[nn.Module, tuple[Tensor, Tensor], int], nn.Module]
    key: dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.0

    @classmethod
    def from_functions(cls, build: Callable[[int], nn.Module],
                       fit: Callable[[nn.Module, tuple[Tensor, Tensor], int], nn.Module], *,
                       key: dict[str, Any] | None = None, weight_decay: float = 0.0) -> Recipe:
        """A user's recipe; without ``key`` it is keyed by the two functions' source code."""
        if key is None:
            key = {"build": _source(build), "fit": _source(fit)}
        return cls(build, fit, {"user": key}, float(weight_decay))

    @classmethod
    def builtin(cls, model: str, dataset: Any, *, hidden: int | Sequence[int] | None = None,
                epochs: int = 30, lr: float | None = None, batch_size: int = 64,
                weight_decay: float = 0.0, optimizer: str = "adam",
                momentum: float | None = None, schedule: str = "constant",
                device: str | torch.device = "cpu") -> Recipe:
        """``repif.models.build(model, dataset, seed=…, hidden=…)`` trained by ``repif.train``
        (mean cross-entropy + (weight_decay/2)‖θ‖²) with these settings."""
        from repif import models, training

        hidden = list(hidden) if isinstance(hidden, (list, tuple)) else hidden
        models.build(model, dataset, hidden=hidden)  # a bad name or size fails here

        def build(seed: int) -> nn.Module:
            return models.build(model, dataset, seed=seed, hidden=hidden)

        def fit(net: nn.Module, data: tuple[Tensor, Tensor], seed: int) -> nn.Module:
            return training.train(net, data, epochs=epochs, lr=lr, batch_size=batch_size,
                                  weight_decay=weight_decay, seed=seed, optimizer=optimizer,
                                  momentum=momentum, schedule=schedule, device=device)

        key = {"model": model, "hidden": hidden, "input_shape": list(dataset.input_shape),
               "num_classes": int(dataset.num_classes), "epochs": int(epochs), "lr": lr,
               "batch_size": int(batch_size), "weight_decay": float(weight_decay),
               "optimizer": optimizer, "momentum": momentum, "schedule": schedule}
        return cls(build, fit, {"builtin": key}, float(weight_decay))


def _source(fn: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def lds_subsets(n: int, count: int, fraction: float, seed: int = 0) -> np.ndarray:
    """(count, n) boolean masks of the LDS subsets: subset k holds round(fraction·n) points drawn
    uniformly without replacement by a generator seeded with (seed, k), so the first subsets stay
    the same when ``count`` grows."""
    check_subsets(count, fraction, n)
    size = round(fraction * n)
    masks = np.zeros((count, n), dtype=bool)
    for k in range(count):
        masks[k, np.random.default_rng([seed, k]).choice(n, size, replace=False)] = True
    return masks


def check_subsets(count: Any, fraction: Any, n: int) -> None:
    """ValueError naming the bad value and the fix, for an LDS design that cannot work."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0 < fraction < 1):
        raise ValueError(f"the subset fraction must be in (0, 1), got {fraction!r}; pass e.g. "
                         "--fraction 0.5 (each subset holds half the training points)")
    if isinstance(count, bool) or not isinstance(count, int) or count < MIN_SUBSETS:
        raise ValueError(f"LDS needs at least {MIN_SUBSETS} subsets, got {count!r}; pass e.g. "
                         "--subsets 50 (a rank correlation over fewer is mostly noise)")
    size = round(fraction * n)
    if not 1 <= size <= n - 1:
        raise ValueError(f"a fraction of {fraction} of {n} training points gives subsets of "
                         f"{size} points; choose a fraction that keeps between 1 and {n - 1}")


@dataclass(frozen=True)
class Job:
    """One retraining: ``kind`` ("full", "subset", "loo"), the kept training indices, a seed."""

    kind: str
    indices: np.ndarray
    seed: int
    label: str = ""

    @property
    def indices_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()
                              ).hexdigest()


class ModelStore:
    """Retrains models by ``recipe`` on subsets of ``train`` and keeps them (see module doc)."""

    def __init__(self, folder: str | Path, recipe: Recipe, train: tuple[Tensor, Tensor],
                 test: tuple[Tensor, Tensor], *, progress: bool = False) -> None:
        self.recipe, self.train, self.test, self.progress = recipe, train, test, progress
        self.key = {"recipe": recipe.key, "train_sha256": tensor_digest(*train),
                    "test_sha256": tensor_digest(*test)}
        self.key_hash = digest(self.key)[:16]
        self.folder = Path(folder) / self.key_hash
        self.trained = 0  # models trained (not loaded) by this store
        self._logits: dict[tuple[str, str, int], Tensor] = {}

    def path(self, job: Job) -> Path:
        return self.folder / f"{job.kind}-{job.indices_sha256[:16]}-s{job.seed}.safetensors"

    def _meta(self, job: Job) -> dict[str, Any]:
        return {"format": "repif-ground-truth/1", "key": self.key_hash, "kind": job.kind,
                "indices_sha256": job.indices_sha256, "n_kept": int(len(job.indices)),
                "seed": int(job.seed)}

    def _read(self, job: Job) -> dict[str, Tensor] | None:
        path = self.path(job)
        try:
            tensors, meta = io.load_tensors(path)
        except FileNotFoundError:
            return None
        except ValueError as err:
            warnings.warn(f"retraining over the damaged ground-truth model {path} ({err})",
                          stacklevel=3)
            return None
        if meta != self._meta(job) or "test_logits" not in tensors:
            warnings.warn(f"retraining over {path}: it records another model ({meta})",
                          stacklevel=3)
            return None
        return tensors

    def cached(self, job: Job) -> bool:
        return self._read(job) is not None

    def _train(self, job: Job) -> dict[str, Tensor]:
        x, y = self.train
        idx = torch.from_numpy(np.ascontiguousarray(job.indices, dtype=np.int64))
        model = self.recipe.fit(self.recipe.build(job.seed), (x[idx], y[idx]), job.seed)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the recipe's fit returned {type(model).__name__}, not the trained "
                            "nn.Module; return the model")
        tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        tensors["test_logits"] = test_logits(model, self.test[0])
        io.save_tensors_atomic(self.path(job), tensors, self._meta(job))
        self.trained += 1
        return tensors

    def logits(self, job: Job) -> Tensor:
        """(n_test, C) float64 test logits of the model ``job`` trains (trained if not cached)."""
        key = (job.kind, job.indices_sha256, job.seed)
        if key not in self._logits:
            tensors = self._read(job) or self._train(job)
            self._logits[key] = tensors["test_logits"]
        return self._logits[key]

    def model(self, job: Job) -> nn.Module:
        """The trained model of ``job`` (trained if not cached), in eval mode on the CPU."""
        tensors = self._read(job) or self._train(job)
        self._logits[(job.kind, job.indices_sha256, job.seed)] = tensors["test_logits"]
        model = self.recipe.build(job.seed)
        state = {k.removeprefix("model."): v for k, v in tensors.items()
                 if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        return model.eval()

    def run(self, jobs: list[Job], desc: str = "retraining") -> None:
        """Make sure every job's model exists: train the missing ones, with a progress bar.

        Over several processes (docs/design.md, "Several processes") the missing jobs are dealt
        out round-robin; each rank trains its share alone (no collectives), then every rank's
        new files are sent to every other rank, so all hold every model (rank 0's folder is the
        run's output). ``trained`` then counts the models all ranks trained."""
        if not distributed.is_distributed():
            mine, missing = jobs, None
        else:
            # rank 0's view decides, so every rank deals out the same list (ranks may share
            # one folder, or hold mirrored copies of rank 0's)
            have = distributed.broadcast_object([self.cached(j) for j in jobs]
                                                if distributed.is_main() else None)
            missing = [j for j, cached in zip(jobs, have, strict=True) if not cached]
            mine = missing[distributed.rank()::distributed.world_size()]
        bar = tqdm(mine, desc=desc, unit="model", disable=not self.progress, leave=False)
        before = self.trained
        with distributed.local():
            for job in bar:
                bar.set_postfix_str(job.label or job.kind, refresh=False)
                self.logits(job)
        bar.close()
        if missing is not None:
            self._exchange(missing)
            self.trained = before + int(sum(distributed.gather_numbers(self.trained - before)))

    def _exchange(self, missing: list[Job]) -> None:
        """Send each rank's newly trained model files to every other rank (bytes, checksummed
        like every stored file)."""
        for src in range(distributed.world_size()):
            files = None
            if distributed.rank() == src:
                ours = missing[src::distributed.world_size()]
                files = {self.path(j).name: self.path(j).read_bytes() for j in ours}
            files = distributed.broadcast_object(files, src=src)
            if distributed.rank() != src:
                self.folder.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    if not (self.folder / name).is_file():  # absent unless the folder is shared
                        io.write_bytes_atomic(self.folder / name, lambda data=data: data)


def test_logits(model: nn.Module, x: Tensor) -> Tensor:
    """(n, C) float64 logits of ``model`` (a float64 copy, eval mode) on ``x``, on the CPU."""
    net = copy.deepcopy(model).eval().to(dtype=torch.float64)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    out = []
    with torch.no_grad():
        for chunk in x.split(1024):
            out.append(net(chunk.to(device, torch.float64)).cpu())
    return torch.cat(out)


def targets(logits: Tensor, y: Tensor, target: str) -> np.ndarray:
    """(n,) target f from logits, higher is better: −cross-entropy (``"loss"``) or the
    correct-class margin log(p_y / (1 − p_y)) = z_y − logsumexp_{c≠y} z_c (``"margin"``)."""
    logits = logits.to(torch.float64)
    y = y.to(logits.device).long()
    if target == "loss":
        return (-torch.nn.functional.cross_entropy(logits, y, reduction="none")).numpy()
    if target == "margin":
        return margin(logits, y).numpy()
    raise ValueError(f"unknown target {target!r}; use 'loss' or 'margin'")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """(n,) correct-class margin z_y − logsumexp_{c≠y} z_c (TRAK's and dattri's margin)."""
    correct = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)
