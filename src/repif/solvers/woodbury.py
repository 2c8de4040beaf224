"""Exact GGN solve through the Woodbury identity, cheap when the subset is small.

With A (mC × p) the GGN factor (C_T = AᵀA), shrinkage ρ and μ = λ + wd, the damped curvature is
D + A'ᵀA' with D = μ + ρ·diag(C_T) (a vector) and A' = √(1−ρ)·A. With S = A'D^{-1/2}:
(D + A'ᵀA')⁻¹ g = D^{-1/2} (h − Sᵀ (I + SSᵀ)⁻¹ S h), h = D^{-1/2} g. Cost O((mC)² p) time and
O(mC·p) memory instead of the dense solve's O(m C p²) and O(p²): this is the solver that makes
small curvature subsets pay off. Only S is kept (the factor is scaled in place: one copy).

A Kronecker prior (``prior="ekfac"`` or ``"kfac"``; docs/design.md, "Kronecker factors") fills
the directions a rank-≤ mC subset misses with a full-rank curvature fitted on a larger cheap
sample (the estimator fits it on the whole pool, or on ``prior_size`` points of it drawn
uniformly). With K = Q diag(Λ_K) Qᵀ the prior in its Kronecker eigenbasis, D becomes
μI + Q diag(d) Qᵀ, still cheap to invert and to take the square root of, so the solve stays
exact for the combined curvature:

``prior_points="subset"`` fits the prior on the subset itself, with the sampler's weights: with
``kronecker_options={"basis_size": …}`` that is EK-FAC with its eigenbasis from the pool and its
eigenvalues from the subset (docs/design.md, "Kronecker factors"), a full-rank prior that needs
no per-point pass over the pool; without it the prior sees only the subset's directions. With
an EK-FAC prior on the subset ``"fill"`` would add nothing (the prior's eigenvalues are the
subset's own diagonal in its basis) and is refused: blend or calibrate.

* ``prior_mode="fill"`` (the default): d = max(Λ_K − diag_Q(C_T), 0), the prior's eigenvalues
  less the subset's own diagonal in the same basis, with the subset's factor unshrunk. In every
  layer the diagonal of the combined curvature in the Kronecker eigenbasis is the prior's
  (EK-FAC fitted on the pool: the pool's exact diagonal there) wherever the subset has less,
  and the off-diagonal structure, including the cross-layer blocks, is the subset's. A control
  variate: for an EK-FAC prior on the whole pool, the combined curvature tends to the exact
  pool GGN as m grows, and where the subset is blind it still sees the pool's eigenvalues.
* ``prior_mode="blend"``: d = ρ·Λ_K and the factor scaled by √(1 − ρ), ρ = ``prior_weight``:
  the convex combination ρK + (1 − ρ)C_T (a shrinkage toward the prior).
* ``prior_mode="calibrate"``: the subset supplies the correlations between the prior's
  eigendirections and the prior their variances. Each rotated column of the subset's factor is
  rescaled so that the subset's diagonal in the eigenbasis becomes (1 − ρ)·Λ_K, and ρ·Λ_K is
  added (all of Λ_K in directions the subset does not touch): the diagonal of the combined
  curvature in the eigenbasis is the prior's exactly, and ρ shrinks the subset's correlations
  toward none (ρ = 1: the prior alone; ρ = 0: the subset's correlations at the prior's scale).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repif.curvature.kfac import KINDS, KroneckerCurvature
from repif.errors import TooLargeError
from repif.solvers.base import Solver, positive_int
from repif.validation import check_choice

#: Largest inner system (m·C rows) accepted by default: 12,000² float64 is 1.2 GB.
WOODBURY_MAX_ROWS = 12_000

#: Column blocks used to sum the factor's squared columns without a second copy of it.
ROW_BLOCK = 1024


class WoodburySolver(Solver):
    name = "woodbury"
    curvatures = ("ggn",)  # the GGN's factor JᵀΛ^½; the Hessian has none

    def __init__(self, max_rows: int = WOODBURY_MAX_ROWS, prior: Any = None,
                 prior_mode: str = "fill", prior_weight: float = 0.5,
                 prior_size: int | None = None, prior_points: str = "pool") -> None:
        self.max_rows = positive_int(max_rows, "max_rows")
        self.prior = check_prior(prior)
        check_choice(prior_mode, PRIOR_MODES, "prior_mode")
        self.prior_mode = prior_mode
        if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not (
                0.0 <= prior_weight <= 1.0):
            raise ValueError(f"prior_weight must be a number in [0, 1], got {prior_weight!r}")
        self.prior_weight = float(prior_weight)
        #: Points of the pool the estimator fits the prior on (None: all of it); read there.
        self.prior_size = None if prior_size is None else positive_int(prior_size, "prior_size")
        #: Points the estimator fits the prior on: "pool" (its points with equal weights) or
        #: "subset" (the subset with the sampler's weights); read there.
        check_choice(prior_points, PRIOR_POINTS, "prior_points")
        self.prior_points = prior_points
        if prior is None and (prior_mode != "fill" or prior_weight != 0.5
                              or prior_size is not None or prior_points != "pool"):
            raise ValueError("prior_mode, prior_weight, prior_size and prior_points configure "
                             "a Kronecker prior: pass prior='ekfac' (or 'kfac') with them")
        if prior_points == "subset" and prior_mode == "fill" and prior == "ekfac":
            # EK-FAC's eigenvalues are the fitted points' GGN diagonal in its basis: fitted on
            # the subset, they equal the subset's own diagonal, and "fill" adds their difference
            raise ValueError("prior_mode='fill' adds the prior's eigenvalues less the subset's "
                             "own diagonal in its basis, and an EK-FAC prior fitted on the "
                             "subset (prior_points='subset') has exactly that diagonal, so "
                             "nothing would be added: pass prior_mode='blend' (or "
                             "'calibrate'), or prior_points='pool'")
        if prior_points == "subset" and prior_size is not None:
            raise ValueError(f"prior_size={prior_size} draws pool points for the prior, but "
                             "prior_points='subset' fits it on the subset: pass one of them")

    def predicted_bytes(self) -> int:
        """Memory the fit keeps: the (mC, p) factor and two (mC, mC) matrices."""
        op = self.operator
        rows = op.n * op.output_dim
        item = op.fm.theta.element_size()
        return op.factor_bytes() + 2 * rows * rows * item

    def _prepare(self) -> None:
        op = self.operator
        mu = self.damping + op.weight_decay
        if not getattr(op, "gauss_newton", False):
            raise ValueError("solver 'woodbury' needs curvature='ggn'; use 'direct' or 'cg'")
        if mu <= 0:
            raise ValueError("solver 'woodbury' needs damping + weight_decay > 0; set damping")
        rows = op.n * op.output_dim
        if rows > self.max_rows:
            raise TooLargeError(
                f"solver 'woodbury' would form a {rows} × {rows} system ({op.n} subset points × "
                f"{op.output_dim} outputs, limit max_rows={self.max_rows}); use a smaller "
                "sample_size or solver='cg'"
            )
        op.budget.require(
            self.predicted_bytes(),
            f"solver 'woodbury' on {op.n} points × {op.output_dim} outputs × {op.size:,} "
            f"parameters (a {rows} × {op.size:,} factor)",
            "use solver='cg' or 'lissa' (memory independent of the subset size), a smaller "
            "sample_size, or raise max_memory",
        )
        s = op.ggn_factor()
        if self.prior is not None:
            if op.shrinkage:
                raise ValueError("solver 'woodbury' takes either shrinkage or a prior, not "
                                 "both: leave shrinkage at 0 when you pass a prior")
            self._prepare_prior(s, mu)
            return
        self.basis = None
        if op.shrinkage:
            diag = torch.zeros(op.size, dtype=s.dtype, device=s.device)
            for block in s.split(ROW_BLOCK):
                diag += block.pow(2).sum(0)
            op._diag = diag  # the operator's own diagonal, computed here for free
            self.d_isqrt = (mu + op.shrinkage * diag).rsqrt()
            s.mul_(self.d_isqrt * (1.0 - op.shrinkage) ** 0.5)
        else:
            self.d_isqrt = None
            s.mul_(mu ** -0.5)
        self._factorise(s, mu)

    def _prepare_prior(self, s: Tensor, mu: float) -> None:
        """D = μI + Q diag(d) Qᵀ from the Kronecker prior (module doc). The factor is kept
        rotated into the prior's eigenbasis, where D is diagonal: S = A'Q (μ + d)^{-1/2}."""
        op = self.operator
        prior = self.basis = resolve_prior(self.prior, op)
        own = torch.zeros(op.size, dtype=s.dtype, device=s.device)
        for block in s.split(ROW_BLOCK):
            block.copy_(_rotate(prior, block, inverse=False))
            own += block.square().sum(0)
        lam = torch.zeros(1, op.size, dtype=s.dtype, device=s.device)
        for layer, f in zip(prior.layers, prior.factors, strict=True):
            layer.scatter(f.eigenvalues[None], lam)
        lam = lam[0]
        rho = self.prior_weight
        if self.prior_mode == "blend":
            d = rho * lam
            s.mul_((1.0 - rho) ** 0.5)
        elif self.prior_mode == "calibrate":
            # a direction the subset touches only through round-off counts as unseen
            seen = own > UNSEEN * own.max()
            scale = torch.where(seen, ((1.0 - rho) * lam / own.clamp_min(
                torch.finfo(own.dtype).tiny)).sqrt(), torch.zeros_like(own))
            s.mul_(scale)
            d = torch.where(seen, rho * lam, lam)
        else:  # the prior's eigenvalues less the subset's own (0 outside the layers: lam = 0)
            d = (lam - own).clamp_min(0)
        self.d_isqrt = (mu + d).rsqrt()
        s.mul_(self.d_isqrt)
        self._factorise(s, mu)

    def _factorise(self, s: Tensor, mu: float) -> None:
        """Keep the scaled (mC, p) factor S and the Cholesky factor of I + SSᵀ."""
        self.mu = mu
        inner = s @ s.T
        inner.diagonal().add_(1.0)
        self.factor = s
        self._chol = torch.linalg.cholesky(inner)
        del inner
        self.kept_bytes = s.numel() * s.element_size() + self._chol.numel() * s.element_size()

    def _d_isqrt(self, v: Tensor) -> Tensor:
        return v * self.d_isqrt if self.d_isqrt is not None else v * self.mu ** -0.5

    def _solve(self, g: Tensor) -> Tensor:
        basis = self.basis
        h = self._d_isqrt(g if basis is None else _rotate(basis, g, inverse=False))  # (k, p)
        inner = torch.cholesky_solve(self.factor @ h.T, self._chol)  # (mC, k)
        v = self._d_isqrt(h - (self.factor.T @ inner).T)
        return v if basis is None else _rotate(basis, v, inverse=True)

    def quadratic(self, g: Tensor) -> Tensor:
        """gᵀ(D + A'ᵀA')⁻¹g = ‖h‖² − ‖L⁻¹ S h‖² with h = D^{-1/2} g (in the prior's eigenbasis,
        an orthogonal rotation, when there is a prior) and L the Cholesky factor of I + SSᵀ: one
        product with the factor instead of the solve's two."""
        basis = self.basis
        h = self._d_isqrt(g if basis is None else _rotate(basis, g, inverse=False))
        z = torch.linalg.solve_triangular(self._chol, self.factor @ h.T, upper=False)
        return h.pow(2).sum(1) - z.pow(2).sum(0)


