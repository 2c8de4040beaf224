"""The score path of :class:`~repif.estimator.InfluenceEstimator`: solves, per-sample
gradients of training and test points, influence, self-influence and top-k.

A mixin the facade inherits, so the facade keeps to building, validating and fitting
(docs/design.md, "Parts"). It reads what the estimator built: the functional model ``fm``, the
training ``source``, the memory ``budget`` and ``cost`` model, the ``task``, the fitted
curvature (``fitted``), ``solver_name``/``solver_options``, ``progress`` and ``scores``.
Conventions (signs, shapes) are the estimator module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from repif import distributed
from repif.data import DataSource
from repif.gradients.streaming import split_batch, stream_gradients, stream_scores
from repif.progress import bar as progress_bar
from repif.task import Task
from repif.validation import check_count, check_finite, check_indices, check_vector

if TYPE_CHECKING:
    from repif.fitting import FittedCurvature
    from repif.gradients.streaming import CostModel
    from repif.memory import MemoryBudget
    from repif.projection import ProjectedGradients
    from repif.task import FunctionalModel

#: (k, p) blocks an iterative solver keeps per right-hand side (CG: x, r, d, C·d and the
#: input), used to size the chunks whose gradients go through a solve (self-influence).
SOLVER_ROW_COPIES = 6


@dataclass(frozen=True)
class TopK:
    """Most helpful (``proponents``: most negative scores) and most harmful training points."""

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor



class Scoring:
    """Solves and scores of an estimator (see the module doc for what it reads)."""

    fm: FunctionalModel
    source: DataSource
    budget: MemoryBudget
    cost: CostModel
    task: Task
    output_dim: int
    damping: float
    solver_name: str
    solver_options: dict[str, Any]
    progress: bool | None
    scores: str
    num_params: int
    n_train: int
    fitted: FittedCurvature

    def inverse_hvp(self, vec: Tensor) -> Tensor:
        """(C + λI)⁻¹ vec for a (p,) or (k, p) vector; same shape out."""
        rows = check_vector(vec, self.num_params, "vector")
        if rows.shape[0] == 0:  # a (0, p) block: an empty answer, no fit or solve needed
            return rows.to(self.fm.device, self.fm.dtype).reshape(vec.shape)
        out = self._solve(rows.to(self.fm.device, self.fm.dtype))
        if not bool(torch.isfinite(out).all()):
            raise ArithmeticError(
                f"solver {self.solver_name!r} returned non-finite values; raise the damping "
                f"(now {self.damping}) or use curvature='ggn'"
            )
        return out.reshape(vec.shape)

    def _solve(self, rows: Tensor) -> Tensor:
        """(k, p) → (k, p) solves. Over several processes with at least one row per rank and a
        solver whose rows do not interact, each rank solves its share of the rows on its own
        (with the whole subset) and the results are gathered; otherwise every rank runs the
        solver in lockstep on the same rows, its curvature products sharded by subset point."""
        fitted = self.fitted  # fit first: a fit shards its own work
        if not self._split_rows(rows.shape[0]):
            return fitted.solve(rows)
        lo, hi = distributed.local_range(rows.shape[0])
        with distributed.local():
            part = fitted.solve(rows[lo:hi])
        return distributed.all_gather_cat(part)

    def _split_rows(self, k: int) -> bool:
        """Whether k right-hand sides are split across ranks (see :meth:`_solve`): not for
        LiSSA with mini-batches, whose rows in a block share the batches drawn."""
        if not distributed.is_distributed() or k < distributed.world_size():
            return False
        return not (self.solver_name == "lissa"
                    and self.solver_options.get("batch_size") is not None)

    def _solved_gradients(self, source: DataSource, idx: Tensor, measure: str) -> Tensor:
        """(k, p) (C + λI)⁻¹∇ of points ``idx``. Over several processes where rows may be split,
        each rank solves the gradients of its own share and only the solutions travel."""
        if not self._split_rows(idx.numel()):
            return self.inverse_hvp(self._gradients(source, idx, measure))
        self.fitted  # noqa: B018 - fit (sharded) before the ranks go their own ways
        mine = distributed.shard(idx)  # taken before local(), where every rank has all
        with distributed.local():
            part = self.inverse_hvp(self._gradients(source, mine, measure))
        return distributed.all_gather_cat(part)

    def _indices(self, indices: Any) -> Tensor:
        if indices is None:
            return torch.arange(self.n_train)
        return check_indices(indices, self.n_train)

    def _bar(self, total: int, desc: str) -> tqdm:
        return progress_bar(total, desc, self.progress)

    def _gradients(self, source: DataSource, idx: Tensor, measure: str = "loss") -> Tensor:
        """(k, p) per-sample gradients of points ``idx``; over several processes each rank
        computes its share and every rank receives all of them."""
        if distributed.is_distributed():
            mine = self._local_gradients(source, distributed.shard(idx), measure)
            return distributed.all_gather_cat(mine)
        return self._local_gradients(source, idx, measure)

    def _local_gradients(self, source: DataSource, idx: Tensor, measure: str) -> Tensor:
        out = torch.empty(idx.numel(), self.num_params, dtype=self.fm.dtype, device=self.fm.device)
        for offset, g in stream_gradients(self.fm, source, idx, self.budget, self.cost,
                                          measure=measure):
            out[offset : offset + g.shape[0]] = g
        return out

    def train_gradients(self, indices: Tensor | None = None) -> Tensor:
        """(k, p) per-sample loss gradients of training points ``indices`` (default all)."""
        return self._gradients(self.source, self._indices(indices))

    def _test_source(self, test: Any) -> DataSource:
        if isinstance(test, DataSource):
            source = test
        elif isinstance(test, DataLoader):  # its own collate function and batch size
            source = DataSource(test, what="test data", allow_empty=True)
        else:
            source = DataSource(test, collate_fn=self.source.collate_fn,
                                batch_size=self.source.batch_size, what="test data",
                                allow_empty=True)
        if source.tensors is not None:
            check_finite(source.tensors[0], "test inputs")
            if type(self.task).split is Task.split:
                self.task.check_targets(source.tensors[-1], self.output_dim)
        if len(source):  # no points: empty results, nothing to probe
            self.fm.output_dim(split_batch(self.fm, source.first())[0])  # wrong shapes: one error
        distributed.check_agree("test data", source.fingerprint())
        source.validate = self._validate_batch
        return source

    def _validate_batch(self, batch: Any) -> None:
        """A batch gathered from a Dataset, checked as it streams past as the tensor path is
        checked up front: finite floating-point inputs, valid targets."""
        inputs, targets = self.task.split(batch)
        for leaf in tree_flatten(inputs)[0]:
            if isinstance(leaf, Tensor) and leaf.is_floating_point():
                check_finite(leaf, "inputs of a batch from the Dataset")
        self.task.check_targets(targets, self.output_dim)

    def test_gradients(self, test: Any, measure: str = "loss") -> Tensor:
        """(n, p) per-sample gradients of arbitrary points (``(x, y)`` or a Dataset) of their
        loss, or of the task's query measurement with ``measure="query"``."""
        source = self._test_source(test)
        return self._gradients(source, torch.arange(len(source)), measure)

    def influence(self, test: Any, train_indices: Tensor | None = None,
                  projected: ProjectedGradients | None = None) -> Tensor:
        """(n_test, n_train) scores I(z_j, z_t) = −∇q(z_t)ᵀ(C + λI)⁻¹∇l(z_j) (see module doc;
        q is the task's query, the loss by default).

        The test side (C + λI)⁻¹∇q (the "influence factors") is computed once per block of test
        points that fits in half the budget; training gradients then stream past it in chunks,
        so peak memory does not grow with the number of training points. With
        ``scores="projected"``, ``projected`` (from :meth:`projected_gradients`, holding every
        point of ``train_indices``) replaces the training pass.
        """
        source = self._test_source(test)
        idx = self._indices(train_indices)
        if projected is not None:
            self._need_projection()
        n_test, item = len(source), self.cost.itemsize
        if n_test == 0:  # no test points: (0, n_train) scores, no fit or solve needed
            return torch.empty(0, idx.numel(), dtype=self.fm.dtype)
        if self.scores == "projected":
            return self._projected_influence(source, idx, projected)
        factor_row = (1 + SOLVER_ROW_COPIES) * self.num_params * item
        test_rows = min(n_test, max(1, (self.budget.bytes // 2) // factor_row))
        sharded = distributed.is_distributed()
        if sharded:  # every rank loops over the same test blocks; each scores its columns
            test_rows = distributed.agree(test_rows)
        columns = distributed.shard(idx)  # all of idx in one process
        scores = torch.empty(n_test, idx.numel(), dtype=self.fm.dtype)
        bar = self._bar(columns.numel() * -(-n_test // test_rows), "influence")
        for t0 in range(0, n_test, test_rows):
            block = torch.arange(t0, min(n_test, t0 + test_rows))
            factors = self._solved_gradients(source, block, "query")
            mine = torch.empty(block.numel(), columns.numel(), dtype=self.fm.dtype) if sharded \
                else scores
            rows = slice(None) if sharded else block
            for offset, part in stream_scores(self.fm, self.source, columns, self.budget,
                                              self.cost, factors):
                mine[rows, offset : offset + part.shape[1]] = -part.cpu()
                bar.update(part.shape[1])
            if sharded:  # the ranks' columns, in training-index order
                scores[block] = distributed.all_gather_cat(mine.T.contiguous()).T
            del factors
        bar.close()
        return scores

    def self_influence(self, indices: Tensor | None = None) -> Tensor:
        """(k,) I(z_i, z_i) = −∇l_iᵀ(C + λI)⁻¹∇l_i for training points ``indices``, streamed.
        Over several processes each rank scores its share of the points (solving on its own
        where the solver allows, see :meth:`_solve`) and the scores are gathered."""
        idx = self._indices(indices)
        solver_row = SOLVER_ROW_COPIES * self.num_params * self.cost.itemsize
        if distributed.is_distributed() and not self._split_rows(idx.numel()):
            return self._lockstep_self_influence(idx, solver_row)
        self.fitted  # noqa: B018 - fit (sharded) before the ranks go their own ways
        mine = distributed.shard(idx)  # all of idx in one process
        out = torch.empty(mine.numel(), dtype=self.fm.dtype)
        bar = self._bar(mine.numel(), "self-influence")
        with distributed.local():
            for offset, g in stream_gradients(self.fm, self.source, mine, self.budget,
                                              self.cost, extra_row_bytes=solver_row):
                out[offset : offset + g.shape[0]] = -self._quadratic(g).cpu()
                bar.update(g.shape[0])
        bar.close()
        return distributed.all_gather_cat(out)

    def _quadratic(self, g: Tensor) -> Tensor:
        """(k,) ∇l_iᵀ(C + λI)⁻¹∇l_i of a block of gradients: one batched solve, or a solver's
        cheaper quadratic form (Woodbury, eigen), never one solve per point."""
        q = self.fitted.quadratic(g.to(self.fm.device, self.fm.dtype))
        if not bool(torch.isfinite(q).all()):
            raise ArithmeticError(
                f"solver {self.solver_name!r} returned non-finite values; raise the damping "
                f"(now {self.damping}) or use curvature='ggn'"
            )
        return q

    def _lockstep_self_influence(self, idx: Tensor, solver_row: int) -> Tensor:
        """Self-influence over several processes when the solver runs in lockstep: chunks of
        the same size on every rank, each chunk's gradients gathered and solved together."""
        rows = self.budget.rows(self.cost.gradient_row() + solver_row)
        rows = self.source.chunk_rows(distributed.agree(rows))
        out = torch.empty(idx.numel(), dtype=self.fm.dtype)
        bar = self._bar(idx.numel(), "self-influence")
        for s in range(0, idx.numel(), rows):
            g = self._gradients(self.source, idx[s : s + rows])
            out[s : s + g.shape[0]] = -self._quadratic(g).cpu()
            bar.update(g.shape[0])
        bar.close()
        return out

    def top_k(self, test_point: Any, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents among the training points of one test
        point: ``(x, y)`` with x with or without a batch dimension of 1, or a batch of one."""
        if isinstance(test_point, (tuple, list)) and len(test_point) == 2:
            x, y = (torch.as_tensor(t) for t in test_point)
            train_x = self.source.tensors[0] if self.source.tensors is not None else None
            if train_x is not None and x.ndim == train_x.ndim - 1:
                x = x.unsqueeze(0)
            elif train_x is None and y.ndim == 0:
                x = x.unsqueeze(0)
            test_point = (x, y.reshape(1) if y.ndim == 0 else y)
        k = check_count(k, "k")
        source = self._test_source(test_point)
        if len(source) != 1:
            raise ValueError(
                f"top_k ranks the training points for one test point, got a batch of "
                f"{len(source)}; call it once per point, or rank the rows of influence(test)"
            )
        scores = self.influence(source)[0]
        bad = torch.nonzero(~torch.isfinite(scores)).flatten()
        if bad.numel():
            raise ArithmeticError(
                f"{bad.numel()} influence score(s) are not finite (training points "
                f"{bad[:10].tolist()}): their inputs, targets or losses are not finite; clean "
                "or drop them before ranking"
            )
        k = min(k, scores.numel())
        lo = torch.topk(scores, k, largest=False)
        hi = torch.topk(scores, k, largest=True)
        return TopK(lo.indices, lo.values, hi.indices, hi.values)
