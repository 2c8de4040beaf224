"""Fitting the curvature: draw a subset T from a pool of training points, prepare a solver on it.

:class:`CurvatureFitter` binds the fitting options (curvature kind, damping, sampler, sample
size, seed, shrinkage, solver) to a model, its training data and a memory budget.
:class:`FittedCurvature` is what a fit produces — the subset, the prepared solver and timings —
and is all that the estimator and the removal update need (docs/design.md,
"Parts").
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from repif import distributed
from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.curvature.operator import CurvatureOperator, resolve_shrinkage
from repif.data import DataSource, to_device
from repif.gradients.streaming import CostModel, split_batch
from repif.memory import MemoryBudget
from repif.progress import bar as progress_bar
from repif.recording import PoolStatistics, check_statistics_targets
from repif.samplers import Pool, Subset
from repif.task import FunctionalModel, Task
from repif.validation import check_indices


@dataclass(frozen=True)
class FittedCurvature:
    """A curvature subset and a solver prepared on it: ``solve(g)`` = (C_T + λI)⁻¹ g."""

    subset: Subset
    solver: _solvers.Solver
    timings: dict[str, float] = field(default_factory=dict)
    #: The training indices the subset was drawn from (None: all): a later preparation on it (a
    #: new damping, a removal's further steps) fits a prior or an eigenbasis on the same pool.
    pool: Tensor | None = None

    def solve(self, g: Tensor) -> Tensor:
        """(k, p) right-hand sides → (k, p) solutions."""
        return self.solver.solve(g)

    def quadratic(self, g: Tensor) -> Tensor:
        """(k,) g_iᵀ(C_T + λI)⁻¹g_i for (k, p) rows, at the cost of one batched solve or less."""
        return self.solver.quadratic(g)


@dataclass(frozen=True)
class FitOptions:
    """What a fit does; validated once by :class:`~repif.estimator.InfluenceEstimator`."""

    curvature: str
    damping: float
    solver: str
    solver_options: dict[str, Any]
    sampler: _samplers.Sampler
    sample_size: int | None
    seed: int
    shrinkage: float | str
    #: Options of the Kronecker-factored fits (curvature "kfac"/"ekfac", or the preconditioner
    #: of cg/lissa): fisher, other_layers, cache_dir (repif.curvature.kinds.KFAC).
    kronecker_options: dict[str, Any] = field(default_factory=dict)
    #: Two-phase sampling: a sampler that reads logits or features picks its m points from
    #: ``candidates``·m drawn uniformly from the pool, so the statistics pass reads those only
    #: (None: from the whole pool). See :func:`candidate_pool`.
    candidates: float | None = None


#: Seed stream of the uniform candidate draw, apart from the sampler's own stream (same seed ⇒
#: same candidates ⇒ same subset, bit for bit).
CANDIDATE_STREAM = 0x5EED
#: Seed stream of the uniform draw a Kronecker prior is fitted on (``prior_size``).
PRIOR_STREAM = 0x9A10
#: Seed stream of the uniform draw an EK-FAC eigenbasis is fitted on (``basis_size``).
BASIS_STREAM = 0xBA515


def candidate_pool(pool: Tensor, m: int, factor: float, seed: int) -> Tensor:
    """The first phase of two-phase sampling: ⌈factor·m⌉ of ``pool``'s indices drawn uniformly
    without replacement (in training order, so the pass over them reads the data in order), or
    all of ``pool`` when that is not fewer.

    A uniform draw keeps every estimator of the second phase honest: the sampler's weights
    estimate the candidates' mean curvature (exactly, for Horvitz–Thompson weights), and the
    candidates' mean is an unbiased estimate of the pool's, so the subset's weighted curvature
    stays an unbiased estimate of the pool's (docs/design.md, "Samplers")."""
    k = math.ceil(factor * m)
    if k >= pool.numel():
        return pool
    rng = np.random.default_rng((CANDIDATE_STREAM, int(seed)))
    picked = np.sort(rng.choice(pool.numel(), size=k, replace=False))
    return pool[torch.from_numpy(picked)]


