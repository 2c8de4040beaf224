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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from repif import io
from repif.studies import runs

# Besides what the run uses, the configuration's, methods', rows' and cells' names that lived
# in this module before it was split are imported (``__all__``), so imports from it keep working.
from repif.studies.evaluation.cells import Cells, MarginTask
from repif.studies.evaluation.config import (
    _GRID_FIELDS,
    _LOCATION_FIELDS,
    METRICS,
    TARGETS,
    EvaluationConfig,
    EvaluationError,
)
from repif.studies.evaluation.ground_truth import Job, ModelStore, Recipe, lds_subsets
from repif.studies.evaluation.methods import BASELINES, Method, parse_method
from repif.studies.evaluation.rows import (
    CELL_RANGES,
    LOO_EXTRAS,
    EvaluationRow,
    cell_key,
    check_results,
    merge_results,
    read_results,
)
from repif.studies.evaluation.truth import GroundTruth
from repif.studies.rows import is_int
from repif.studies.runs import OutputLock, StudyEnvironmentError, check_device, check_output_dir

__all__ = ["BASELINES", "CELL_RANGES", "LOO_EXTRAS", "METRICS", "TARGETS", "Evaluation",
           "EvaluationConfig", "EvaluationError", "EvaluationRow", "MarginTask", "Method",
           "cell_key", "check_results", "merge_results", "parse_method", "read_results"]

log = logging.getLogger("repif.evaluation")


class Evaluation(GroundTruth, Cells):
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
        if is_int(lp):
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

    def cell_hash(self, stored: dict[str, Any] | None = None) -> str:
        """Hash of what changes a cell's numbers: the config less its grid and less where the
        data lie (``data_dir``: the data themselves count through the model store's key, with
        the recipe). With a ``stored`` config: the hash as results written before counted it,
        with the stored file's ``data_dir`` in place of this run's (:meth:`_previous` accepts
        both)."""
        d = {k: v for k, v in self.config.to_dict().items()
             if k not in _GRID_FIELDS and k not in _LOCATION_FIELDS}
        if stored is not None:
            d.update({k: stored.get(k) for k in _LOCATION_FIELDS})
        d["ground_truth_key"] = self.store.key_hash
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

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
        same = {h}  # the same cells, hashed now or as before (with where the data lay)
        if current is not None and isinstance(current.get("config"), dict):
            same.add(self.cell_hash(current["config"]))
        if current is not None and current["config_hash"] in same:
            stored = current
        else:
            stale = current
        for backup in sorted(self.out / f"results.{k}.json" for k in same):
            if not backup.exists():
                continue
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
