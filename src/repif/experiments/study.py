"""The class-removal study: for each removed class, sampler, size and seed, one influence update.

Results go to ``DIR/results.json`` (schema in docs/design.md, "Protocol"), rewritten atomically
after every cell; the estimates v_T are kept in ``DIR/vectors/`` for the seed spread. Re-running
the same command resumes: cells whose configuration hash matches are skipped. A results file from
another configuration is moved aside to ``results.<hash>.json``, never overwritten in place.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repif import datasets, io, models
from repif.datasets.base import stratified_subset
from repif.estimator import InfluenceEstimator
from repif.experiments.config import SCALE_GRID, StudyConfig, split_sampler
from repif.experiments.resources import measure
from repif.metrics import cosine, predict, relative_error, removal_scores
from repif.training import load_or_train, train
from repif.unlearning import remaining_indices, removal_gradient

log = logging.getLogger("repif.study")

#: The full-pool reference v_R (docs/design.md, "Protocol"): CG to a relative residual of 1e-10
#: (tighter than the usual 1e-8; a dense solve over the whole pool was 40× slower on the digits
#: MLP for the same answer).
REFERENCE_SOLVER = {"solver": "cg", "tol": 1e-10, "max_iter": 10_000}


class StudyError(RuntimeError):
    """A study cannot run as configured; the message says why and what to do."""


def check_output_dir(out: Path) -> None:
    """Raise StudyError if ``out`` is a file or cannot be written to."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"output directory {out} is a file; pass a directory with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"output directory {out} is not writable ({err.strerror})") from err


def load_previous(out: Path, config: StudyConfig) -> tuple[dict[str, Any], str | None]:
    """Earlier results with the same cell hash (or an empty skeleton), and the hash of an earlier
    file from another configuration, which the caller moves aside before its first write."""
    path = out / "results.json"
    fresh = {"config": config.to_dict(), "config_hash": config.cell_hash(),
             "references": [], "cells": []}
    if not path.exists():
        return fresh, None
    try:
        old = io.read_json(path)
        old_hash = old["config_hash"]
        old["references"], old["cells"]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as err:
        raise StudyError(
            f"{path} is corrupt or was not written by this version of repif ({err}); move it "
            "away or delete it to start the study afresh"
        ) from err
    if old_hash != config.cell_hash():
        return fresh, str(old_hash)
    old["config"] = config.to_dict()
    return old, None


