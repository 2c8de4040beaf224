"""An evaluation run: ground truth by retraining, then every attribution method scored against it.

``DIR/results.json`` holds ``config``, ``config_hash``, ``ground_truth`` (retrain counts, the
ground truth's own noise) and ``cells`` (one per method × sample size × seed × damping), rewritten
atomically after every cell; retrained models live under ``DIR/ground-truth/<key>/``
(:class:`~repif.studies.evaluation.ground_truth.ModelStore`). The output-directory conventions
are the class-removal study's (docs/design.md, "Failure behaviour"): one run at a time holds the
lock, a re-run resumes (finished cells and cached models are reused), results of another
configuration are merged into ``results.<hash>.json`` and resumed from there, and a damaged or
hand-edited results file is refused naming the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from repif import io
from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.estimator import InfluenceEstimator
from repif.studies import runs
from repif.studies.class_removal.config import SHRINK_SUFFIX, split_sampler
from repif.studies.class_removal.study import (
    StudyEnvironmentError,
    StudyError,
    check_device,
    check_output_dir,
    out_of_range,
)
from repif.studies.evaluation import scores
from repif.studies.evaluation.ground_truth import Job, ModelStore, Recipe, lds_subsets, targets
from repif.studies.resources import measure
from repif.studies.runs import OutputLock
from repif.task import ClassificationTask, Task
from repif.validation import dataclass_from_dict

log = logging.getLogger("repif.studies.evaluation")

METRICS = ("lds", "loo")
#: What a LOO cell reports besides the per-test correlation, under each convention.
LOO_EXTRAS = ("pooled", "slope", "median_rel_error")
TARGETS = ("loss", "margin")

#: Baselines by name → (curvature, solver): no curvature at all. TracIn at the final checkpoint
#: only is this gradient dot product times the learning rate, so its LDS and LOO are the same.
BASELINES = {"grad-dot": ("ggn", "identity")}

#: Fields that only say which cells exist (or what else is reported), not what a cell holds.
_GRID_FIELDS = ("methods", "sizes", "seeds", "dampings", "noise")


class EvaluationError(StudyError, ValueError):
    """An evaluation cannot run as configured (bad input: exit code 2); the message names the
    fix."""


@dataclass(frozen=True)
class Method:
    """An attribution method: ``[curvature:]solver[+key=value…][@sampler[+shrink]]`` or a
    baseline name.

    Without ``@sampler`` the curvature uses the whole training set; with it, a subset of each
    of the run's sample sizes drawn by that sampler (one cell per seed). ``+key=value`` after
    the solver passes a solver option (numbers read as numbers), e.g.
    ``ggn:woodbury+prior=ekfac@logit-importance``; after the sampler it passes a sampler
    option, e.g. ``@logit-importance+proxy=gini-feature``.
    """

    spec: str
    curvature: str
    solver: str
    sampler: str | None = None
    shrinkage: float | str = 0.0
    solver_options: tuple[tuple[str, Any], ...] = ()
    sampler_options: tuple[tuple[str, Any], ...] = ()

    @property
    def sampled(self) -> bool:
        return self.sampler is not None

    @property
    def uses_damping(self) -> bool:
        return self.solver != "identity"


def parse_method(spec: str) -> Method:
    """A :class:`Method` from its name; ValueError listing the known parts for a bad one."""
    s = spec.strip()
    if s in BASELINES:
        return Method(s, *BASELINES[s])
    body, at, sampler = s.partition("@")
    curvature, colon, solver = body.rpartition(":")
    curvature = curvature if colon else "ggn"
    solver, *option_parts = solver.split("+")
    options = _key_values(spec, option_parts, "solver")
    if curvature not in curvature_kinds.names():
        raise ValueError(f"method {spec!r}: unknown curvature {curvature!r}; known: "
                         f"{', '.join(curvature_kinds.names())} (write e.g. ggn:direct or "
                         "ggn:woodbury@logit-importance)")
    if solver not in _solvers.names():
        raise ValueError(f"method {spec!r}: unknown solver {solver!r}; known: "
                         f"{', '.join(_solvers.names())}; baselines: {', '.join(BASELINES)}")
    try:
        _solvers.check_curvature(curvature, solver, lambda k, v: f"{k} {v}")
    except ValueError as err:
        raise ValueError(f"method {spec!r}: {err} (methods are written curvature:solver, "
                         "e.g. ekfac:eigen or ggn:cg)") from None
    if options:
        try:
            _solvers.build(solver, dict(options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {spec!r}: {err}") from None
    opts = tuple(options)
    if not at:
        return Method(s, curvature, solver, solver_options=opts)
    sampler_parts = sampler.split("+")
    keyed = [p for p in sampler_parts[1:] if "=" in p]
    sampler = "+".join(p for p in sampler_parts if "=" not in p)
    name, shrinkage = split_sampler(sampler)
    if name not in _samplers.names():
        raise ValueError(f"method {spec!r}: unknown sampler {name!r}; known: "
                         f"{', '.join(_samplers.names())} (append {SHRINK_SUFFIX} for the "
                         "shrinkage fill)")
    sampler_options = _key_values(spec, keyed, "sampler")
    if sampler_options:
        try:
            _samplers.build(name, dict(sampler_options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {spec!r}: {err}") from None
    return Method(s, curvature, solver, name, shrinkage, opts, tuple(sampler_options))


def _key_values(spec: str, parts: list[str], what: str) -> list[tuple[str, Any]]:
    """``key=value`` parts of a method spec as (key, value) pairs."""
    out = []
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"method {spec!r}: {what} option {part!r} is not key=value (write "
                             "e.g. ggn:woodbury+prior=ekfac@logit-importance+proxy=gini-feature)")
        out.append((key, _option_value(value)))
    return out


def _option_value(text: str) -> Any:
    """A solver option's value from a method spec: an int, a float, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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


