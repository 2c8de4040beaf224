"""One cell of an evaluation: a method's influence scores on the test points, scored against
the ground truth (LDS or LOO), and what the method cost."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from repif.estimator import InfluenceEstimator
from repif.studies.evaluation import scores
from repif.studies.evaluation.methods import Method
from repif.studies.evaluation.rows import LOO_EXTRAS, EvaluationRow
from repif.studies.resources import measure
from repif.task import ClassificationTask, Task


class MarginTask(ClassificationTask):
    """Cross-entropy training objective with the correct-class margin
    z_y − logsumexp_{c≠y} z_c as the query measured at test points."""

    def query_from_output(self, output: Tensor, y: Tensor) -> Tensor:
        from repif.studies.evaluation.ground_truth import margin

        return margin(output, y)


class Cells:
    """The cells' part of :class:`~repif.studies.evaluation.runner.Evaluation` (a mixin: it
    reads the run's configuration, data, attributed model and ground truth)."""

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
                kronecker_options={**dict(method.curvature_options), **(
                    {"cache_dir": str(self.out / "factors")}
                    if dict(method.solver_options).get("prior") else {})} or None,
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
        return EvaluationRow(**row).to_dict()


def _summary_fields(per_test: np.ndarray) -> dict[str, Any]:
    s = scores.summary(per_test)
    return {"score": s["mean"], "score_se": s["se"], "n_test": s["n"],
            "n_undefined": s["n_undefined"],
            "per_test": [None if not math.isfinite(v) else round(float(v), 5)
                         for v in per_test]}
