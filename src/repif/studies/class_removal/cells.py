"""One cell of the class-removal study: a subset drawn by a sampler, the update it gives, and
what it cost, every pass it reads charged in full (docs/design.md, "Protocol")."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from repif import io, samplers
from repif.metrics import cosine, predict, relative_error, removal_scores
from repif.studies.class_removal.config import parse_sampler
from repif.studies.class_removal.rows import CellRow
from repif.studies.resources import measure
from repif.unlearning import removal_gradient


class Cells:
    """The cells' part of :class:`~repif.studies.class_removal.study.Study` (a mixin: it reads
    the study's model, data, configuration and device, and the references' g and v_R)."""

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
            self._measured_gradient(cls, removed)
        return self.gradient_pass[cls]

    def _measured_gradient(self, cls: int, removed: Tensor) -> Tensor:
        """The removed points' gradient g, its cost kept as class ``cls``'s gradient pass."""
        est = self._estimator(solver=self.config.solver)
        with measure(self.device) as m:
            g = removal_gradient(est.fitter, removed)
        self.gradient_pass[cls] = {"time_s": m.time_s, "peak_mem_bytes": m.peak_mem_bytes}
        return g

    def _scores(self, model: nn.Module, cls: int) -> dict[str, float]:
        pred = predict(model, self.test[0])
        return removal_scores(pred, self.original_test, self.test[1], cls).as_dict()

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
        return CellRow(
            removed_class=cls, sampler=spec, sample_size=m, seed=seed,
            **self._scores(updated, cls),
            # null without the full-pool reference (references="none")
            ihvp_rel_error=None if self.v_full is None else relative_error(v, self.v_full),
            ihvp_cosine=None if self.v_full is None else cosine(v, self.v_full),
            time_s=meas.time_s + charged["time_s"] + grad["time_s"],
            peak_mem_bytes=max(meas.peak_mem_bytes, charged["peak_mem_bytes"],
                               grad["peak_mem_bytes"]),
            pool_pass_s=charged["time_s"], gradient_s=grad["time_s"],
            sample_time_s=est.timings["sample_s"] + charged["time_s"],
            fit_s=est.timings["solver_fit_s"],
            solve_step_s=max(0.0, meas.time_s - est.timings["sample_s"]
                             - est.timings["solver_fit_s"]),
            scale=scale,
            memory_method=meas.method).to_dict()
