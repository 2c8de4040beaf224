"""The facade: :class:`InfluenceEstimator`.

Conventions (used everywhere in repif):

* C is the curvature of the mean training loss on the sampled subset T (weights Σw = 1), plus
  ``weight_decay``·I; λ = ``damping``. ``inverse_hvp(g)`` = (C + λI)⁻¹ g.
* Influence of training point z on the loss at test point z_t:
  I(z, z_t) = −∇l(z_t)ᵀ (C + λI)⁻¹ ∇l(z), arranged (n_test, n_train). It estimates the change of
  the test loss per unit of *up-weighting* z, so **negative scores are proponents** (more of z
  lowers the test loss) and positive scores opponents. Removing z alone changes the test loss by
  about −I(z, z_t)/n.
* ``self_influence(i)`` = I(z_i, z_i) = −∇l_iᵀ(C + λI)⁻¹∇l_i (≤ 0 for PSD curvature; a larger
  magnitude means the point is more self-supporting, e.g. mislabelled or atypical).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from repif import samplers as _samplers
from repif import solvers as _solvers
from repif.curvature import CURVATURES, CurvatureOperator, resolve_shrinkage
from repif.data import as_tensors
from repif.gradients import DEFAULT_CHUNK, per_sample_gradients
from repif.samplers import Pool, Subset
from repif.task import ClassificationTask, FunctionalModel
from repif.validation import check_finite, check_indices, check_vector

#: Default damping λ: small against typical GGN eigenvalues of a trained classifier (order 1),
#: large enough to keep (C + λI) well conditioned in the directions the subset does not see.
DEFAULT_DAMPING = 1e-2


@dataclass(frozen=True)
class TopK:
    """Most helpful (``proponents``: most negative scores) and most harmful training points."""

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor


class InfluenceEstimator:
    """Influence functions with curvature estimated on a sampled subset of the training data.

    ``train`` is ``(x, y)`` or a torch ``Dataset`` of ``(x, y)`` pairs. The caller's model is
    copied (and put in eval mode); it is never modified. ``fit(pool)`` draws the curvature subset
    from ``pool`` and prepares the solver; every method that needs it fits on all training points
    first if you have not called ``fit``. Extra keyword arguments go to the solver.
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
        weight_decay: float = 0.0,
        shrinkage: float | str = 0.0,
        task: ClassificationTask | None = None,
        device: str | torch.device | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        sampler_options: dict[str, Any] | None = None,
        **solver_options: Any,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(
                f"unknown curvature {curvature!r}; known curvatures: {', '.join(CURVATURES)}"
            )
        if not damping >= 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}; a typical value is 1e-3–1e-1")
        if sample_size is not None and (isinstance(sample_size, bool) or sample_size <= 0):
            raise ValueError(
                f"sample_size must be a positive integer or None (whole pool), got {sample_size!r}"
            )
        _solvers.build(solver, solver_options)  # unknown names or options fail here, not at fit
        self.sampler = _samplers.build(sampler, sampler_options)
        self.curvature, self.damping, self.solver_name = curvature, float(damping), solver
        self.sampler_name, self.sample_size, self.seed = sampler, sample_size, seed
        self.weight_decay, self.chunk_size = float(weight_decay), chunk_size
        self.shrinkage = shrinkage
        self.solver_options = solver_options
        self.task = task or ClassificationTask()

        params = list(model.parameters())
        dev = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu")
        )
        self.model = copy.deepcopy(model).to(dev).eval()
        for name, p in self.model.named_parameters():
            check_finite(p.detach(), f"model parameter {name!r}")
        self.fm = FunctionalModel(self.model, self.task)
        x, y = as_tensors(train)
        check_finite(x, "training inputs")
        self.x, self.y = x.to(dev, self.fm.dtype), y.to(dev)
        with torch.no_grad():
            self.output_dim = int(self.fm.output(self.fm.theta, self.x[:1]).shape[-1])
        self.task.check_targets(self.y, self.output_dim)
        self._subset: Subset | None = None
        self._solver: _solvers.Solver | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ fitting
    @property
    def num_params(self) -> int:
        return self.fm.space.size

    @property
    def n_train(self) -> int:
        return int(self.x.shape[0])

    def pool(self, indices: Tensor | None = None) -> Pool:
        """A :class:`Pool` over ``indices`` (default: all training points)."""
        idx = torch.arange(self.n_train) if indices is None else check_indices(
            indices, self.n_train, "pool indices"
        )
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError("pool indices contain duplicates; pass each training index once")
        idx = idx.cpu()
        return Pool(idx, self.y[idx.to(self.y.device)].cpu(), self.output_dim,
                    stats=lambda: self.logits_and_features(idx))

    def logits_and_features(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """One streaming forward pass → (k, C) logits and (k, d) penultimate features (CPU)."""
        outs, feats = [], []
        for s in range(0, indices.numel(), 4 * self.chunk_size):
            part = indices[s : s + 4 * self.chunk_size].to(self.x.device)
            o, f = self.fm.logits_and_features(self.x[part])
            outs.append(o.cpu())
            feats.append(f.cpu())
        return torch.cat(outs), torch.cat(feats)

    def fit(self, pool: Tensor | None = None) -> InfluenceEstimator:
        """Draw the curvature subset from ``pool`` (training indices) and prepare the solver."""
        self._subset, self._solver, self.timings = self.draw(pool)
        return self

    def draw(
        self, pool: Tensor | None = None
    ) -> tuple[Subset, _solvers.Solver, dict[str, float]]:
        """A subset of ``pool``, a solver prepared on it and their timings, without storing them
        (``fit`` stores them)."""
        t0 = time.perf_counter()
        p = self.pool(pool)
        if len(p) == 0:
            raise ValueError("the pool is empty; pass at least one training index")
        if self.sample_size is None:
            uniform = torch.full((len(p),), 1.0 / len(p), dtype=torch.float64)
            subset = Subset(p.indices.clone(), uniform)
        else:
            subset = self.sampler.select(p, self.sample_size, self.seed)
        t1 = time.perf_counter()
        solver = self._prepare_solver(self.fm, subset)
        return subset, solver, {"sample_s": t1 - t0, "solver_fit_s": time.perf_counter() - t1}

    def _prepare_solver(self, fm: FunctionalModel, subset: Subset) -> _solvers.Solver:
        idx = subset.indices.to(self.x.device)
        sampled = self.sample_size is not None
        op = CurvatureOperator(
            fm, self.x[idx], self.y[idx], subset.weights,
            kind=self.curvature, weight_decay=self.weight_decay,
            shrinkage=resolve_shrinkage(self.shrinkage, len(subset)) if sampled else 0.0,
        )
        options = dict(self.solver_options)
        if "seed" in _solvers.accepted_options(self.solver_name):
            options.setdefault("seed", self.seed)  # LiSSA batches, Lanczos start vector
        return _solvers.build(self.solver_name, options).fit(op, self.damping)

    def _ensure_fitted(self) -> _solvers.Solver:
        if self._solver is None:
            self.fit()
        assert self._solver is not None
        return self._solver

    @property
    def subset(self) -> Subset:
        """The curvature subset (fits on all training points first if needed)."""
        self._ensure_fitted()
        assert self._subset is not None
        return self._subset

    @property
    def solver(self) -> _solvers.Solver:
        return self._ensure_fitted()

    # ------------------------------------------------------------------ products
    def inverse_hvp(self, vec: Tensor) -> Tensor:
        """(C + λI)⁻¹ vec for a (p,) or (k, p) vector; same shape out."""
        rows = check_vector(vec, self.num_params, "vector")
        out = self._ensure_fitted().solve(rows.to(self.fm.device, self.fm.dtype))
        return out.reshape(vec.shape)

    def train_gradients(self, indices: Tensor | None = None) -> Tensor:
        """(k, p) per-sample loss gradients of training points ``indices`` (default all)."""
        idx = torch.arange(self.n_train) if indices is None else check_indices(
            indices, self.n_train
        )
        idx = idx.to(self.x.device)
        return per_sample_gradients(self.fm, self.x[idx], self.y[idx], chunk_size=self.chunk_size)

    def test_gradients(self, test: Any) -> Tensor:
        """(n, p) per-sample loss gradients of arbitrary points ``(x, y)``."""
        x, y = as_tensors(test)
        check_finite(x, "test inputs")
        self.task.check_targets(y, self.output_dim)
        return per_sample_gradients(
            self.fm, x.to(self.fm.device, self.fm.dtype), y.to(self.fm.device),
            chunk_size=self.chunk_size,
        )

    def influence(self, test: Any, train_indices: Tensor | None = None) -> Tensor:
        """(n_test, n_train) scores I(z_j, z_t) = −∇l(z_t)ᵀ(C + λI)⁻¹∇l(z_j) (see module doc)."""
        v_test = self.inverse_hvp(self.test_gradients(test))
        idx = torch.arange(self.n_train) if train_indices is None else check_indices(
            train_indices, self.n_train
        )
        scores = []
        for s in range(0, idx.numel(), 4 * self.chunk_size):
            g = self.train_gradients(idx[s : s + 4 * self.chunk_size])
            scores.append(-(v_test @ g.T))
        return torch.cat(scores, dim=1)

    def self_influence(self, indices: Tensor | None = None) -> Tensor:
        """(k,) I(z_i, z_i) = −∇l_iᵀ(C + λI)⁻¹∇l_i for training points ``indices``."""
        g = self.train_gradients(indices)
        return -(g * self.inverse_hvp(g)).sum(dim=1)

    def top_k(self, test_point: Any, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents among the training points of one test
        point ``(x, y)`` (x with or without a batch dimension of 1)."""
        x, y = (torch.as_tensor(t) for t in test_point)
        x, y = x.reshape(1, *self.x.shape[1:]), y.reshape(1)
        scores = self.influence((x, y))[0]
        k = min(k, scores.numel())
        lo = torch.topk(scores, k, largest=False)
        hi = torch.topk(scores, k, largest=True)
        return TopK(lo.indices, lo.values, hi.indices, hi.values)

    # ------------------------------------------------------------------ removal
    def remove(self, indices: Tensor, scale: float = 1.0, steps: int = 1) -> nn.Module:
        """A new model with training points ``indices`` removed by Newton (influence) steps.

        See :func:`repif.unlearning.newton_removal` for the update and what ``scale`` (η) and
        ``steps`` do. The curvature must come from the remaining points R: if the estimator is not
        fitted, or its subset holds removed points, a subset of R is drawn for this call (with the
        same sampler, size and seed) and the estimator's own fit is left as it was.
        """
        from repif.unlearning import newton_removal

        return newton_removal(self, indices, scale=scale, steps=steps)
