"""The class-removal study: for each removed class, sampler, size and seed, one influence update.

Results go to ``DIR/results.json`` (schema in docs/design.md, "Protocol"), rewritten atomically
after every cell; the estimates v_T are kept in ``DIR/vectors/<hash>/`` for the seed spread.
Nothing finished is ever deleted (docs/design.md, "Failure behaviour"):

* re-running the same command resumes: cells whose configuration hash matches are skipped; a run
  with a smaller grid keeps the other finished cells in ``results.json`` and reports only its own;
* results of another configuration are merged into ``results.<hash>.json`` (cells by grid point,
  so a backup only ever grows) and resumed from there when that configuration runs again;
* one run at a time holds ``DIR``'s lock (``DIR/.repif.lock``: PID and host);
* a stored estimate that is missing, damaged (its SHA-256 checksum) or from another
  configuration is recomputed, with a warning; a statistic is never taken over fewer seeds.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repif import datasets, io, models, samplers
from repif.datasets.base import stratified_subset
from repif.estimator import InfluenceEstimator
from repif.metrics import cosine, predict, relative_error, removal_scores
from repif.studies import runs
from repif.studies.class_removal.config import StudyConfig, parse_sampler
from repif.studies.resources import measure
from repif.studies.runs import OutputLock
from repif.training import load_or_train, train
from repif.unlearning import choose_scale, remaining_indices, removal_gradient

log = logging.getLogger("repif.study")

#: The full-pool reference v_R (docs/design.md, "Protocol"): CG to a relative residual of 1e-10
#: (tighter than the usual 1e-8; a dense solve over the whole pool was 40× slower on the digits
#: MLP for the same answer).
REFERENCE_SOLVER = {"solver": "cg", "tol": 1e-10, "max_iter": 10_000}

#: Row fields that measure the machine (time, memory), not the numbers: a re-run or a resume
#: must agree on every other field.
MEASURED_FIELDS = ("time_s", "gradient_s", "peak_mem_bytes", "sample_time_s", "pool_pass_s",
                   "fit_s", "solve_step_s")


class StudyError(RuntimeError):
    """A study cannot run as configured; the message says why and what to do. ``exit_code``:
    what the command line exits with (2: bad input)."""

    exit_code = 2


class StudyEnvironmentError(StudyError):
    """The machine, not the configuration, stops the study: no GPU, the output directory in use
    by another run, a stored file damaged after the run (exit code 1)."""

    exit_code = 1


def check_output_dir(out: Path) -> None:
    """Raise StudyError (bad input) if ``out`` is a file, StudyEnvironmentError if it cannot be
    written to (permissions, a read-only or full file system: the environment)."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"output directory {out} is a file; pass a directory with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=out)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    except OSError as err:
        raise StudyEnvironmentError(
            f"output directory {out} is not writable ({err.strerror}); make it writable or pass "
            "another --out"
        ) from err


