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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from repif import distributed
from repif import options as _options
from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import kinds as curvature_kinds
from repif.fitting import CurvatureFitter, FitOptions, FittedCurvature
from repif.gradients.hooks import choose_engine
from repif.gradients.streaming import CostModel
from repif.memory import MemoryBudget
from repif.preparation import copy_model, training_source
from repif.projected_scores import ProjectedScoring
from repif.projection import check_projection
from repif.recording import PoolStatistics, module_digest, resolve_statistics
from repif.samplers import Pool, Subset
from repif.scoring import Scoring
from repif.task import FunctionalModel, Task
from repif.unlearning import newton_removal
from repif.validation import (
    check_indices,
)

#: Default damping λ: small against typical GGN eigenvalues of a trained classifier (order 1),
#: large enough to keep (C + λI) well conditioned in the directions the subset does not see.
DEFAULT_DAMPING = 1e-2


class InfluenceEstimator(Scoring, ProjectedScoring):
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
    or "reduce": K-FAC-reduce, far cheaper on convolutions), ``basis_size`` (EK-FAC: its
    eigenbasis from that many points of the pool drawn uniformly, or "pool", its eigenvalues
    from the subset) and ``cache_dir`` (see
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
        curvature: str | Any = "ggn",
        damping: float = DEFAULT_DAMPING,
        solver: str | _solvers.Solver = "direct",
        sampler: str | _samplers.Sampler = "random",
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
        # a component is a name with its options, or an instance carrying them
        curvature, kronecker_options = _options.component(
            curvature, kronecker_options, curvature_kinds.REGISTRY, "curvature",
            "kronecker_options")
        sampler, sampler_options = _options.component(
            sampler, sampler_options, _samplers.REGISTRY, "sampler", "sampler_options")
        if not isinstance(solver, str):
            solver, solver_options = _options.component(
                solver, {**(solver_options or {}), **options}, _solvers.REGISTRY, "solver",
                "solver options")
            options = {}
        kind = curvature_kinds.get(curvature)  # unknown names list the known ones
        solver_options = _options.solver_options(solver, solver_options, options, batch_size)
        batch_size = _options.check_arguments(kind, curvature, damping, sample_size, shrinkage,
                                              chunk_size, batch_size)
        check_projection(scores, projection_dim, projection_basis)
        _solvers.build(solver, solver_options)  # unknown names or options fail here, not at fit
        kronecker_options = _options.check_kronecker(curvature, kind, solver, solver_options,
                                             kronecker_options)
        self.sampler = _samplers.build(sampler, sampler_options)
        self.curvature, self.damping, self.solver_name = curvature, float(damping), solver
        self.sampler_name, self.sample_size, self.seed = sampler, sample_size, seed
        self.shrinkage = shrinkage
        self.solver_options = solver_options
        self.task = _options.resolve_task(task, weight_decay)
        _options.check_eigen_damping(solver, damping, self.task.weight_decay)
        self.progress = progress

        self.model = copy_model(model, device)
        self.fm = FunctionalModel(self.model, self.task)
        self.budget = MemoryBudget.resolve(max_memory, self.fm.device)
        self.source, self.output_dim, inputs = training_source(
            self.fm, train, collate_fn=collate_fn, batch_size=batch_size,
            num_workers=num_workers)
        distributed.check_agree("estimator options", _options.options_fingerprint(
            curvature, damping, solver, solver_options, sampler, sampler_options, sample_size,
            seed, shrinkage, self.task.weight_decay, kronecker_options, candidates))
        self.source.validate = self._validate_batch
        self.cost = CostModel(self.fm, inputs, choose_engine(self.fm, self.source, per_sample))
        self._setup_projection(scores, projection_dim, projection_basis)
        options = FitOptions(curvature, float(damping), solver, dict(solver_options),
                             self.sampler, sample_size, seed, shrinkage, kronecker_options,
                             _options.check_candidates(candidates))
        self.fitter = CurvatureFitter(self.fm, self.source, options, self.budget, self.cost,
                                      self.output_dim, progress=progress)
        statistics = resolve_statistics(pool_statistics, model, self.n_train)
        if statistics is not None:
            self.fitter.use_statistics(statistics)
        self._fitted: FittedCurvature | None = None

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
        self.damping = _options.check_damping(damping)
        self._fitted = self.fitter.with_damping(self.damping, self._fitted)
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