class CurvatureFitter:
    """Fits curvature subsets of one model's training data (see module doc)."""

    def __init__(
        self,
        fm: FunctionalModel,
        source: DataSource,
        options: FitOptions,
        budget: MemoryBudget,
        cost: CostModel,
        output_dim: int,
        *,
        progress: bool | None = False,
    ) -> None:
        self.fm, self.source, self.options = fm, source, options
        self.budget, self.cost, self.output_dim = budget, cost, output_dim
        #: Bars for the passes over data a fit makes (see :func:`repif.progress.bar`).
        self.progress = progress
        #: Precomputed (n_train, C) logits, (n_train, d) features and (n_train,) targets of every
        #: training point at the trained parameters (see :meth:`use_statistics`), or None.
        self.statistics: tuple[Tensor, Tensor, Tensor] | None = None
        #: Whether a draw has read the pool statistics (a sampler that needs them).
        self.statistics_used = False
        #: The last curvature built at the trained parameters, with the subset it was built on:
        #: kept so that a solver failing after an expensive fit (a damping too small for
        #: 'eigen'), a refit with the same subset or a new damping reuses it (Kronecker factors
        #: and their eigendecomposition do not depend on λ).
        #: The last field is the pool (training indices; None: all) the subset was drawn from.
        self.kept: tuple[Subset, str, Any, Tensor | None] | None = None

    def use_statistics(self, statistics: PoolStatistics | tuple[Tensor, Tensor, Tensor]) -> None:
        """Serve later pool statistics from ``statistics`` (logits, features, targets of all
        ``n_train`` points, in training order, at the parameters this fitter was built with:
        what :meth:`pool_statistics` of all points returns) instead of a pass over the data.
        Statistics whose targets differ from the training targets (where those are known
        without a pass) are refused: they were made on other data."""
        if isinstance(statistics, PoolStatistics):
            statistics = tuple(statistics)
        if not (isinstance(statistics, (tuple, list)) and len(statistics) == 3
                and all(isinstance(t, Tensor) for t in statistics)):
            raise ValueError("pool_statistics must be a PoolStatistics or a (logits, features, "
                             "targets) tuple of tensors, as estimator.pool_statistics() returns")
        logits, feats, targets = statistics
        rows = {int(t.shape[0]) if t.dim() else -1 for t in statistics}
        if rows != {self.n_train} or logits.dim() != 2 or logits.shape[1] != self.output_dim:
            raise ValueError(
                f"pool_statistics must hold one row per training point: expected ({self.n_train}, "
                f"{self.output_dim}) logits and {self.n_train} rows of features and targets, got "
                f"shapes {[tuple(t.shape) for t in statistics]}"
            )
        check_statistics_targets(targets, self.cheap_labels(torch.arange(self.n_train)))
        self.statistics = (logits.cpu(), feats.cpu(), targets.cpu())

    def with_damping(self, damping: float, fitted: FittedCurvature | None
                     ) -> FittedCurvature | None:
        """Use λ = ``damping`` from now on, keeping the fitted curvature: the solver is
        prepared again on ``fitted``'s subset and curvature (or, after a fit whose solver
        refused the old damping, on what that fit kept); None when nothing was fitted."""
        self.options = dataclasses.replace(self.options, damping=float(damping))
        if fitted is not None:
            prepared = self.prepare(fitted.subset, pool=fitted.pool)
            return FittedCurvature(fitted.subset, prepared.solver,
                                   {**fitted.timings, **prepared.timings}, fitted.pool)
        if self.kept is not None:  # a fit whose solver failed: finish it now
            return self.prepare(self.kept[0], pool=self.kept[3])
        return None

    @property
    def task(self) -> Task:
        return self.fm.task

    @property
    def n_train(self) -> int:
        return len(self.source)

    # ------------------------------------------------------------------ the pool
    def pool(self, indices: Tensor | None = None) -> Pool:
        """A :class:`Pool` over ``indices`` (default: all training points)."""
        idx = torch.arange(self.n_train) if indices is None else check_indices(
            indices, self.n_train, "pool indices"
        )
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError("pool indices contain duplicates; pass each training index once")
        idx = idx.cpu()
        labels = self.cheap_labels(idx)
        return Pool(idx, labels, self.output_dim, stats=lambda: self.pool_statistics(idx))

    def cheap_labels(self, idx: Tensor) -> Tensor | None:
        """Labels without a pass over the data, when the data are tensors split the default way
        (targets last); else None (they then come with the pool's forward pass)."""
        if self.source.tensors is None or type(self.task).split is not Task.split:
            return None
        return self.source.tensors[-1][idx.to(self.source.tensors[-1].device)].cpu()

    def pool_statistics(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One streaming forward pass → (k, C) logits, (k, d) penultimate features and (k,)
        targets, on the CPU, in the order of ``indices``."""
        self.statistics_used = True
        if self.statistics is not None:
            idx = indices.cpu()
            return tuple(t[idx] for t in self.statistics)
        rows = self.budget.rows(self.cost.forward_row())
        if not distributed.is_distributed():
            return self._pool_pass(indices, rows)
        # each rank streams its share, cut at the same chunk boundaries as one process would
        # use when the pool is large; the shares are gathered so every rank sees every point
        rows = self.source.chunk_rows(distributed.agree(rows))
        mine = distributed.shard(indices, distributed.balanced_block(indices.numel(), rows))
        logits, feats, targets = self._pool_pass(mine, rows)
        return tuple(distributed.all_gather_cat(t) for t in (logits, feats, targets))

    def _pool_pass(self, indices: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        outs, feats, targets = [], [], []
        with progress_bar(indices.numel(), "pool statistics", self.progress) as bar:
            for _, batch in self.source.batches(indices, rows):
                inputs, y = split_batch(self.fm, batch)
                self.task.check_targets(y, self.output_dim)
                o, f = self.fm.logits_and_features(inputs)
                outs.append(o.cpu())
                feats.append(f.cpu())
                targets.append(y.cpu())
                bar.update(o.shape[0])
        if not outs:  # an empty share (more ranks than points): shapes from one probe point
            inputs, y = split_batch(self.fm, self.source.first())
            o, f = self.fm.logits_and_features(inputs)
            return o[:0].cpu(), f[:0].cpu(), y[:0].cpu()
        return torch.cat(outs), torch.cat(feats), torch.cat(targets)

    # ------------------------------------------------------------------ fitting
    def draw(self, pool: Tensor | None = None) -> FittedCurvature:
        """Draw a subset of ``pool`` (training indices; default all) and prepare the solver."""
        t0 = time.perf_counter()
        subset = self.select(pool)
        if distributed.is_distributed():  # every rank drew the same; make it so by construction
            subset = Subset(distributed.broadcast(subset.indices),
                            distributed.broadcast(subset.weights))
        sample_s = time.perf_counter() - t0
        fitted = self.prepare(subset, pool=pool)
        return FittedCurvature(subset, fitted.solver, {"sample_s": sample_s, **fitted.timings},
                               fitted.pool)

    def select(self, pool: Tensor | None = None, seed: int | None = None) -> Subset:
        """The curvature subset of ``pool`` (training indices; default all) drawn with the
        fit's sampler, size and ``seed`` (default the fit's), two-phase when ``candidates`` is
        set; no solver is prepared."""
        p = self.pool(pool)
        if len(p) == 0:
            raise ValueError("the pool is empty; pass at least one training index")
        o = self.options
        seed = o.seed if seed is None else seed
        if o.sample_size is None:
            uniform = torch.full((len(p),), 1.0 / len(p), dtype=torch.float64)
            return Subset(p.indices.clone(), uniform)
        if o.candidates is not None and o.sampler.uses_statistics:
            if o.sample_size > len(p):  # the sampler's own message names the sizes
                o.sampler.select(p, o.sample_size, seed)
            p = self.pool(candidate_pool(p.indices, o.sample_size, o.candidates, seed))
        return o.sampler.select(p, o.sample_size, seed)

    def prior_subset(self, pool: Tensor | None, size: int | None,
                     stream: int = PRIOR_STREAM) -> Subset:
        """The points a Kronecker prior (or, ``stream`` = :data:`BASIS_STREAM`, an EK-FAC
        eigenbasis) is fitted on, with equal weights: all of ``pool`` (default every training
        point), or ``size`` of them drawn uniformly without
        replacement (in training order) with the fit's seed on ``stream``."""
        p = self.pool(pool).indices
        if size is not None and size < p.numel():
            rng = np.random.default_rng((stream, int(self.options.seed)))
            p = p[torch.from_numpy(np.sort(rng.choice(p.numel(), size=size, replace=False)))]
        return Subset(p.clone(), torch.full((p.numel(),), 1.0 / p.numel(), dtype=torch.float64))

    def with_basis(self, kind: curvature_kinds.CurvatureKind,
                   request: curvature_kinds.CurvatureRequest, pool: Tensor | None = None
                   ) -> curvature_kinds.CurvatureRequest:
        """``request`` with the points of ``kind``'s EK-FAC eigenbasis (its ``basis_size``:
        that many of ``pool`` drawn uniformly, or "pool": all of it) gathered on the request's
        device; unchanged for a kind without one."""
        size = getattr(kind, "basis_size", None)
        if size is None:
            return request
        points = self.prior_subset(pool, None if size == "pool" else int(size), BASIS_STREAM)
        x, y = self.subset_batch(points, request.fm)
        return dataclasses.replace(request, basis=curvature_kinds.BasisPoints(points, x, y))

    def subset_batch(self, subset: Subset, fm: FunctionalModel | None = None) -> tuple[Any, Any]:
        """The subset's model inputs and targets, gathered whole (m points) on ``fm``'s
        device."""
        fm = fm or self.fm
        batch = to_device(self.source.gather(subset.indices), fm.device, fm.dtype)
        return self.task.split(batch)

    def request(self, subset: Subset, fm: FunctionalModel | None = None
                ) -> curvature_kinds.CurvatureRequest:
        """What a curvature kind needs to build on ``subset`` (gathered whole: m points) at
        ``fm``'s parameters: handed to the kind, which never calls back into the fitter."""
        fm = fm or self.fm
        x, y = self.subset_batch(subset, fm)
        o = self.options
        sampled = o.sample_size is not None
        return curvature_kinds.CurvatureRequest(
            fm=fm, subset=subset, x=x, y=y, budget=self.budget, seed=o.seed,
            progress=self.progress,
            shrinkage=resolve_shrinkage(o.shrinkage, len(subset)) if sampled else 0.0,
            sampler=getattr(o.sampler, "name", None) if sampled else None,
            sampler_options=dict(vars(o.sampler)) if sampled else {},
        )

    def operator(self, subset: Subset, fm: FunctionalModel | None = None) -> CurvatureOperator:
        """The exact curvature ("ggn"/"hessian") on ``subset`` (gathered whole: m points) at
        ``fm``'s parameters."""
        kind = self.options.curvature if self.options.curvature in ("ggn", "hessian") else "ggn"
        return curvature_kinds.build(kind).build(self.request(subset, fm))

    def curvature(self, subset: Subset, fm: FunctionalModel | None = None,
                  request: curvature_kinds.CurvatureRequest | None = None,
                  pool: Tensor | None = None) -> Any:
        """The curvature of the fit's kind on ``subset`` at ``fm``'s parameters: an exact
        :class:`CurvatureOperator` ("ggn", "hessian") or a fitted
        :class:`~repif.curvature.kfac.KroneckerCurvature` ("kfac", "ekfac"; an eigenbasis of
        its own drawn from ``pool``, see :meth:`with_basis`)."""
        o = self.options
        own = fm is None or fm is self.fm
        if own and self.kept is not None:
            kept, name, curvature, _ = self.kept
            if name == o.curvature and torch.equal(kept.indices, subset.indices) and \
                    torch.equal(kept.weights, subset.weights):
                return curvature
        options = o.kronecker_options if curvature_kinds.get(o.curvature).kronecker else {}
        kind = curvature_kinds.build(o.curvature, options)
        curvature = kind.build(self.with_basis(kind, request or self.request(subset, fm), pool))
        if own:
            self.kept = (subset, o.curvature, curvature, None if pool is None else pool.clone())
        return curvature

    def prepare(self, subset: Subset, fm: FunctionalModel | None = None,
                pool: Tensor | None = None) -> FittedCurvature:
        """A solver fitted on ``subset`` at ``fm``'s parameters (default: the trained ones).
        A preconditioner named by the solver's options ("kfac"/"ekfac") is fitted on the same
        subset, with the same weights; a Kronecker prior (woodbury's ``prior``) on ``pool``
        (training indices; default all), or on ``prior_size`` of its points drawn uniformly
        (:meth:`prior_subset`), or (``prior_points="subset"``) on the subset with its weights;
        an EK-FAC eigenbasis (``basis_size``) on points of the same pool (:meth:`with_basis`)."""
        t0 = time.perf_counter()
        o = self.options
        options = dict(o.solver_options)
        if "seed" in _solvers.accepted_options(o.solver):
            options.setdefault("seed", o.seed)  # LiSSA batches, Lanczos start vector
        timings = {}
        request = None  # gathered once for both fits, and not at all for a kept curvature
        if isinstance(options.get("preconditioner"), str):
            request = self.request(subset, fm)
            kind = curvature_kinds.build(options["preconditioner"], o.kronecker_options)
            options["preconditioner"] = kind.build(self.with_basis(kind, request, pool))
            timings["preconditioner_fit_s"] = time.perf_counter() - t0
        if isinstance(options.get("prior"), str):
            t1 = time.perf_counter()
            kind = curvature_kinds.build(options["prior"], o.kronecker_options)
            if options.get("prior_points") == "subset":  # the subset, its weights
                request = request or self.request(subset, fm)
                prior_request = dataclasses.replace(request, shrinkage=0.0)
            else:
                prior_points = self.prior_subset(pool, options.get("prior_size"))
                prior_request = dataclasses.replace(
                    self.request(prior_points, fm), shrinkage=0.0, sampler=None,
                    sampler_options={}, prior=True)
            options["prior"] = kind.build(self.with_basis(kind, prior_request, pool))
            timings["prior_fit_s"] = time.perf_counter() - t1
        curvature = self.curvature(subset, fm, request, pool)
        solver = _solvers.build(o.solver, options).fit(curvature, o.damping)
        return FittedCurvature(subset, solver,
                               {"solver_fit_s": time.perf_counter() - t0, **timings},
                               None if pool is None else pool.clone())