def check_device(name: str) -> torch.device:
    """The torch device for ``--device name``; a name torch does not know is bad input
    (StudyError), a CUDA device this machine lacks an environment problem."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise StudyError(
            f"unknown device {name!r}; use --device cpu or --device cuda (cuda:N for GPU N)"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise StudyError(f"--device {name}: only cpu and cuda are supported; use one of them")
    if not torch.cuda.is_available():
        build = ("a build without CUDA" if torch.version.cuda is None
                 else f"CUDA {torch.version.cuda}, but no usable GPU or driver")
        raise StudyEnvironmentError(
            f"--device {name}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
            f"{build}); use --device cpu, or run on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise StudyEnvironmentError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0…cuda:{count - 1}; "
            "pass one of them"
        )
    return dev


# --------------------------------------------------------------------------- results files
#: Fields every cell row carries, as numbers (or null: a NaN in strict JSON).
CELL_METRICS = ("f1", "forget", "consistency", "accuracy_remaining", "ihvp_rel_error",
                "ihvp_cosine", "time_s", "peak_mem_bytes")
#: Fields every reference row carries, as numbers or null.
REFERENCE_METRICS = ("f1", "forget", "consistency", "accuracy_remaining", "time_s",
                     "peak_mem_bytes")
_HASH = re.compile(r"^[0-9a-f]{1,64}$")

#: The values a stored metric can take: fractions of test points (forget, consistency,
#: accuracy) and the F1s made of them lie in [0, 1], a cosine in [−1, 1], errors, times and
#: bytes are ≥ 0. Anything else in a results file was edited or damaged.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "f1": (0.0, 1.0), "f1_literature": (0.0, 1.0), "forget": (0.0, 1.0),
    "consistency": (0.0, 1.0), "accuracy_remaining": (0.0, 1.0), "ihvp_cosine": (-1.0, 1.0),
    "ihvp_rel_error": (0.0, math.inf), "time_s": (0.0, math.inf),
    "peak_mem_bytes": (0.0, math.inf),
}

#: How far past its bound round-off may carry a computed value (a cosine of two nearly equal
#: vectors comes out as 1 + 2e-16); far below any edit that changes a result.
RANGE_SLACK = 1e-9


def out_of_range(row: dict[str, Any], ranges: dict[str, tuple[float, float]]) -> str | None:
    """``"f1=7.5, outside [0, 1]"`` for the first field of ``row`` (numbers or null, already
    checked) that lies outside its range in ``ranges``, or None. NaN (a bare ``NaN`` written
    into the JSON by hand; repif writes null) is outside every range."""
    for k, (lo, hi) in ranges.items():
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
            lo - RANGE_SLACK <= v <= hi + RANGE_SLACK
        ):
            return f"{k}={v!r}, outside [{lo:g}, {hi:g}]"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def ref_key(row: dict[str, Any]) -> tuple[int, str]:
    return row["removed_class"], row["kind"]


def check_results(obj: Any, path: Path) -> dict[str, Any]:
    """``obj`` (read from ``path``) if it has the results schema; else StudyError naming the
    first bad entry. Catches damaged and hand-edited files before anything relies on them."""

    def bad(what: str) -> StudyError:
        return StudyError(
            f"{path}: {what}; the file was edited or damaged: restore it (results.<hash>.json "
            "may hold an earlier copy) or move it away to start the study afresh"
        )

    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {type(obj).__name__}, not an object")
    h = obj.get("config_hash")
    if not isinstance(h, str) or not _HASH.match(h):
        raise bad(f"'config_hash' is {h!r}, not a hexadecimal hash")
    for field in ("references", "cells"):
        if not isinstance(obj.get(field), list):
            raise bad(f"'{field}' is {type(obj.get(field)).__name__}, not a list")
    seen: set[tuple] = set()
    for i, c in enumerate(obj["cells"]):
        if not isinstance(c, dict):
            raise bad(f"cells[{i}] is not an object")
        for k in ("removed_class", "sample_size", "seed"):
            if not _is_int(c.get(k)):
                raise bad(f"cells[{i}] has {k}={c.get(k)!r}, not an integer")
        if not isinstance(c.get("sampler"), str):
            raise bad(f"cells[{i}] has sampler={c.get('sampler')!r}, not a name")
        for k in CELL_METRICS:
            if k not in c or not _is_number(c[k]):
                raise bad(f"cells[{i}] has {k}={c.get(k, '(missing)')!r}, not a number or null")
        if (problem := out_of_range(c, METRIC_RANGES)) is not None:
            raise bad(f"cells[{i}] has {problem}")
        if _key(c) in seen:
            raise bad(f"cells[{i}] repeats the grid point {_key(c)}")
        seen.add(_key(c))
    seen = set()
    for i, r in enumerate(obj["references"]):
        if not isinstance(r, dict):
            raise bad(f"references[{i}] is not an object")
        if not _is_int(r.get("removed_class")) or r.get("kind") not in ("full", "retrain"):
            raise bad(f"references[{i}] has removed_class={r.get('removed_class')!r}, "
                      f"kind={r.get('kind')!r}; expected an integer and 'full' or 'retrain'")
        for k in REFERENCE_METRICS:
            if k not in r or not _is_number(r[k]):
                raise bad(f"references[{i}] has {k}={r.get(k, '(missing)')!r}, not a number "
                          "or null")
        if (problem := out_of_range(r, METRIC_RANGES)) is not None:
            raise bad(f"references[{i}] has {problem}")
        scale = r.get("scale")
        if r["kind"] == "full" and not (
            _is_number(scale) and scale is not None and math.isfinite(scale) and scale > 0
        ):
            raise bad(f"references[{i}] has scale={scale!r}, not a positive number")
        if ref_key(r) in seen:
            raise bad(f"references[{i}] repeats ({r['removed_class']}, {r['kind']!r})")
        seen.add(ref_key(r))
    return obj


def read_results(path: Path) -> dict[str, Any]:
    """A results file, checked (:func:`check_results`); StudyError if unreadable."""
    try:
        obj = io.read_json(path)
    except ValueError as err:
        raise StudyError(
            f"{path} is corrupt or was not written by this version of repif ({err}); move it "
            "away or delete it to start the study afresh"
        ) from err
    return check_results(obj, path)


def merge_results(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """The rows of both (same configuration hash), by grid point; ``newer``'s row wins where
    both have one. Nothing either holds is lost."""
    cells = {_key(c): c for c in older["cells"]}
    cells.update({_key(c): c for c in newer["cells"]})
    refs = {ref_key(r): r for r in older["references"]}
    refs.update({ref_key(r): r for r in newer["references"]})
    merged = {**older, **newer}
    merged["cells"], merged["references"] = list(cells.values()), list(refs.values())
    return merged


def load_previous(out: Path, config: StudyConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Earlier results of this configuration — ``results.json`` if its hash matches, merged
    with the backup ``results.<hash>.json`` of this hash if there is one — or an empty skeleton;
    and, if ``results.json`` holds another configuration, its content, which the caller backs up
    before its first write."""
    path = out / "results.json"
    h = config.cell_hash()
    stored: dict[str, Any] = {"config": config.to_dict(), "config_hash": h,
                              "references": [], "cells": []}
    current = read_results(path) if path.exists() else None
    stale = None
    if current is not None and current["config_hash"] == h:
        stored = current
    else:
        stale = current
    backup = out / f"results.{h}.json"
    if backup.exists():
        try:
            stored = merge_results(read_results(backup), stored)
        except StudyError as err:
            log.warning("ignoring the unreadable backup %s (%s); it is kept as it is", backup,
                        err)
    stored["config"], stored["config_hash"] = config.to_dict(), h
    return stored, stale