def cell_key(row: dict[str, Any]) -> tuple[str, int, int, float]:
    return row["method"], row["sample_size"], row["seed"], float(row["damping"])


class MarginTask(ClassificationTask):
    """Cross-entropy training objective with the correct-class margin
    z_y − logsumexp_{c≠y} z_c as the query measured at test points."""

    def query_from_output(self, output: Tensor, y: Tensor) -> Tensor:
        from repif.studies.evaluation.ground_truth import margin

        return margin(output, y)


# --------------------------------------------------------------------------- results file
_HASH_CHARS = set("0123456789abcdef")

#: The values a stored cell field can take: LDS (Spearman) and LOO (Pearson) scores are means
#: of correlations, in [−1, 1] like the pooled correlations; standard errors, dampings, times
#: and bytes are ≥ 0. Anything else in a results file was edited or damaged.
CELL_RANGES: dict[str, tuple[float, float]] = {
    "score": (-1.0, 1.0), "pooled": (-1.0, 1.0), "pooled_reweight": (-1.0, 1.0),
    "score_se": (0.0, math.inf), "damping": (0.0, math.inf), "time_s": (0.0, math.inf),
    "fit_time_s": (0.0, math.inf), "peak_mem_bytes": (0.0, math.inf),
}


def check_results(obj: Any, path: Path) -> dict[str, Any]:
    """``obj`` if it has the evaluation results schema, else EvaluationError naming the first
    bad entry (a damaged or hand-edited file is refused, never half-used)."""

    def bad(what: str) -> EvaluationError:
        return EvaluationError(f"{path}: {what}; the file was edited or damaged: restore it "
                               "(results.<hash>.json may hold an earlier copy) or move it away "
                               "to start afresh")

    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {type(obj).__name__}, not an object")
    h = obj.get("config_hash")
    if not isinstance(h, str) or not h or not set(h) <= _HASH_CHARS:
        raise bad(f"'config_hash' is {h!r}, not a hexadecimal hash")
    if not isinstance(obj.get("cells"), list):
        raise bad("'cells' is not a list")
    seen: set[tuple] = set()
    for i, c in enumerate(obj["cells"]):
        if not isinstance(c, dict):
            raise bad(f"cells[{i}] is not an object")
        if not isinstance(c.get("method"), str):
            raise bad(f"cells[{i}] has method={c.get('method')!r}, not a name")
        for k in ("sample_size", "seed"):
            if not _is_int(c.get(k)):
                raise bad(f"cells[{i}] has {k}={c.get(k)!r}, not an integer")
        for k in ("damping", "score", "score_se", "time_s", "peak_mem_bytes"):
            v = c.get(k, "(missing)")
            if not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
                raise bad(f"cells[{i}] has {k}={v!r}, not a number or null")
        if c["damping"] is None:
            raise bad(f"cells[{i}] has no damping")
        if (problem := out_of_range(c, CELL_RANGES)) is not None:
            raise bad(f"cells[{i}] has {problem}")
        per_test = c.get("per_test", [])
        if not isinstance(per_test, list):
            raise bad(f"cells[{i}] has per_test={per_test!r}, not a list")
        for t, v in enumerate(per_test):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad(f"cells[{i}] has per_test[{t}]={v!r}, not a number or null")
            if v is not None and (problem := out_of_range({"score": v}, CELL_RANGES)):
                raise bad(f"cells[{i}] has per_test[{t}]: {problem}")
        if cell_key(c) in seen:
            raise bad(f"cells[{i}] repeats the cell {cell_key(c)}")
        seen.add(cell_key(c))
    return obj


