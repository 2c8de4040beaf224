"""Projected scores (``scores="projected"``) of :class:`~repif.estimator.InfluenceEstimator`:
the projection, stored projected training gradients, the subset's curvature in the projected
space and the scores from them (the maths: :mod:`repif.projection`).

A mixin the facade inherits beside :class:`~repif.scoring.Scoring`, whose gradients and
indices it uses (docs/design.md, "Parts").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from repif import distributed
from repif.data import DataSource, take
from repif.gradients.streaming import split_batch
from repif.projection import (
    DEFAULT_PROJECTION_DIM,
    KroneckerProjection,
    ProjectedCurvature,
    ProjectedGradients,
    eigen_bases,
)

if TYPE_CHECKING:
    from repif.fitting import CurvatureFitter, FittedCurvature
    from repif.samplers import Subset


class ProjectedScoring:
    """The projected score path (see the module doc); expects :class:`~repif.scoring.Scoring`
    beside it."""

    fitter: CurvatureFitter
    _fitted: FittedCurvature | None
    _projection: KroneckerProjection | None
    _projected_curvature: ProjectedCurvature | None
    _projection_spec: tuple[int, str]
    seed: int
    weight_decay: float

    def _setup_projection(self, scores: str, dim: int | None, basis: str) -> None:
        """Record the score route; the projection itself is built on first use."""
        self.scores = scores
        self._projection = None
        self._projected_curvature = None
        if scores == "projected":
            if self.cost.engine is None:
                raise ValueError(
                    "scores='projected' works from each layer's inputs and output gradients: it "
                    "needs the hook engine (per_sample='auto' or 'hooks', and a model it takes: "
                    "no parameter shared between modules, no layer called twice, BatchNorm in "
                    "eval mode); use scores='exact'"
                )
            self._projection_spec = (DEFAULT_PROJECTION_DIM if dim is None else dim, basis)

    @property
    def projection(self) -> KroneckerProjection | None:
        """The projection of ``scores="projected"`` (None with exact scores); with
        ``projection_basis="eigen"`` built from the K-FAC factors of the curvature subset on
        first use."""
        if self.scores != "projected":
            return None
        if self._projection is None:
            dim, basis = self._projection_spec
            bases = None
            if basis == "eigen":
                subset = self._curvature_subset()
                x, y = self.fitter.subset_batch(subset)
                bases = eigen_bases(self.fm, x, y, subset.weights.to(self.fm.device,
                                                                     self.fm.dtype),
                                    self.budget)
            assert self.cost.engine is not None
            self._projection = KroneckerProjection(self.cost.engine, dim, self.seed, bases)
        return self._projection

    def _curvature_subset(self) -> Subset:
        """The fit's subset, drawn without preparing the solver when the estimator is not
        fitted (same sampler, size and seed: the same subset)."""
        return self._fitted.subset if self._fitted is not None else self.fitter.select()

    def projected_gradients(self, indices: Tensor | None = None) -> ProjectedGradients:
        """(k, D) projected loss gradients of training points ``indices`` (default all), with
        the metadata they depend on: computed once (one forward+backward per chunk, no
        per-sample gradient formed), :meth:`~repif.projection.ProjectedGradients.save`d, and
        passed back as ``influence(test, projected=...)`` for later queries."""
        projection = self._need_projection()
        idx = self._indices(indices)
        out = torch.empty(idx.numel(), projection.size, dtype=self.fm.dtype)
        for offset, part in self._projected_chunks(idx, 0):
            out[offset : offset + part.shape[0]] = part.cpu()
        return ProjectedGradients(out, idx.clone(), projection.describe())

    def _need_projection(self) -> KroneckerProjection:
        projection = self.projection
        if projection is None:
            raise ValueError("projected gradients need scores='projected' on the estimator")
        return projection

    def _projected_chunks(self, idx: Tensor, k: int) -> Any:
        """(offset, (b, D) projected gradients) for consecutive chunks of ``idx``, sized by the
        budget beside ``k`` scores per row."""
        projection = self._need_projection()
        row = 2 * self.cost.backward_row() + projection.row_bytes() + k * self.cost.itemsize
        for offset, batch in self.source.batches(idx, self.budget.rows(row)):
            inputs, targets = split_batch(self.fm, batch)
            yield offset, projection.batch(inputs, targets)

    def projected_curvature(self) -> ProjectedCurvature:
        """The curvature of ``scores="projected"``: the GGN of the fit's subset (with its
        weights, the damping and the weight decay) in the projected space; built once. The
        subset is the fit's, drawn without preparing the solver when the estimator is not
        fitted (same sampler, size and seed: the same subset)."""
        projection = self._need_projection()
        if self._projected_curvature is None:
            subset = self._curvature_subset()
            classes = self.output_dim
            r, size = len(subset) * classes, projection.size
            self.budget.require(
                (r * size + min(r, size) ** 2) * self.cost.itemsize,
                f"the projected curvature ({r:,} rows of the subset's projected Jacobian × "
                f"D = {size:,}, and its factor)", "lower projection_dim or sample_size, or "
                "raise max_memory")
            x, y = self.fitter.subset_batch(subset)
            w = subset.weights.to(self.fm.device, self.fm.dtype)
            row = 2 * self.cost.backward_row() + classes * projection.row_bytes()
            step = self.budget.rows(row)
            parts = [projection.output_rows(take(x, slice(s, s + step)),
                                            take(y, slice(s, s + step)), w[s : s + step])
                     for s in range(0, len(subset), step)]
            self._projected_curvature = ProjectedCurvature(
                torch.cat(parts), self.damping, self.weight_decay)
        return self._projected_curvature

    def _projected_influence(self, source: DataSource, idx: Tensor,
                             projected: ProjectedGradients | None) -> Tensor:
        """Scores of ``scores="projected"`` (see :mod:`repif.projection`)."""
        projection = self._need_projection()
        if distributed.is_distributed():
            raise ValueError("scores='projected' runs in one process; score without torchrun "
                             "or use scores='exact'")
        if projected is not None:
            projected.check(projection)
        curvature = self.projected_curvature()
        n_test = len(source)
        queries = torch.empty(n_test, projection.size, dtype=self.fm.dtype, device=self.fm.device)
        row = 2 * self.cost.backward_row() + projection.row_bytes()
        for offset, batch in source.batches(torch.arange(n_test), self.budget.rows(row)):
            inputs, targets = split_batch(self.fm, batch)
            part = projection.batch(inputs, targets, "query")
            queries[offset : offset + part.shape[0]] = part
        factors = curvature.solve(queries)
        scores = torch.empty(n_test, idx.numel(), dtype=self.fm.dtype)
        bar = self._bar(idx.numel(), "influence")
        if projected is None:
            chunks = self._projected_chunks(idx, n_test)
        else:
            rows = _rows_of(projected.indices, idx)
            step = self.budget.rows((projection.size + n_test) * self.cost.itemsize)
            chunks = ((s, projected.values[rows[s : s + step]].to(self.fm.device, self.fm.dtype))
                      for s in range(0, idx.numel(), step))
        for offset, part in chunks:
            scores[:, offset : offset + part.shape[0]] = -(factors @ part.T).cpu()
            bar.update(part.shape[0])
        bar.close()
        return scores


def _rows_of(stored: Tensor, wanted: Tensor) -> Tensor:
    """Positions in ``stored`` (training indices) of each of ``wanted``; a missing one is an
    error naming it."""
    where = torch.full((int(max(stored.max(), wanted.max())) + 1,), -1, dtype=torch.long)
    where[stored.long()] = torch.arange(stored.numel())
    rows = where[wanted.long()]
    missing = wanted[rows < 0]
    if missing.numel():
        raise ValueError(f"the projected gradients hold no row for training point(s) "
                         f"{missing[:10].tolist()}; project those points too")
    return rows
