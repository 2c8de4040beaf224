"""An evaluation's ground truth: the retraining jobs it needs, the targets of the retrained
models, averaged over the ground-truth seeds, and the ground truth's own noise (the metric of an
independent seed against it; docs/design.md, "Protocol")."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from repif.studies.evaluation import scores
from repif.studies.evaluation.ground_truth import Job, targets
from repif.studies.resources import measure


class GroundTruth:
    """The ground truth's part of :class:`~repif.studies.evaluation.runner.Evaluation` (a
    mixin: it reads the run's configuration, data, subsets or left-out points and model
    store)."""

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
