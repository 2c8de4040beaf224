"""Pool statistics recorded while a model trains, so the logit and feature samplers need no pass.

A logit/feature sampler reads every pool point's logits and penultimate features. A training
loop computes the logits of every point once per epoch anyway: :class:`StatisticsRecorder` keeps
them (and the features, captured by a forward hook on the task's feature module, the input of
the last ``nn.Linear`` by default), keyed by dataset index, at the cost of a copy per batch.
``repif.train(..., record_statistics=True)`` records its last epoch; a user's own loop adds one
line per batch. The result, :class:`PoolStatistics`, goes to ``InfluenceEstimator(...,
pool_statistics=...)``.

What recording costs in faithfulness: the weights move during the epoch, so a point seen early
has logits of slightly older weights, and a model with BatchNorm or dropout records them in
training mode (batch statistics, dropped units), not the eval mode the influence computations
use. The samplers only rank points by these statistics (docs/design.md, "Samplers"), so they
tolerate small differences; ``benchmarks/recorded_statistics.py`` measures the subset overlap,
inverse-HVP error and removal F1 against a fresh pass. Statistics carry a digest of the model
they were finished with: an estimator of another model refuses them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repif.task import ClassificationTask, Task

#: The attribute under which ``repif.train(..., record_statistics=True)`` leaves the recorded
#: :class:`PoolStatistics` on the model it returns.
ATTRIBUTE = "repif_statistics"


def module_digest(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes and values of parameters and buffers): which
    model a set of statistics belongs to. Floating-point values are hashed as float64, so a
    model cast up after training (``.double()``, exact) keeps its digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        t = (t.double() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PoolStatistics:
    """(n, C) logits, (n, d) penultimate features and (n,) targets of n training points, in
    dataset order, on the CPU; ``model_digest`` names the model they belong to (None: any) and
    ``origin`` how they were made ("pass" or "recorded"). Unpacks as (logits, features,
    targets), the form ``InfluenceEstimator.pool_statistics()`` returns."""

    logits: Tensor
    features: Tensor
    targets: Tensor
    model_digest: str | None = None
    origin: str = "recorded"

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.logits, self.features, self.targets))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> Tensor:
        return (self.logits, self.features, self.targets)[i]

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless these statistics were recorded for ``model``'s weights."""
        if self.model_digest is not None and self.model_digest != module_digest(model):
            raise ValueError(
                f"these pool statistics ({self.origin}) belong to another model (its weights "
                "differ from the estimator's, e.g. trained further or on other data): record "
                "them with the model you pass, or leave pool_statistics unset for a fresh pass"
            )


class StatisticsRecorder:
    """Keeps each training point's logits and features as a training loop computes them.

    ``n`` is the number of training points; ``model`` the module being trained (a forward hook
    on ``task.feature_module(model)`` captures the features of every forward while the recorder
    is open). Call :meth:`record` after each forward with the batch's dataset indices, the
    model's outputs and the targets; a point recorded twice keeps its latest values. Call
    :meth:`statistics` when done (it closes the recorder). Usable as a context manager.
    """

    def __init__(self, n: int, model: nn.Module, task: Task | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be the number of training points (≥ 1), got {n!r}")
        self.n = n
        self._logits: Tensor | None = None
        self._features: Tensor | None = None
        self._targets: Tensor | None = None
        self._seen = torch.zeros(n, dtype=torch.bool)
        self._last_features: Tensor | None = None
        module = (task or ClassificationTask()).feature_module(model)
        self._hook = module.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, inputs: tuple, _output: Tensor) -> None:
        self._last_features = inputs[0].detach().flatten(1)

    def record(self, indices: Tensor, logits: Tensor, targets: Tensor) -> None:
        """Keep batch ``indices`` (b,) dataset indices, ``logits`` (b, C) and ``targets`` (b,),
        with the features of the model's last forward (which must be this batch's)."""
        idx = torch.as_tensor(indices).reshape(-1).cpu().long()
        feats = self._last_features
        if feats is None or feats.shape[0] != idx.numel() or logits.shape[0] != idx.numel():
            raise ValueError(
                f"record() needs the indices, outputs and targets of the batch the model has just "
                f"run: got {idx.numel()} indices, {logits.shape[0]} output rows and features of "
                f"{None if feats is None else feats.shape[0]} points"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise ValueError(f"indices must lie in [0, {self.n}), got {int(idx.min())}…"
                             f"{int(idx.max())}")
        logits = logits.detach().flatten(1).to("cpu", torch.float32)
        feats = feats.to("cpu", torch.float32)
        if self._logits is None:
            self._logits = torch.zeros(self.n, logits.shape[1])
            self._features = torch.zeros(self.n, feats.shape[1])
            self._targets = torch.zeros(self.n, dtype=torch.as_tensor(targets).dtype)
        assert self._features is not None and self._targets is not None
        self._logits[idx] = logits
        self._features[idx] = feats
        self._targets[idx] = torch.as_tensor(targets).detach().cpu()
        self._seen[idx] = True
        self._last_features = None

    def close(self) -> None:
        """Stop capturing features (idempotent)."""
        self._hook.remove()

    def statistics(self, model: nn.Module | None = None) -> PoolStatistics:
        """The recorded statistics, stamped with ``model``'s digest (pass the trained model, at
        the weights the estimator will use); every point must have been recorded."""
        self.close()
        missing = int((~self._seen).sum())
        if missing or self._logits is None:
            raise ValueError(
                f"{missing} of {self.n} training points were never recorded: call record() for "
                "every batch of an epoch that covers the whole training set"
            )
        assert self._features is not None and self._targets is not None
        digest = module_digest(model) if model is not None else None
        return PoolStatistics(self._logits, self._features, self._targets, digest)

    def __enter__(self) -> StatisticsRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recorded_statistics(model: nn.Module, n_train: int) -> PoolStatistics | None:
    """Statistics recorded while ``model`` trained (``repif.train(...,
    record_statistics=True)``), if they belong to its weights and hold one row per each of the
    ``n_train`` training points; else None (the samplers make their own pass)."""
    recorded = getattr(model, ATTRIBUTE, None)
    if not isinstance(recorded, PoolStatistics) or len(recorded.targets) != n_train:
        return None
    if recorded.model_digest is None or recorded.model_digest != module_digest(model):
        return None
    return recorded


def resolve_statistics(given: PoolStatistics | tuple | None, model: nn.Module, n_train: int
                       ) -> PoolStatistics | tuple | None:
    """The statistics an estimator of ``model`` uses: ``given`` (a :class:`PoolStatistics` is
    checked against the model's weights), else those recorded during training
    (:func:`recorded_statistics`), else None."""
    if given is None:
        return recorded_statistics(model, n_train)
    if isinstance(given, PoolStatistics):
        given.check_model(model)
    return given


def check_statistics_targets(targets: Tensor, training_targets: Tensor | None) -> None:
    """Statistics of other data (same size, other points) would silently steer the sampler:
    their (n,) ``targets`` must equal the ``training_targets`` where those are at hand (None:
    not known without a pass; nothing to check)."""
    mine = training_targets
    if mine is not None and not torch.equal(mine.reshape(-1).cpu(),
                                            targets.reshape(-1).to(mine.dtype)):
        raise ValueError(
            "the pool statistics' targets differ from the training targets: they were "
            "made on other data (or in another order); pass statistics of this training "
            "set, in dataset order, or none"
        )