def read_results(path: Path) -> dict[str, Any]:
    try:
        obj = io.read_json(path)
    except ValueError as err:
        raise EvaluationError(f"{path} is corrupt ({err}); move it away or delete it to start "
                              "afresh") from err
    return check_results(obj, path)


def merge_results(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Cells of both (same hash), ``newer``'s winning where both have one."""
    cells = {cell_key(c): c for c in older["cells"]}
    cells.update({cell_key(c): c for c in newer["cells"]})
    merged = {**older, **newer}
    merged["cells"] = list(cells.values())
    return merged


# --------------------------------------------------------------------------- the run
class Evaluation:
    """Runs one :class:`EvaluationConfig` into an output directory (see module doc).

    The data and recipe default to the config's built-in ones (``repif.datasets.load`` and
    ``Recipe.builtin``); pass ``data=(train, test)`` (``(x, y)`` tensors each) and/or a
    :class:`Recipe` to evaluate your own. ``config.dataset`` then only labels the run.
    """

    def __init__(self, config: EvaluationConfig, out: str | Path, *,
                 data: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                 recipe: Recipe | None = None, progress: bool = True,
                 max_memory: int | None = None) -> None:
        config.validate()
        self.config, self.out, self.progress = config, Path(out), progress
        #: The estimators' memory budget in bytes (None: their default); it changes how work
        #: is chunked and what is refused, not a cell's numbers, so it is not in the config.
        self.max_memory = max_memory
        self.device = check_device(config.device)
        check_output_dir(self.out)
        self.dtype = getattr(torch, config.dtype)
        self._data, self._recipe = data, recipe
        self._lock = OutputLock(self.out)

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        c = self.config
        if self._data is None:
            from repif import datasets

            first = c.first and (c.limit_train or c.limit_test)
            ds = datasets.load(c.dataset, c.data_dir, seed=c.train_seed,
                               limit_train=None if first else c.limit_train,
                               limit_test=None if first else c.limit_test)
            train, test = ds.train, ds.test
            if first:
                train = tuple(t[: c.limit_train].contiguous() for t in train)
                test = tuple(t[: c.limit_test].contiguous() for t in test)
            self.shape = ds
        else:
            (train, test) = self._data
            self.shape = None
        self.train = (torch.as_tensor(train[0]), torch.as_tensor(train[1]).long())
        self.test = (torch.as_tensor(test[0]), torch.as_tensor(test[1]).long())
        n, n_test = len(self.train[1]), len(self.test[1])
        if self._recipe is None:
            if self.shape is None:
                raise EvaluationError("custom data need a Recipe (how to build and train a "
                                      "model); pass recipe=Recipe.from_functions(build, fit)")
            self.recipe = Recipe.builtin(
                c.model, self.shape, hidden=c.hidden, epochs=c.epochs, lr=c.lr,
                batch_size=c.batch_size, weight_decay=c.weight_decay, optimizer=c.optimizer,
                momentum=c.momentum, schedule=c.schedule, device=self.device)
        else:
            self.recipe = self._recipe
        self.test_idx = self._test_indices(n_test)
        too_big = [m for m in c.sizes if m > n] if any(
            m.sampled for m in c.parsed_methods()) else []
        if too_big:
            raise EvaluationError(f"sample size {too_big[0]} exceeds the {n} training points; "
                                  "use smaller --sizes")
        if c.metric == "lds":
            self.masks = lds_subsets(n, c.subsets, c.fraction, c.subset_seed)
        else:
            self.loo_idx = self._loo_indices(n)
        self.store = ModelStore(self.out / "ground-truth", self.recipe, self.train, self.test,
                                progress=self.progress)

    def _test_indices(self, n_test: int) -> np.ndarray:
        tp = self.config.test_points
        if tp is None:
            return np.arange(n_test)
        idx = np.asarray(tp, dtype=np.int64)
        if idx.size == 0:
            raise EvaluationError("--test-points is empty; leave it out to use every test point")
        bad = idx[(idx < 0) | (idx >= n_test)]
        if bad.size:
            raise EvaluationError(f"test index {int(bad[0])} is outside [0, {n_test}) (the test "
                                  f"set has {n_test} points); pass indices from 0 to "
                                  f"{n_test - 1}")
        if np.unique(idx).size != idx.size:
            raise EvaluationError("--test-points lists a test index twice; list each once")
        return idx

    def _loo_indices(self, n: int) -> np.ndarray:
        lp = self.config.loo_points
        if lp is None:
            return np.arange(n)
        if _is_int(lp):
            if not 2 <= lp <= n:
                raise EvaluationError(f"--loo-points {lp}: leave-one-out needs between 2 and "
                                      f"{n} points (the training set has {n})")
            return np.sort(np.random.default_rng([self.config.subset_seed, 1]).choice(
                n, lp, replace=False))
        idx = np.asarray(lp, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise EvaluationError(f"training index {int(bad[0])} is outside [0, {n}) (the "
                                  f"training set has {n} points); pass indices from 0 to {n - 1}")
        if idx.size < 2 or np.unique(idx).size != idx.size:
            raise EvaluationError("--loo-indices needs at least 2 distinct training indices")
        return np.sort(idx)

    def cell_hash(self) -> str:
        """Hash of what changes a cell's numbers: the config less its grid, and the recipe
        and data (through the model store's key)."""
        d = {k: v for k, v in self.config.to_dict().items() if k not in _GRID_FIELDS}
        d["ground_truth_key"] = self.store.key_hash
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ ground truth
    def _gt_seeds(self) -> list[int]:
        return list(range(self.config.gt_seeds))

    def _noise_seed(self) -> int | None:
        return self.config.gt_seeds if self.config.noise else None

    def _jobs(self) -> list[Job]:
        c, n = self.config, len(self.train[1])
        seeds = self._gt_seeds() + ([self._noise_seed()] if c.noise else [])
        everything = np.arange(n)
        jobs = [Job("full", everything, c.train_seed, "attributed model")]
        if c.metric == "lds":
            for k, mask in enumerate(self.masks):
                jobs += [Job("subset", np.flatnonzero(mask), s, f"subset {k} seed {s}")
                         for s in seeds]
        else:
            for s in seeds:
                jobs.append(Job("full", everything, s, f"full seed {s}"))
                jobs += [Job("loo", np.delete(everything, j), s, f"without {j} seed {s}")
                         for j in self.loo_idx]
        return jobs

    def _targets(self, job: Job) -> np.ndarray:
        return targets(self.store.logits(job), self.test[1], self.config.target)[self.test_idx]

    def ground_truth(self) -> dict[str, Any]:
        """Retrain what is missing, then the ground truth (``values``: (T, S) targets per
        subset, or (T, k) changes per left-out point, averaged over the ground-truth seeds)
        and its own noise (``reliability``: the metric of an independent seed against it)."""
        c = self.config
        jobs = self._jobs()
        with measure("cpu") as m:
            self.store.run(jobs, "ground truth")
        n = len(self.train[1])
        everything = np.arange(n)

        def values(seed: int) -> np.ndarray:
            if c.metric == "lds":
                return np.stack([self._targets(Job("subset", np.flatnonzero(mask), seed))
                                 for mask in self.masks], axis=1)
            full = self._targets(Job("full", everything, seed))
            return np.stack([self._targets(Job("loo", np.delete(everything, j), seed)) - full
                             for j in self.loo_idx], axis=1)

        gt = np.mean([values(s) for s in self._gt_seeds()], axis=0)
        info: dict[str, Any] = {
            "retrains": len(jobs), "trained_now": self.store.trained, "time_s": m.time_s,
            "n_train": n, "n_test": int(self.test_idx.size),
            "store": str(self.store.folder.relative_to(self.out)),
        }
        if c.metric == "lds":
            info["subset_size"] = int(self.masks[0].sum())
        else:
            info["loo_points"] = int(self.loo_idx.size)
        full = self.store.logits(Job("full", everything, c.train_seed))
        info["attributed_model_test_accuracy"] = float(
            (full.argmax(1) == self.test[1]).double().mean())
        noise = self._noise_seed()
        if noise is not None:
            other = values(noise)
            rel = (scores.spearman_rows(other, gt) if c.metric == "lds"
                   else scores.pearson_rows(other, gt))
            s = scores.summary(rel)
            k = c.gt_seeds
            r = s["mean"]
            # Spearman–Brown: reliability of the K-seed mean; a perfect predictor of the
            # expected target correlates with the ground truth by about its square root
            avg = k * r / (1 + (k - 1) * r) if math.isfinite(r) and r > -1 / k else float("nan")
            info["reliability"] = {"mean": r, "se": s["se"], "seed": noise,
                                   "ceiling": math.sqrt(avg) if avg >= 0 else float("nan")}
        self.gt = gt
        return info

    # ------------------------------------------------------------------ cells
    def _task(self) -> Task:
        wd = self.recipe.weight_decay
        if self.config.target == "margin":
            return MarginTask(weight_decay=wd)
        return ClassificationTask(weight_decay=wd)

    def _cell(self, method: Method, size: int, seed: int, damping: float) -> dict[str, Any]:
        c = self.config
        train = (self.train[0].to(self.dtype), self.train[1])
        test = (self.test[0][torch.from_numpy(self.test_idx)].to(self.dtype),
                self.test[1][torch.from_numpy(self.test_idx)])
        with measure(self.device) as meas:
            est = InfluenceEstimator(
                self.model, train, curvature=method.curvature, damping=damping,
                solver=method.solver, sampler=method.sampler or "random",
                sample_size=size or None, seed=seed, shrinkage=method.shrinkage,
                task=self._task(), device=self.device, max_memory=self.max_memory,
                solver_options=dict(method.solver_options),
                # a Woodbury prior is the same fit for every cell: cached beside the run
                kronecker_options=({"cache_dir": str(self.out / "factors")}
                                   if dict(method.solver_options).get("prior") else None),
                sampler_options=dict(method.sampler_options)).fit()
            fit_s = sum(est.timings.values())
            influence = est.influence(test)
        tau = scores.orient(influence.numpy(), c.target)
        row: dict[str, Any] = {
            "method": method.spec, "curvature": method.curvature, "solver": method.solver,
            "sampler": method.sampler, "sample_size": size, "seed": seed, "damping": damping,
        }
        if c.metric == "lds":
            per_test = scores.lds(tau, self.masks, self.gt)
            row.update(_summary_fields(per_test))
        else:
            pred = scores.loo_predicted(tau, self.loo_idx, "retrain")
            res = scores.loo_scores(pred, self.gt)
            row.update(_summary_fields(res["per_test"]))
            other = scores.loo_scores(scores.loo_predicted(tau, self.loo_idx, "reweight"),
                                      self.gt)
            for k in LOO_EXTRAS:  # both conventions; the "retrain" one matches the ground truth
                row[k], row[f"{k}_reweight"] = res[k], other[k]
        row.update({"time_s": meas.time_s, "fit_time_s": fit_s,
                    "peak_mem_bytes": meas.peak_mem_bytes, "memory_method": meas.method})
        return row

    # ------------------------------------------------------------------ output directory
    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the output directory's lock (re-entrant); clears temporaries left by killed
        writes, which only the lock holder may do."""
        return runs.locked_run(self._lock, self.out, [
            (self.out, False), (self.out / "ground-truth", True)], StudyEnvironmentError)

    def _previous(self, h: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        path = self.out / "results.json"
        stored: dict[str, Any] = {"config": self.config.to_dict(), "config_hash": h, "cells": []}
        current = read_results(path) if path.exists() else None
        stale = None
        if current is not None and current["config_hash"] == h:
            stored = current
        else:
            stale = current
        backup = self.out / f"results.{h}.json"
        if backup.exists():
            try:
                stored = merge_results(read_results(backup), stored)
            except EvaluationError as err:
                log.warning("ignoring the unreadable backup %s (%s); it is kept as it is",
                            backup, err)
        stored["config"], stored["config_hash"] = self.config.to_dict(), h
        return stored, stale

    def _back_up(self, stale: dict[str, Any]) -> None:
        runs.back_up(self.out, stale, read_results, merge_results, EvaluationError)

    def run(self) -> dict[str, Any]:
        """Train (or load) the ground truth, then score every cell not yet done; returns the
        results restricted to this run's grid."""
        with self.locked():
            return self._run()

    def _run(self) -> dict[str, Any]:
        c = self.config
        self._load()
        h = self.cell_hash()
        results, stale = self._previous(h)
        if stale is not None:
            self._back_up(stale)
        path = self.out / "results.json"
        results["ground_truth"] = self.ground_truth()
        io.write_json_atomic(path, results)
        self.model = self.store.model(Job("full", np.arange(len(self.train[1])), c.train_seed))
        self.model = self.model.to(self.device, self.dtype)
        grid = c.cells()
        methods = {m.spec: m for m in c.parsed_methods()}
        rows = {cell_key(r): r for r in results["cells"]}
        todo = [k for k in grid if k not in rows]
        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="methods",
                   disable=not self.progress)
        for key in todo:
            spec, size, seed, damping = key
            bar.set_postfix_str(f"{spec} m={size or 'all'} seed={seed} λ={damping:g}")
            row = self._cell(methods[spec], size, seed, damping)
            results["cells"].append(row)
            rows[key] = row
            io.write_json_atomic(path, results)
            bar.update()
        bar.close()
        results["environment"] = io.environment_metadata()
        results["num_params"] = sum(p.numel() for p in self.model.parameters()
                                    if p.requires_grad)
        io.write_json_atomic(path, results)
        view = dict(results)
        wanted = set(grid)
        view["cells"] = [r for r in results["cells"] if cell_key(r) in wanted]
        return view


def _summary_fields(per_test: np.ndarray) -> dict[str, Any]:
    s = scores.summary(per_test)
    return {"score": s["mean"], "score_se": s["se"], "n_test": s["n"],
            "n_undefined": s["n_undefined"],
            "per_test": [None if not math.isfinite(v) else round(float(v), 5)
                         for v in per_test]}
