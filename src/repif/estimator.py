"""The facade: :class:`InfluenceEstimator`.

Conventions (used everywhere in repif):

* C is the curvature of the mean training loss on the sampled subset T (weights Σw = 1), plus
  ``weight_decay``·I; λ = ``damping``. ``inverse_hvp(g)`` = (C + λI)⁻¹ g.
* Influence of training point z on the loss at test point z_t:
  I(z, z_t) = −∇l(z_t)ᵀ (C + λI)⁻¹ ∇l(z), arranged (n_test, n_train). It estimates the change of
  the test loss per unit of *up-weighting* z, so **negative scores are proponents** (more of z
  lowers the test loss) and positive scores opponents. Retraining without z (on the other n − 1
  points, same recipe) changes the test loss by about −(I(z, z_t) − Ī)/(n − 1), Ī the mean score
  of z_t over the training set; −I(z, z_t)/n holds only if the others keep weight 1/n and the
  regulariser stays fixed (docs/design.md, "Maths").
* ``self_influence(i)`` = I(z_i, z_i) = −∇l_iᵀ(C + λI)⁻¹∇l_i (≤ 0 for PSD curvature; a larger
  magnitude means the point is more self-supporting, e.g. mislabelled or atypical).
* Data are streamed: training and test data may be ``(x, y)`` tensors or a torch ``Dataset``
  (or ``DataLoader``) of items of any structure; every pass goes chunk by chunk, each chunk
  sized by one memory budget (``max_memory``); only the curvature subset is held whole.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from repif import distributed
from repif import options as _options
from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.curvature.operator import resolve_shrinkage
from repif.data import DataSource, take
from repif.fitting import CurvatureFitter, FitOptions, FittedCurvature
from repif.gradients.hooks import LayerGradientEngine, layer_engine, unsupported_layers
from repif.gradients.streaming import CostModel, split_batch, stream_gradients, stream_scores
from repif.memory import MemoryBudget
from repif.progress import bar as progress_bar
from repif.projection import (
    DEFAULT_PROJECTION_DIM,
    PROJECTION_BASES,
    SCORE_METHODS,
    KroneckerProjection,
    ProjectedCurvature,
    ProjectedGradients,
    check_dim,
    eigen_bases,
)
from repif.recording import ATTRIBUTE as RECORDED
from repif.recording import PoolStatistics, module_digest
from repif.samplers import Pool, Subset
from repif.task import FunctionalModel, Task
from repif.unlearning import newton_removal
from repif.validation import (
    check_choice,
    check_count,
    check_finite,
    check_finite_number,
    check_indices,
    check_vector,
)

#: Default damping λ: small against typical GGN eigenvalues of a trained classifier (order 1),
#: large enough to keep (C + λI) well conditioned in the directions the subset does not see.
DEFAULT_DAMPING = 1e-2

#: Per-sample gradient engines: "auto" (hooks where eligible, else torch.func), "hooks", "func".
PER_SAMPLE_ENGINES = ("auto", "hooks", "func")

#: Training points the hook engine is checked on against torch.func before it is used.
PROBE_POINTS = 2

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


class InfluenceEstimator:
    """Influence functions with curvature estimated on a sampled subset of the training data.

    ``train`` is ``(x, y)``, a torch ``Dataset`` of items of any structure (tuples, dicts;
    collated by ``collate_fn``) or a ``DataLoader``. ``task`` says how a batch becomes model
    inputs, targets and per-sample losses, and holds the objective's ``weight_decay`` (the
    ``weight_decay=`` argument sets it on the default task). ``max_memory`` (bytes; default a
    quarter of the free RAM, at most 1 GiB, or of the GPU memory) sizes every streamed chunk;
    ``batch_size`` caps it.
    The caller's model is copied (and put in eval mode); it is never modified. ``fit(pool)``
    draws the curvature subset from ``pool`` and prepares the solver; every method that needs it
    fits on all training points first if you have not called ``fit``. ``solver_options`` (a
    dict) and extra keyword arguments go to the solver; an option the solver does not take is
    an error naming the solver, and ``batch_size`` with a solver that has its own (LiSSA's
    mini-batch) must be placed explicitly (``solver_options={"batch_size": 16}``).

    ``curvature="kfac"`` or ``"ekfac"`` fits Kronecker factors of the GGN on the subset (with
    the sampler's weights) and needs ``solver="eigen"``; ``solver="cg"`` or ``"lissa"`` with
    ``preconditioner="ekfac"`` solves the exact subset curvature with those factors as the
    preconditioner. ``kronecker_options`` configure either fit: ``fisher`` ("exact" or
    "sampled"), ``other_layers`` ("error", "identity", "frozen"), ``weight_sharing`` ("expand"
    or "reduce": K-FAC-reduce, far cheaper on convolutions) and ``cache_dir`` (see
    :mod:`repif.curvature.kinds`). ``pool_statistics`` (from another estimator's
    :meth:`pool_statistics`, same model and data, or a :class:`~repif.recording.PoolStatistics`
    recorded during training) spares the logit/feature samplers their pass; statistics that
    ``repif.train(..., record_statistics=True)`` left on the model are used by default when
    they belong to its weights and to these training targets.
    ``candidates`` (a factor c ≥ 1) makes such a sampler pick its ``sample_size`` points from
    c·``sample_size`` candidates drawn uniformly from the pool, so its pass reads those only
    (two-phase sampling: the weighted subset still estimates the pool's curvature without
    bias); None reads the whole pool.

    ``scores="projected"`` makes :meth:`influence` score from Kronecker-structured random
    projections of each layer's gradient (:mod:`repif.projection`), ``projection_dim`` per
    layer side (default :data:`~repif.projection.DEFAULT_PROJECTION_DIM`) onto the top
    eigenvectors of the subset's K-FAC factors (``projection_basis="eigen"``) or random
    orthonormal rows (``"random"``), with the subset's
    GGN taken in the projected space (:meth:`projected_curvature`; the ``solver`` still serves
    :meth:`inverse_hvp`, :meth:`self_influence` and :meth:`remove`): the training side costs
    about one forward+backward whatever the number of queries, and its projected gradients can
    be stored once (:meth:`projected_gradients`) and passed back for later queries.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        *,
        curvature: str = "ggn",
        damping: float = DEFAULT_DAMPING,
        solver: str = "direct",
        sampler: str = "random",
        sample_size: int | None = None,
        seed: int = 0,
        weight_decay: float | None = None,
        shrinkage: float | str = 0.0,
        task: Task | None = None,
        device: str | torch.device | None = None,
        max_memory: int | MemoryBudget | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        progress: bool | None = False,
        per_sample: str = "auto",
        chunk_size: int | None = None,
        sampler_options: dict[str, Any] | None = None,
        kronecker_options: dict[str, Any] | None = None,
        pool_statistics: PoolStatistics | tuple[Tensor, Tensor, Tensor] | None = None,
        candidates: float | None = None,
        solver_options: dict[str, Any] | None = None,
        scores: str = "exact",
        projection_dim: int | None = None,
        projection_basis: str = "eigen",
        **options: Any,
    ) -> None:
        kind = curvature_kinds.get(curvature)  # unknown names list the known ones
        check_choice(scores, SCORE_METHODS, "scores")
        if projection_dim is not None and scores != "projected":
            raise ValueError("projection_dim sets the dimension of scores='projected'; pass "
                             "scores='projected' with it, or drop it")
        check_choice(projection_basis, PROJECTION_BASES, "projection_basis")
        if projection_dim is not None:
            check_dim(projection_dim)
        solver_options = _options.solver_options(solver, solver_options, options, batch_size)
        check_finite_number(damping, "damping")
        if not damping >= 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}; a typical value is 1e-3–1e-1")
        if sample_size is not None and (isinstance(sample_size, bool) or sample_size <= 0):
            raise ValueError(
                f"sample_size must be a positive integer or None (whole pool), got {sample_size!r}"
            )
        if sample_size is not None:
            shrink = resolve_shrinkage(shrinkage, int(sample_size))  # fails here, not at fit
            if shrink and kind.kronecker:
                raise ValueError(f"shrinkage applies to curvature='ggn', not {curvature!r}; "
                                 "pass shrinkage=0")
        if chunk_size is not None:
            warnings.warn("chunk_size is deprecated: chunks are sized by max_memory; "
                          "batch_size caps them", DeprecationWarning, stacklevel=2)
            batch_size = batch_size or chunk_size
        _solvers.build(solver, solver_options)  # unknown names or options fail here, not at fit
        kronecker_options = _options.check_kronecker(curvature, kind, solver, solver_options,
                                             kronecker_options)
        self.sampler = _samplers.build(sampler, sampler_options)
        self.curvature, self.damping, self.solver_name = curvature, float(damping), solver
        self.sampler_name, self.sample_size, self.seed = sampler, sample_size, seed
        self.shrinkage = shrinkage
        self.solver_options = solver_options
        self.task = _options.resolve_task(task, weight_decay)
        if solver == "eigen" and damping + self.task.weight_decay <= 0:
            raise ValueError(
                "solver 'eigen' needs damping + weight_decay > 0: a Kronecker factor of softmax "
                "cross-entropy is singular (the output layer's G has the all-ones null "
                "direction: shifting every logit together leaves the loss unchanged), so λ = 0 "
                "would fail after the fit; pass damping > 0, e.g. 1e-3 × the curvature's scale")
        self.progress = progress

        params = list(model.parameters())
        dev = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu")
        )
        self.model = copy.deepcopy(model).to(dev).eval()
        distributed.broadcast_module(self.model)  # over several processes: rank 0's weights
        for name, p in self.model.named_parameters():
            check_finite(p.detach(), f"model parameter {name!r}")
        self.fm = FunctionalModel(self.model, self.task)
        self.budget = MemoryBudget.resolve(max_memory, dev)
        self.source = DataSource(train, collate_fn=collate_fn, batch_size=batch_size,
                                 num_workers=num_workers)
        if self.source.tensors is not None:
            check_finite(self.source.tensors[0], "training inputs")
        distributed.check_agree("training data", self.source.fingerprint())
        distributed.check_agree("estimator options", _options.options_fingerprint(
            curvature, damping, solver, solver_options, sampler, sampler_options, sample_size,
            seed, shrinkage, self.task.weight_decay, kronecker_options, candidates))
        inputs, targets = split_batch(self.fm, self.source.first())
        self.output_dim = self.fm.output_dim(inputs)  # a model that fails on the data: one error
        if self.source.tensors is not None and type(self.task).split is Task.split:
            self.task.check_targets(self.source.tensors[-1], self.output_dim)
        else:
            self.task.check_targets(targets, self.output_dim)
        self.fm.check_task(inputs, targets)  # one loss per point, finite: else one error
        self.source.validate = self._validate_batch
        self.cost = CostModel(self.fm, inputs, self._engine(per_sample))
        self.scores = scores
        self._projection: KroneckerProjection | None = None
        self._projected_curvature: ProjectedCurvature | None = None
        if scores == "projected":
            if self.cost.engine is None:
                raise ValueError(
                    "scores='projected' works from each layer's inputs and output gradients: it "
                    "needs the hook engine (every trainable parameter in an nn.Linear, Conv2d, "
                    "BatchNorm (eval), LayerNorm or Embedding called once per forward, and "
                    "per_sample='auto' or 'hooks'); use scores='exact'"
                )
            self._projection_spec = (DEFAULT_PROJECTION_DIM if projection_dim is None
                                     else projection_dim, projection_basis)
        options = FitOptions(curvature, float(damping), solver, dict(solver_options),
                             self.sampler, sample_size, seed, shrinkage, kronecker_options,
                             _options.check_candidates(candidates))
        self.fitter = CurvatureFitter(self.fm, self.source, options, self.budget, self.cost,
                                      self.output_dim, progress=progress)
        if pool_statistics is None:
            pool_statistics = self._recorded_statistics(model)
        elif isinstance(pool_statistics, PoolStatistics):
            pool_statistics.check_model(model)
        if pool_statistics is not None:
            self.fitter.use_statistics(tuple(pool_statistics))
            self._check_statistics_targets(pool_statistics[2])
        self._fitted: FittedCurvature | None = None

    def _recorded_statistics(self, model: nn.Module) -> PoolStatistics | None:
        """Statistics recorded while ``model`` trained (``repif.train(...,
        record_statistics=True)``), if they belong to its weights and hold one row per training
        point; else None (the samplers make their own pass)."""
        recorded = getattr(model, RECORDED, None)
        if not isinstance(recorded, PoolStatistics) or len(recorded.targets) != self.n_train:
            return None
        if recorded.model_digest is None or recorded.model_digest != module_digest(model):
            return None
        return recorded

    def _check_statistics_targets(self, targets: Tensor) -> None:
        """Statistics of other data (same size, other points) would silently steer the sampler:
        their targets must be these training targets where those are at hand."""
        mine = self.fitter.cheap_labels(torch.arange(self.n_train))
        if mine is not None and not torch.equal(mine.reshape(-1).cpu(),
                                                targets.reshape(-1).to(mine.dtype)):
            raise ValueError(
                "the pool statistics' targets differ from the training targets: they were "
                "made on other data (or in another order); pass statistics of this training "
                "set, in dataset order, or none"
            )

    def _engine(self, per_sample: str) -> LayerGradientEngine | None:
        """The hook-based per-sample engine ("hooks", or "auto" where the model is eligible and
        agrees with torch.func on a probe of the first training points), else None."""
        check_choice(per_sample, PER_SAMPLE_ENGINES, "per_sample")
        if per_sample == "func":
            return None
        probe = self.source.gather(torch.arange(min(PROBE_POINTS, len(self.source))))
        engine = layer_engine(self.fm, *split_batch(self.fm, probe))
        if engine is None and per_sample == "hooks":
            missing = unsupported_layers(self.fm)
            raise ValueError(
                "per_sample='hooks' needs every trainable parameter in an nn.Linear, Conv2d, "
                "BatchNorm (eval), LayerNorm, Embedding or Hugging Face Conv1D called once per "
                "forward" + (f"; without a rule: {', '.join(missing[:10])}" if missing else
                             " (a layer is called twice, or the self-check disagreed)")
                + "; use per_sample='auto' or 'func'"
            )
        return engine

    # ------------------------------------------------------------------ fitting
    @property
    def num_params(self) -> int:
        return self.fm.space.size

    @property
    def n_train(self) -> int:
        return len(self.source)

    @property
    def weight_decay(self) -> float:
        """The objective's L2 coefficient (the task's)."""
        return self.task.weight_decay

    def pool(self, indices: Tensor | None = None) -> Pool:
        """A :class:`Pool` over ``indices`` (default: all training points)."""
        return self.fitter.pool(indices)

    def logits_and_features(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """One streaming forward pass → (k, C) logits and (k, d) penultimate features (CPU)."""
        logits, feats, _ = self.fitter.pool_statistics(check_indices(indices, self.n_train))
        return logits, feats

    def pool_statistics(self) -> PoolStatistics:
        """(n_train, C) logits, (n_train, d) features and (n_train,) targets of every training
        point (CPU; one streaming forward pass). Pass them as ``pool_statistics=`` to other
        estimators of the same model, parameters and data, and their logit and feature
        samplers skip that pass (e.g. one per removed class, sampler or seed)."""
        logits, feats, targets = self.fitter.pool_statistics(torch.arange(self.n_train))
        return PoolStatistics(logits, feats, targets, module_digest(self.model), origin="pass")

    def fit(self, pool: Tensor | None = None) -> InfluenceEstimator:
        """Draw the curvature subset from ``pool`` (training indices) and prepare the solver."""
        self._fitted = self.fitter.draw(pool)
        return self

    def set_damping(self, damping: float) -> InfluenceEstimator:
        """Change λ, keeping the fitted curvature: the solver is prepared again on the same
        subset and the curvature already built there (Kronecker factors and their
        eigendecomposition are not recomputed; an exact curvature's solver refactorises). Also
        after a fit whose solver refused the old damping: the next fit reuses what was fitted.
        Returns self."""
        check_finite_number(damping, "damping")
        if not damping >= 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}; a typical value is 1e-3–1e-1")
        self.damping = float(damping)
        self.fitter.options = dataclasses.replace(self.fitter.options, damping=float(damping))
        if self._fitted is not None:
            subset, timings = self._fitted.subset, self._fitted.timings
            prepared = self.fitter.prepare(subset)
            self._fitted = FittedCurvature(subset, prepared.solver,
                                           {**timings, **prepared.timings})
        elif self.fitter.kept is not None:  # a fit whose solver failed: finish it now
            subset = self.fitter.kept[0]
            self._fitted = self.fitter.prepare(subset)
        return self

    def draw(self, pool: Tensor | None = None) -> FittedCurvature:
        """A subset of ``pool`` and a solver prepared on it, without storing them (``fit``
        stores them)."""
        return self.fitter.draw(pool)

    @property
    def fitted(self) -> FittedCurvature:
        """The fitted curvature: subset, solver and timings (fits on all points first if
        needed)."""
        if self._fitted is None:
            self.fit()
        assert self._fitted is not None
        return self._fitted

    @property
    def subset(self) -> Subset:
        """The curvature subset (fits on all training points first if needed)."""
        return self.fitted.subset

    @property
    def solver(self) -> _solvers.Solver:
        return self.fitted.solver

    @property
    def timings(self) -> dict[str, float]:
        return self.fitted.timings if self._fitted is not None else {}

    # ------------------------------------------------------------------ products
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
            x, y = self.fitter.subset_batch(subset)
            w = subset.weights.to(self.fm.device, self.fm.dtype)
            classes = self.output_dim
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

    # ------------------------------------------------------------------ removal
    def remove(self, indices: Tensor, scale: float | str = 1.0, steps: int = 1,
               gradient: Tensor | None = None, validation: Any = None) -> nn.Module:
        """A new model with training points ``indices`` removed by Newton (influence) steps.

        See :func:`repif.unlearning.newton_removal` for the update and what ``scale`` (η) and
        ``steps`` do. The curvature must come from the remaining points R: if the estimator is not
        fitted, or its subset holds removed points, a subset of R is drawn for this call (with the
        same sampler, size and seed) and the estimator's own fit is left as it was.
        ``gradient``: the first step's g for these indices at this model's parameters
        (:func:`repif.unlearning.removal_gradient`), when already computed — e.g. once for
        several estimators of the same model removing the same points; None computes it.

        ``scale="auto"`` picks η on ``validation`` (held-out points in any form ``influence``
        takes for its test side; they need points of the removed class(es) and of the others)
        as the command line's ``--scale auto`` does: the η of :data:`repif.unlearning.SCALE_GRID`
        with the best removal F1 there. After the update the retained classes' accuracy is
        measured (on ``validation``, else on the curvature subset's remaining training points)
        and a :class:`repif.RemovalWarning` names the drop and the fix when less than 90% of it
        is kept. ``last_removal`` then holds the η used and the accuracies measured.
        """
        source = None if validation is None else self._test_source(validation)
        self.last_removal: dict[str, float] = {}
        return newton_removal(self.fitter, self._fitted, indices, scale=scale, steps=steps,
                              gradient=gradient, validation=source, report=self.last_removal)


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