#: ``calibrate``: a rotated column whose squared norm is below this fraction of the largest
#: holds only round-off, not a direction the subset sees.
UNSEEN = 1e-12

#: How a Kronecker prior and the subset's factor combine (module doc).
PRIOR_MODES = ("fill", "blend", "calibrate")
#: What a Kronecker prior is fitted on (module doc).
PRIOR_POINTS = ("pool", "subset")


def _rotate(prior: KroneckerCurvature, v: Tensor, inverse: bool) -> Tensor:
    """(k, p) rows into the prior's Kronecker eigenbasis (Qᵀv per layer) or back (Qv); the
    parameters outside its layers are left as they are."""
    out = v.clone()
    for layer, f in zip(prior.layers, prior.factors, strict=True):
        m = layer.gather(v)
        rot = (torch.matmul(f.q_g, m) @ f.q_a.T if inverse
               else torch.matmul(f.q_g.T, m) @ f.q_a)
        layer.scatter(rot, out)
    return out


def check_prior(value: Any) -> Any:
    """``value`` if it names a Kronecker prior ("kfac", "ekfac", None) or is a fitted
    :class:`KroneckerCurvature`, else ValueError."""
    if value is None or isinstance(value, KroneckerCurvature) or (
            isinstance(value, str) and value in KINDS):
        return value
    raise ValueError(f"prior must be one of None, 'kfac', 'ekfac' or a fitted "
                     f"repif.curvature.kfac.KroneckerCurvature, got {value!r}")


def resolve_prior(value: Any, operator: Any) -> KroneckerCurvature:
    """The fitted prior: ``value`` itself when fitted (the estimator fits it on the pool), else
    fitted here on the operator's own subset and weights (then "fill" adds nothing that EK-FAC
    does not already hold: fit it on more points through the estimator)."""
    from repif.solvers.preconditioning import kronecker_on

    return kronecker_on(value, operator, "prior")