class Study:
    """Runs one :class:`StudyConfig` into an output directory (see module doc)."""

    def __init__(self, config: StudyConfig, out: str | Path, *, progress: bool = True) -> None:
        config.validate()
        self.config, self.out, self.progress = config, Path(out), progress
        check_output_dir(self.out)
        self.dtype = getattr(torch, config.dtype)
        self.device = torch.device(config.device)

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
            weight_decay=c.weight_decay, device=self.device, **kw,
        )

    def _scores(self, model: nn.Module, cls: int) -> dict[str, float]:
        pred = predict(model, self.test[0])
        return removal_scores(pred, self.original_test, self.test[1], cls).as_dict()

    # ------------------------------------------------------------------ references
    def _reference(self, cls: int, removed: Tensor, rest: Tensor) -> dict[str, Any]:
        c = self.config
        with measure(self.device) as m:
            est = self._estimator(**REFERENCE_SOLVER).fit(rest)
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
        row = {"removed_class": cls, "kind": "full", "scale": scale, "solver": "cg",
               "time_s": m.time_s + m2.time_s,
               "peak_mem_bytes": max(m.peak_mem_bytes, m2.peak_mem_bytes),
               **self._scores(updated, cls)}
        return row

    def _pick_scale(self, est: InfluenceEstimator, v: Tensor, cls: int) -> float:
        """η maximising validation F1 of a one-step update along the full-pool direction."""
        if self.original_val is None or not bool((self.val[1] == cls).any()):
            raise StudyError(f"the validation split has no point of class {cls}; pass --scale")
        best, best_f1 = SCALE_GRID[0], -1.0
        theta = est.fm.theta
        for eta in SCALE_GRID:
            model = copy.deepcopy(est.model)
            est.fm.space.set(model, theta + eta * v)
            pred = predict(model, self.val[0])
            f1 = removal_scores(pred, self.original_val, self.val[1], cls).f1
            if f1 > best_f1 + 1e-12:
                best, best_f1 = eta, f1
        return best

    def _retrain(self, cls: int, rest: Tensor) -> dict[str, Any]:
        c = self.config
        fresh = models.build(c.model, self.dataset, seed=c.train_seed, width=c.width)
        with measure("cpu") as m:
            model = train(
                fresh, (self.train_x[rest], self.train_y[rest]), epochs=c.epochs,
                batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                seed=c.train_seed, device=self.device, cache_dir=self.out / "cache",
            ).to(self.dtype)
        return {"removed_class": cls, "kind": "retrain", "time_s": m.time_s,
                "peak_mem_bytes": m.peak_mem_bytes, **self._scores(model, cls)}

    def _num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ cells
    def _cell(self, cls: int, spec: str, m: int, seed: int, removed: Tensor,
              rest: Tensor, scale: float) -> dict[str, Any]:
        c = self.config
        name, shrinkage = split_sampler(spec)
        with measure(self.device) as meas:
            est = self._estimator(solver=c.solver, sampler=name, sample_size=m, seed=seed,
                                  shrinkage=shrinkage).fit(rest)
            updated = est.remove(removed, scale=scale, steps=c.steps)
        if c.steps == 1:  # θ' = θ̂ + η v_T exactly, so no second solve is needed
            v = (est.fm.space.get(updated) - est.fm.theta) / scale
        else:
            v = est.inverse_hvp(self.g)
        io.save_tensors_atomic(self._vector_path(cls, spec, m, seed), {"v": v.cpu()})
        return {"removed_class": cls, "sampler": spec, "sample_size": m, "seed": seed,
                **self._scores(updated, cls),
                "ihvp_rel_error": relative_error(v, self.v_full),
                "ihvp_cosine": cosine(v, self.v_full),
                "time_s": meas.time_s, "peak_mem_bytes": meas.peak_mem_bytes,
                "sample_time_s": est.timings["sample_s"], "scale": scale,
                "memory_method": meas.method}

    def _vector_path(self, cls: int, spec: str, m: int, seed: int) -> Path:
        return self.out / "vectors" / f"c{cls}_{spec}_m{m}_s{seed}.safetensors"

    def vectors(self, cls: int, spec: str, m: int) -> list[Tensor]:
        """The stored v_T of every finished seed of one (class, sampler, size)."""
        out = []
        for seed in range(self.config.seeds):
            p = self._vector_path(cls, spec, m, seed)
            if p.exists():
                out.append(io.load_tensors(p)[0]["v"])
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

    def run(self) -> dict[str, Any]:
        """Run (or resume) every cell; returns the results dict also written to results.json."""
        c = self.config
        results, stale = load_previous(self.out, c)
        self._prepare()
        splits = self._check_grid()
        path = self.out / "results.json"
        if stale is not None:  # only now, when the new run is known to start
            backup = self.out / f"results.{stale}.json"
            path.replace(backup)
            log.warning("configuration changed: earlier results moved to %s", backup)
        grid = [(k, s, m, seed) for k in c.remove for s in c.samplers for m in c.sizes
                for seed in range(c.seeds)]
        results["cells"] = [r for r in results["cells"] if _key(r) in set(grid)]
        results["references"] = [r for r in results["references"]
                                 if r["removed_class"] in c.remove]
        done = {_key(r) for r in results["cells"]}
        bar = tqdm(total=len(grid), desc="cells", disable=not self.progress,
                   initial=len(done))
        for cls, (removed, rest) in splits.items():
            refs = [r for r in results["references"] if r["removed_class"] == cls]
            saved = self.out / "vectors" / f"full_c{cls}.safetensors"
            if refs and saved.exists():  # resuming: g and v_R were stored with the references
                tensors = io.load_tensors(saved)[0]
                self.g, self.v_full = (tensors[k].to(self.device, self.dtype) for k in "gv")
            else:
                full = self._reference(cls, removed, rest)
                io.save_tensors_atomic(saved, {"g": self.g.cpu(), "v": self.v_full.cpu()})
                refs = [full, self._retrain(cls, rest)]
                results["references"] = [r for r in results["references"]
                                         if r["removed_class"] != cls]
                results["references"] += refs
                io.write_json_atomic(path, results)
            scale = next(r["scale"] for r in refs if r["kind"] == "full")
            # samplers innermost, so that drift in machine load hits every sampler alike
            for seed, m, spec in itertools.product(range(c.seeds), c.sizes, c.samplers):
                if (cls, spec, m, seed) in done:
                    continue
                bar.set_postfix_str(f"class {cls} {spec} m={m} seed={seed}")
                results["cells"].append(self._cell(cls, spec, m, seed, removed, rest, scale))
                io.write_json_atomic(path, results)
                bar.update()
        bar.close()
        results["environment"] = io.environment_metadata()
        results["num_params"] = self._num_params()
        io.write_json_atomic(path, results)
        return results


def _key(cell: dict[str, Any]) -> tuple[int, str, int, int]:
    return cell["removed_class"], cell["sampler"], cell["sample_size"], cell["seed"]
