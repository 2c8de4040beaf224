"""The class-removal study's references for one removed class: the update with the whole
pool's curvature (v_R, the direction every cell is compared with, and the step scale η) and the
model retrained without the class (docs/design.md, "Protocol")."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from repif import models
from repif.estimator import InfluenceEstimator
from repif.metrics import predict
from repif.studies.class_removal.rows import ReferenceRow
from repif.studies.resources import measure
from repif.studies.runs import StudyError
from repif.training import train
from repif.unlearning import choose_scale, removal_gradient

#: The full-pool reference v_R (docs/design.md, "Protocol"): CG to a relative residual of 1e-10
#: (tighter than the usual 1e-8; a dense solve over the whole pool was 40× slower on the digits
#: MLP for the same answer).
REFERENCE_SOLVER = {"solver": "cg", "tol": 1e-10, "max_iter": 10_000}


class References:
    """The references' part of :class:`~repif.studies.class_removal.study.Study` (a mixin: it
    reads the study's model, data, configuration and device)."""

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
        row = ReferenceRow(removed_class=cls, kind="full", scale=scale, solver=solver["solver"],
                           time_s=m.time_s + m2.time_s,
                           peak_mem_bytes=max(m.peak_mem_bytes, m2.peak_mem_bytes),
                           **self._scores(updated, cls))
        return row.to_dict()

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
        return ReferenceRow(removed_class=cls, kind="retrain", time_s=m.time_s,
                            peak_mem_bytes=m.peak_mem_bytes,
                            **self._scores(model, cls)).to_dict()
