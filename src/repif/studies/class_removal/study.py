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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repif import datasets, io
from repif.datasets.base import stratified_subset
from repif.estimator import InfluenceEstimator
from repif.metrics import predict
from repif.studies import runs

# Besides what the run uses, the rows', resume's and runs' names that lived in this module
# before it was split are imported (``__all__``), so imports from it keep working.
from repif.studies.class_removal.cells import Cells
from repif.studies.class_removal.config import StudyConfig
from repif.studies.class_removal.references import REFERENCE_SOLVER, References
from repif.studies.class_removal.resume import load_previous, merge_results
from repif.studies.class_removal.rows import (
    CELL_METRICS,
    MEASURED_FIELDS,
    METRIC_RANGES,
    REFERENCE_METRICS,
    cell_key,
    check_results,
    read_results,
    ref_key,
)
from repif.studies.class_removal.vectors import StoredVectors
from repif.studies.rows import RANGE_SLACK, out_of_range
from repif.studies.runs import (
    OutputLock,
    StudyEnvironmentError,
    StudyError,
    check_device,
    check_output_dir,
)
from repif.training import load_or_train
from repif.unlearning import remaining_indices

__all__ = ["CELL_METRICS", "MEASURED_FIELDS", "METRIC_RANGES", "RANGE_SLACK", "REFERENCE_METRICS",
           "REFERENCE_SOLVER", "Study", "StudyEnvironmentError", "StudyError", "cell_key",
           "check_device", "check_output_dir", "check_results", "load_previous",
           "merge_results", "out_of_range", "read_results", "ref_key"]

log = logging.getLogger("repif.study")


class Study(References, Cells, StoredVectors):
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
        # references="none" reuses an η picked by a run with scale="auto": the same split keeps
        # its model the same
        if c.scale == "auto" or c.references == "none":
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

    def _num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

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
            self._legacy = {cell_key(r) for r in current["cells"]}
            self._legacy |= {("full", r["removed_class"]) for r in current["references"]}
        self._prepare()
        splits = self._check_grid()
        path = self.out / "results.json"
        if stale is not None:  # only now, when the new run is known to start
            self._back_up(stale)
        grid = [(k, s, m, seed) for k in c.remove for s in c.samplers for m in c.sizes
                for seed in range(c.seeds)]
        rows = {cell_key(r): r for r in results["cells"]}
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
            if c.references == "none":  # η given; no v_R, so the cells' ihvp error is null
                self.g = self._measured_gradient(cls, removed)  # and its pass is measured
                self.v_full, scale = None, float(c.scale)
                self._run_cells(cls, removed, rest, scale, results, rows, done, bar, path)
                continue
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
            self._run_cells(cls, removed, rest, scale, results, rows, done, bar, path)
        bar.close()
        results["environment"] = io.environment_metadata()
        results["num_params"] = self._num_params()
        io.write_json_atomic(path, results)
        return self._view(results, set(grid))

    def _run_cells(self, cls: int, removed: Tensor, rest: Tensor, scale: float,
                   results: dict[str, Any], rows: dict[tuple, dict[str, Any]], done: set,
                   bar: tqdm, path: Path) -> None:
        """Every cell of class ``cls`` not ``done``, each written to ``path`` when it ends."""
        c = self.config
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

    def _view(self, results: dict[str, Any], grid: set[tuple]) -> dict[str, Any]:
        """``results`` restricted to this run's grid and removed classes (what is reported)."""
        view = dict(results)
        view["cells"] = [r for r in results["cells"] if cell_key(r) in grid]
        view["references"] = [r for r in results["references"]
                              if r["removed_class"] in self.config.remove]
        return view

