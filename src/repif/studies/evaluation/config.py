"""An evaluation's configuration (:class:`EvaluationConfig`): a typed dataclass saved as JSON
beside the results, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from repif.studies.evaluation.methods import Method, parse_method
from repif.studies.runs import StudyError
from repif.validation import dataclass_from_dict

METRICS = ("lds", "loo")
TARGETS = ("loss", "margin")

#: Fields that only say which cells exist (or what else is reported), not what a cell holds.
_GRID_FIELDS = ("methods", "sizes", "seeds", "dampings", "noise")
#: Fields that say where the inputs lie, not what they are (the data count by their digests).
_LOCATION_FIELDS = ("data_dir",)


class EvaluationError(StudyError, ValueError):
    """An evaluation cannot run as configured (bad input: exit code 2); the message names the
    fix."""


@dataclass
class EvaluationConfig:
    """Everything an evaluation depends on (``seeds`` is a count: 0…seeds−1)."""

    dataset: str = "digits"
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    first: bool = False  # take the first limit_train / limit_test points, not a stratified subset
    model: str = "mlp"
    hidden: int | list[int] | None = None
    epochs: int = 30
    lr: float | None = None
    batch_size: int = 64
    weight_decay: float = 1e-3
    optimizer: str = "adam"
    momentum: float | None = None
    schedule: str = "constant"
    train_seed: int = 0  # the attributed model's seed (it is trained on every training point)
    metric: str = "lds"
    target: str = "loss"
    subsets: int = 50
    fraction: float = 0.5
    gt_seeds: int = 1  # K: ground-truth retrains per subset (or per left-out point), averaged
    subset_seed: int = 0
    noise: bool = True  # one extra retraining seed, to measure the ground truth's own noise
    loo_points: int | list[int] | None = None  # LOO: all points, a random count, or these
    test_points: list[int] | None = None
    methods: list[str] = field(default_factory=lambda: ["ggn:direct", "grad-dot"])
    sizes: list[int] = field(default_factory=lambda: [64])
    seeds: int = 1
    dampings: list[float] = field(default_factory=lambda: [0.01])
    dtype: str = "float64"
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.validate()  # a bad field is refused when the config is made, not mid-run

    def validate(self) -> None:
        """ValueError naming the first bad field and the fix (data-dependent checks — sizes,
        indices, subset sizes — happen when the data are loaded)."""
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use --metric lds or --metric loo")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; use --target loss or margin")
        if not self.methods:
            raise ValueError("--methods names no method; pass e.g. --methods ggn:direct,grad-dot")
        parsed = [parse_method(m) for m in self.methods]
        _once([m.spec for m in parsed], "--methods", "method")
        if any(m.sampled for m in parsed):
            if not self.sizes or any(not _is_int(m) or m < 1 for m in self.sizes):
                raise ValueError(f"--sizes must be positive integers, got {self.sizes}")
            _once(self.sizes, "--sizes", "size")
        if not _is_int(self.seeds) or self.seeds < 1:
            raise ValueError(f"--seeds must be a positive count, got {self.seeds!r}")
        if not self.dampings or any(not _finite(d) or d < 0 for d in self.dampings):
            raise ValueError(f"--dampings must be finite numbers ≥ 0, got {self.dampings}; "
                             "e.g. --dampings 0.001,0.01,0.1")
        _once(self.dampings, "--dampings", "damping")
        if not _is_int(self.gt_seeds) or self.gt_seeds < 1:
            raise ValueError(f"--gt-seeds must be a positive count, got {self.gt_seeds!r}")
        if self.metric == "lds":
            if not _finite(self.fraction) or not 0 < self.fraction < 1:
                raise ValueError(f"the subset fraction must be in (0, 1), got {self.fraction!r};"
                                 " pass e.g. --fraction 0.5 (each subset holds half the "
                                 "training points)")
            from repif.studies.evaluation.ground_truth import MIN_SUBSETS
            if not _is_int(self.subsets) or self.subsets < MIN_SUBSETS:
                raise ValueError(f"LDS needs at least {MIN_SUBSETS} subsets, got "
                                 f"{self.subsets!r}; pass e.g. --subsets 50 (a rank correlation "
                                 "over fewer is mostly noise)")
        for flag, value in (("--limit-train", self.limit_train),
                            ("--limit-test", self.limit_test)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{flag} must be a positive number of points, got {value!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be a finite number ≥ 0, got "
                             f"{self.weight_decay!r}")
        if self.lr is not None and not (_finite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}; e.g. --lr 0.01 "
                             "(or leave it out for the model's default)")
        for flag, seed in (("--train-seed", self.train_seed), ("--subset-seed", self.subset_seed)):
            if not _is_int(seed) or seed < 0:
                raise ValueError(f"{flag} must be a whole number ≥ 0, got {seed!r}")
        widths = self.hidden if isinstance(self.hidden, (list, tuple)) else [self.hidden]
        if self.hidden is not None and (not widths or not all(
                _is_int(w) and w >= 1 for w in widths)):
            raise ValueError(f"--hidden must be positive widths (e.g. 128 or [128, 64]), got "
                             f"{self.hidden!r}")
        if not _is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"--epochs must be a whole number ≥ 0, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        lp = self.loo_points
        if lp is not None and not (_is_int(lp) or (
                isinstance(lp, (list, tuple)) and all(_is_int(i) for i in lp))):
            raise ValueError(f"loo_points must be a count of training points (an integer, "
                             f"--loo-points) or a list of training indices (--loo-indices), got "
                             f"{lp!r}; pass e.g. 20 or [3, 17, 42]")
        tp = self.test_points
        if tp is not None and not (isinstance(tp, (list, tuple)) and all(_is_int(i) for i in tp)):
            raise ValueError(f"test_points must be a list of test indices (integers), got "
                             f"{tp!r}; pass e.g. [0, 1, 2], or None for every test point")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationConfig:
        """The configuration stored in a results file; an unknown key is a ValueError naming
        it."""
        return dataclass_from_dict(cls, d, "the evaluation configuration")

    def parsed_methods(self) -> list[Method]:
        return [parse_method(m) for m in self.methods]

    def cells(self) -> list[tuple[str, int, int, float]]:
        """Every cell (method, sample size (0: whole pool), seed, damping) of the grid, in run
        order: baselines, whole-pool methods, then sampled ones by size and seed (methods
        innermost, so drifting machine load hits them alike)."""
        out: list[tuple[str, int, int, float]] = []
        methods = self.parsed_methods()
        for m in methods:  # no curvature (grad-dot): no damping, no sample to depend on
            if not m.uses_damping:
                out.append((m.spec, 0, 0, 0.0))
        for d in self.dampings:
            out += [(m.spec, 0, 0, float(d)) for m in methods
                    if m.uses_damping and not m.sampled]
        for size in self.sizes:
            for seed in range(self.seeds):
                for d in self.dampings:
                    out += [(m.spec, size, seed, float(d)) for m in methods
                            if m.sampled and m.uses_damping]
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _once(values: list[Any], flag: str, what: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{flag} lists {what} {v!r} twice; list each once")
        seen.add(v)