class Study:
    """Runs one :class:`StudyConfig` into an output directory (see module doc)."""

    def __init__(self, config: StudyConfig, out: str | Path, *, progress: bool = True) -> None:
        config.validate()
        self.config, self.out, self.progress = config, Path(out), progress
        self.device = check_device(config.device)
        check_output_dir(self.out)
        self.dtype = getattr(torch, config.dtype)
        self.vector_dir = self.out / "vectors" / config.cell_hash()
        self._lock = OutputLock(self.out)
        self._legacy: set[tuple] = set()  # grid points whose flat (pre-hash) vectors are trusted
        self._stats: tuple[Tensor, Tensor, Tensor] | None = None
        self.pool_pass: dict[str, float] = {}
        self.gradient_pass: dict[int, dict[str, float]] = {}  # per removed class

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        c = self.config
        ds = datasets.load(c.dataset, c.data_dir, seed=c.train_seed,
                           limit_train=c.limit_train, limit_test=c.limit_test)
        self.dataset = ds
        x, y = ds.train
        missing = [k for k in c.remove if not 0 <= k < ds.num_classes]
        if missing:
            raise StudyError(
                f"class {missing[0]} does not exist in {ds.name} (classes 0…{ds.num_classes - 1})"
            )
        if len(set(c.remove)) >= ds.num_classes:
            raise StudyError("cannot remove every class: nothing would remain to be consistent on")
        val = torch.zeros(len(y), dtype=torch.bool)
        if c.scale == "auto":
            val[torch.from_numpy(stratified_subset(
                y.numpy(), max(1, int(c.validation_fraction * len(y))), c.train_seed))] = True
        self.train_x, self.train_y = x[~val], y[~val]
        self.val = (x[val], y[val])
        fit_set = copy.copy(ds)
        object.__setattr__(fit_set, "train", (self.train_x, self.train_y))
        cache = self.out / "cache"
        self.model = load_or_train(
            fit_set, c.model, seed=c.train_seed, width=c.width, epochs=c.epochs,
            weight_decay=c.weight_decay, lr=c.lr, batch_size=c.batch_size, cache_dir=cache,
            device=self.device, progress=self.progress,
        ).to(self.device, self.dtype)
        self.test = ds.test
        self.original_test = predict(self.model, self.test[0])
        self.original_val = predict(self.model, self.val[0]) if val.any() else None
        gc.collect()
        gc.freeze()  # later full collections (before each measured cell) skip setup's objects

    def _estimator(self, **kw: Any) -> InfluenceEstimator:
        c = self.config
        return InfluenceEstimator(
            self.model, (self.train_x, self.train_y), curvature=c.curvature, damping=c.damping,
            weight_decay=c.weight_decay, device=self.device, max_memory=c.max_memory,
            kronecker_options=c.kronecker_options() or None, **kw,
        )

    def _pool_statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """The training points' logits, features and targets at θ̂, from one pass made once per
        study (measured; docs/design.md, "Protocol": the pass is charged to every cell whose
        sampler reads them, as if the cell had made it)."""
        if self._stats is None:
            with measure(self.device) as m:
                self._stats = self._estimator(solver=self.config.solver,
                                              progress=self.progress).pool_statistics()
            self.pool_pass = {"time_s": m.time_s, "peak_mem_bytes": m.peak_mem_bytes}
        return self._stats

    def _gradient_pass(self, cls: int, removed: Tensor) -> dict[str, float]:
        """The cost of the removed points' gradient g (a pass over them), measured once per
        class and run. Every cell of the class reuses ``self.g`` (the same g at the same θ̂)
        and is charged this cost in full, as if it had made the pass (docs/design.md,
        "Protocol")."""
        if cls not in self.gradient_pass:
            est = self._estimator(solver=self.config.solver)
            with measure(self.device) as m:
                removal_gradient(est.fitter, removed)
            self.gradient_pass[cls] = {"time_s": m.time_s, "peak_mem_bytes": m.peak_mem_bytes}
        return self.gradient_pass[cls]

    def _scores(self, model: nn.Module, cls: int) -> dict[str, float]:
        pred = predict(model, self.test[0])
        return removal_scores(pred, self.original_test, self.test[1], cls).as_dict()

    # ------------------------------------------------------------------ references
    def _reference(self, cls: int, removed: Tensor, rest: Tensor) -> dict[str, Any]:
        c = self.config
        # exact curvature: CG on the whole pool; Kronecker-factored: its factors on the whole pool
        solver = {"solver": "eigen"} if c.solver == "eigen" else REFERENCE_SOLVER
        with measure(self.device) as m:
            est = self._estimator(progress=self.progress, **solver).fit(rest)
            g = removal_gradient(est.fitter, removed)
            v_full = est.inverse_hvp(g)
        scale = self._pick_scale(est, v_full, cls) if c.scale == "auto" else float(c.scale)
        with measure(self.device) as m2:
            if c.steps == 1:  # the update is θ̂ + η v_R: reuse the solve above
                updated = copy.deepcopy(est.model)
                est.fm.space.set(updated, est.fm.theta + scale * v_full)
            else:
                updated = est.remove(removed, scale=scale, steps=c.steps)
        self.g, self.v_full = g, v_full
        row = {"removed_class": cls, "kind": "full", "scale": scale, "solver": solver["solver"],
               "time_s": m.time_s + m2.time_s,
               "peak_mem_bytes": max(m.peak_mem_bytes, m2.peak_mem_bytes),
               **self._scores(updated, cls)}
        return row

    def _pick_scale(self, est: InfluenceEstimator, v: Tensor, cls: int) -> float:
        """η maximising validation F1 of a one-step update along the full-pool direction
        (:func:`repif.unlearning.choose_scale`, as the API's ``remove(scale="auto")``)."""
        if self.original_val is None or not bool((self.val[1] == cls).any()):
            raise StudyError(f"the validation split has no point of class {cls}; pass --scale")

        def predictions(theta: Tensor) -> Tensor:
            model = copy.deepcopy(est.model)
            est.fm.space.set(model, theta)
            return predict(model, self.val[0])

        return choose_scale(predictions, est.fm.theta, v, self.val[1], self.original_val,
                            [cls])[0]

    def _retrain(self, cls: int, rest: Tensor) -> dict[str, Any]:
        c = self.config
        fresh = models.build(c.model, self.dataset, seed=c.train_seed, width=c.width)
        with measure(self.device) as m:
            model = train(
                fresh, (self.train_x[rest], self.train_y[rest]), epochs=c.epochs,
                batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                seed=c.train_seed, device=self.device, cache_dir=self.out / "cache",
                progress=self.progress,
            ).to(self.dtype)
        return {"removed_class": cls, "kind": "retrain", "time_s": m.time_s,
                "peak_mem_bytes": m.peak_mem_bytes, **self._scores(model, cls)}

    def _num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ cells
    def _cell(self, cls: int, spec: str, m: int, seed: int, removed: Tensor,
              rest: Tensor, scale: float) -> dict[str, Any]:
        c = self.config
        name, shrinkage, candidates = parse_sampler(spec)
        # a whole-pool pass is made once per study and charged to every cell that reads it; a
        # two-phase cell makes its own pass over its candidates, inside the measured block
        uses_stats = samplers.REGISTRY.get(name).uses_statistics and candidates is None
        stats = self._pool_statistics() if uses_stats else None  # outside the measured block
        grad = self._gradient_pass(cls, removed)  # likewise
        with measure(self.device) as meas:
            est = self._estimator(solver=c.solver, sampler=name, sample_size=m, seed=seed,
                                  shrinkage=shrinkage, pool_statistics=stats,
                                  candidates=candidates).fit(rest)
            updated = est.remove(removed, scale=scale, steps=c.steps, gradient=self.g)
        charged = self.pool_pass if uses_stats else {"time_s": 0.0, "peak_mem_bytes": 0}
        if c.steps == 1:  # θ' = θ̂ + η v_T exactly, so no second solve is needed
            v = (est.fm.space.get(updated) - est.fm.theta) / scale
        else:
            v = est.inverse_hvp(self.g)
        io.save_tensors_atomic(self._vector_path(cls, spec, m, seed), {"v": v.cpu()},
                               self._vector_meta((cls, spec, m, seed)))
        return {"removed_class": cls, "sampler": spec, "sample_size": m, "seed": seed,
                **self._scores(updated, cls),
                "ihvp_rel_error": relative_error(v, self.v_full),
                "ihvp_cosine": cosine(v, self.v_full),
                "time_s": meas.time_s + charged["time_s"] + grad["time_s"],
                "peak_mem_bytes": max(meas.peak_mem_bytes, charged["peak_mem_bytes"],
                                      grad["peak_mem_bytes"]),
                "pool_pass_s": charged["time_s"], "gradient_s": grad["time_s"],
                "sample_time_s": est.timings["sample_s"] + charged["time_s"],
                "fit_s": est.timings["solver_fit_s"],
                "solve_step_s": max(0.0, meas.time_s - est.timings["sample_s"]
                                    - est.timings["solver_fit_s"]),
                "scale": scale,
                "memory_method": meas.method}

    def _vector_path(self, cls: int, spec: str, m: int, seed: int) -> Path:
        return self.vector_dir / f"c{cls}_{spec}_m{m}_s{seed}.safetensors"

    def _reference_path(self, cls: int) -> Path:
        return self.vector_dir / f"full_c{cls}.safetensors"

    def _vector_meta(self, key: tuple) -> dict[str, Any]:
        """What a stored vector records about itself, checked when it is read back."""
        return {"config_hash": self.config.cell_hash(), "key": list(key)}

    def _read_vectors(self, path: Path, key: tuple) -> tuple[dict[str, Tensor] | None, str]:
        """The tensors stored at ``path`` for grid point (or reference) ``key``, or None and why
        not: missing, damaged (unreadable or failing its checksum) or another run's."""
        try:
            tensors, meta = io.load_tensors(path)
        except FileNotFoundError:
            legacy = path.parent.parent / path.name  # written before vectors/<hash>/ existed
            if key in self._legacy and legacy.is_file():
                try:
                    tensors, meta = io.load_tensors(legacy)
                except (ValueError, OSError) as err:
                    return None, f"damaged ({err})"
                if meta == {}:
                    io.save_tensors_atomic(path, tensors, self._vector_meta(key))
                    return tensors, ""
            return None, "missing"
        except ValueError as err:
            return None, f"damaged ({err})"
        if meta != self._vector_meta(key):
            return None, f"written by another run (it records {meta})"
        return tensors, ""

    def vectors(self, cls: int, spec: str, m: int) -> list[Tensor]:
        """The stored v_T of every seed of one (class, sampler, size); StudyEnvironmentError if
        any is missing or damaged, so that no statistic is taken over fewer seeds."""
        out = []
        for seed in range(self.config.seeds):
            key = (cls, spec, m, seed)
            path = self._vector_path(*key)
            tensors, why = self._read_vectors(path, key)
            if tensors is None:
                raise StudyEnvironmentError(
                    f"the estimate of cell {key} ({path}) is {why}; re-run the command to "
                    "rebuild it (the seed spread is never computed from fewer seeds)"
                )
            out.append(tensors["v"])
        return out

    # ------------------------------------------------------------------ run
    def _check_grid(self) -> dict[int, tuple[Tensor, Tensor]]:
        """(removed, remaining) training indices per class; raises before anything is written."""
        c, out = self.config, {}
        for cls in c.remove:
            removed = torch.nonzero(self.train_y == cls).flatten()
            if removed.numel() == 0:
                raise StudyError(f"class {cls} has no training points in {c.dataset}")
            rest = remaining_indices(len(self.train_y), removed)
            too_big = [m for m in c.sizes if m > rest.numel()]
            if too_big:
                raise StudyError(f"sample size {too_big[0]} exceeds the {rest.numel()} remaining "
                                 "training points; use smaller --sizes")
            out[cls] = (removed, rest)
        return out

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the output directory's lock (re-entrant); clears temporary files that writes
        killed midway left behind, which only the lock holder may do."""
        return runs.locked_run(self._lock, self.out, [
            (self.out, False), (self.out / "cache", False), (self.out / "vectors", True)],
            StudyEnvironmentError)

    def _back_up(self, stale: dict[str, Any]) -> Path:
        """Merge results of another configuration into ``results.<their hash>.json``."""
        return runs.back_up(self.out, stale, read_results, merge_results, StudyError)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every cell of the grid; results.json keeps every finished cell of
        this configuration, and the returned dict holds this grid's (what the report shows)."""
        with self.locked():
            return self._run()

    def _run(self) -> dict[str, Any]:
        c = self.config
        results, stale = load_previous(self.out, c)
        if (self.out / "results.json").exists() and stale is None:
            # vectors/ without a hash folder (repif ≤ 0.1) hold the last run's estimates: they
            # are trusted for the rows of this results.json only
            current = io.read_json(self.out / "results.json")
            self._legacy = {_key(r) for r in current["cells"]}
            self._legacy |= {("full", r["removed_class"]) for r in current["references"]}
        self._prepare()
        splits = self._check_grid()
        path = self.out / "results.json"
        if stale is not None:  # only now, when the new run is known to start
            self._back_up(stale)
        grid = [(k, s, m, seed) for k in c.remove for s in c.samplers for m in c.sizes
                for seed in range(c.seeds)]
        rows = {_key(r): r for r in results["cells"]}
        done = set()
        for key in grid:
            if key in rows:
                tensors, why = self._read_vectors(self._vector_path(*key), key)
                if tensors is None:
                    log.warning("the stored estimate of cell %s is %s; recomputing the cell",
                                key, why)
                else:
                    done.add(key)
        bar = tqdm(total=len(grid), desc="cells", disable=not self.progress,
                   initial=len(done))
        for cls, (removed, rest) in splits.items():
            kinds = {r["kind"]: r for r in results["references"] if r["removed_class"] == cls}
            saved = self._reference_path(cls)
            tensors, why = (self._read_vectors(saved, ("full", cls)) if "full" in kinds
                            else (None, ""))
            if tensors is not None:  # resuming: g and v_R were stored with the references
                self.g, self.v_full = (tensors[k].to(self.device, self.dtype) for k in "gv")
            else:
                if "full" in kinds:
                    log.warning("the stored full-pool solve of class %d is %s; recomputing the "
                                "references", cls, why)
                kinds = {"full": self._reference(cls, removed, rest)}
                io.save_tensors_atomic(saved, {"g": self.g.cpu(), "v": self.v_full.cpu()},
                                       self._vector_meta(("full", cls)))
                results["references"] = [r for r in results["references"]
                                         if r["removed_class"] != cls] + [kinds["full"]]
                # kept now, so an interrupted retrain below does not cost the full-pool solve
                io.write_json_atomic(path, results)
            if "retrain" not in kinds:
                results["references"].append(self._retrain(cls, rest))
                io.write_json_atomic(path, results)
            scale = kinds["full"]["scale"]
            # samplers innermost, so that drift in machine load hits every sampler alike
            for seed, m, spec in itertools.product(range(c.seeds), c.sizes, c.samplers):
                key = (cls, spec, m, seed)
                if key in done:
                    continue
                bar.set_postfix_str(f"class {cls} {spec} m={m} seed={seed}")
                row = self._cell(cls, spec, m, seed, removed, rest, scale)
                if key in rows:  # a recomputed cell replaces its row in place
                    results["cells"][results["cells"].index(rows[key])] = row
                else:
                    results["cells"].append(row)
                rows[key] = row
                io.write_json_atomic(path, results)
                bar.update()
        bar.close()
        results["environment"] = io.environment_metadata()
        results["num_params"] = self._num_params()
        io.write_json_atomic(path, results)
        return self._view(results, set(grid))

    def _view(self, results: dict[str, Any], grid: set[tuple]) -> dict[str, Any]:
        """``results`` restricted to this run's grid and removed classes (what is reported)."""
        view = dict(results)
        view["cells"] = [r for r in results["cells"] if _key(r) in grid]
        view["references"] = [r for r in results["references"]
                              if r["removed_class"] in self.config.remove]
        return view


def _key(cell: dict[str, Any]) -> tuple[int, str, int, int]:
    return cell["removed_class"], cell["sampler"], cell["sample_size"], cell["seed"]
