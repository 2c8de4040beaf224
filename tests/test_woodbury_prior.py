"""Woodbury's Kronecker prior (``prior="ekfac"``) against dense solves of the curvature it
stands for, on the digits MLP of conftest (p = 2,410, float64): the subset's exact GGN C_T
plus a full-rank prior fitted on the whole pool, in that prior's Kronecker eigenbasis."""

from __future__ import annotations

import pytest
import torch

import repif
from repif.curvature.kfac import fit_kronecker

pytestmark = pytest.mark.usefixtures("single_thread")

LAMBDA = 0.03


def _estimator(mlp, **options) -> repif.InfluenceEstimator:
    model, train, _ = mlp
    kw = {"damping": LAMBDA, "sample_size": 64, "seed": 0, "curvature": "ggn",
          "solver": "woodbury", **options}
    return repif.InfluenceEstimator(model, train, **kw).fit()


def _basis(prior) -> torch.Tensor:
    """(p, p) rows: the prior's Kronecker eigenvectors in flat parameter order, layer by layer
    in the order of their eigenvalue matrices (row k·d + l is q_g[:, k] ⊗ q_a[:, l])."""
    rows = []
    for layer, f in zip(prior.layers, prior.factors, strict=True):
        outer = torch.einsum("ok,dl->klod", f.q_g, f.q_a).reshape(-1, layer.out, layer.d)
        flat = torch.zeros(outer.shape[0], prior.size, dtype=outer.dtype)
        layer.scatter(outer, flat)
        rows.append(flat)
    return torch.cat(rows)


def _dense_subset_ggn(est) -> torch.Tensor:
    op = repif.curvature.operator.CurvatureOperator(
        est.solver.operator.fm, est.solver.operator.x, est.solver.operator.y,
        est.subset.weights, kind="ggn")
    return op.dense()


def _test_gradients(est, mlp) -> torch.Tensor:
    _, _, (xte, yte) = mlp
    return est.test_gradients((xte[:3], yte[:3]))


@pytest.mark.parametrize("mode", ["fill", "blend", "calibrate"])
def test_prior_matches_dense_solve(digits_mlp, mode):
    est = _estimator(digits_mlp, prior="ekfac", prior_mode=mode, prior_weight=0.3)
    prior = est.solver.prior
    # fitted on the whole pool with equal weights
    model, (x, y), _ = digits_mlp
    fresh = fit_kronecker(est.solver.operator.fm, x, y,
                          torch.full((len(y),), 1.0 / len(y), dtype=torch.float64))
    for a, b in zip(prior.factors, fresh.factors, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12)
    c_t = _dense_subset_ggn(est)
    u = _basis(prior)
    lam = torch.cat([f.eigenvalues.reshape(-1) for f in prior.factors])
    if mode == "fill":
        d = (lam - torch.einsum("jp,pq,jq->j", u, c_t, u)).clamp_min(0)
        combined = u.T @ torch.diag(d) @ u + c_t
    elif mode == "blend":
        combined = u.T @ torch.diag(0.3 * lam) @ u + 0.7 * c_t
    else:
        own = torch.einsum("jp,pq,jq->j", u, c_t, u)
        scale = torch.where(own > 0, (0.7 * lam / own).sqrt(), torch.zeros_like(own))
        rotated = u @ c_t @ u.T
        calibrated = scale[:, None] * rotated * scale[None, :]
        d = torch.where(own > 0, 0.3 * lam, lam)
        combined = u.T @ (calibrated + torch.diag(d)) @ u
        # its diagonal in the prior's eigenbasis is the prior's eigenvalues exactly
        torch.testing.assert_close((u @ combined @ u.T).diagonal(), lam, rtol=1e-8,
                                   atol=1e-12)
    g = _test_gradients(est, digits_mlp)
    eye = torch.eye(c_t.shape[0], dtype=c_t.dtype)
    ref = torch.linalg.solve(combined + LAMBDA * eye, g.T).T
    got = est.inverse_hvp(g)
    assert float((got - ref).norm() / ref.norm()) < 1e-8


def test_fill_with_the_whole_pool_is_the_exact_solve(digits_mlp):
    """With every pool point in the subset, EK-FAC's eigenvalues are the subset's own diagonal
    in its basis: "fill" adds nothing and the solve is the exact GGN's."""
    model, train, (xte, yte) = digits_mlp
    kw = {"damping": LAMBDA, "curvature": "ggn"}
    pool = torch.arange(200)
    exact = repif.InfluenceEstimator(model, train, solver="direct", **kw).fit(pool)
    filled = repif.InfluenceEstimator(model, train, solver="woodbury", prior="ekfac",
                                      **kw).fit(pool)
    g = exact.test_gradients((xte[:3], yte[:3]))
    v = exact.inverse_hvp(g)
    assert float((filled.inverse_hvp(g) - v).norm() / v.norm()) < 1e-6


def test_prior_size_draws_that_many_points_of_the_pool(digits_mlp):
    est = _estimator(digits_mlp, prior="ekfac", prior_size=300)
    sub = est.fitter.prior_subset(None, 300)
    assert sub.indices.numel() == 300 and torch.equal(sub.indices, sub.indices.sort().values)
    assert torch.equal(sub.indices, est.fitter.prior_subset(None, 300).indices)  # seeded
    assert "prior_fit_s" in est.timings


def test_prior_options_are_checked(digits_mlp):
    model, train, _ = digits_mlp
    for bad, msg in [({"prior": "diag"}, "prior must be"),
                     ({"prior": "ekfac", "prior_mode": "mix"}, "prior_mode"),
                     ({"prior": "ekfac", "prior_weight": 1.5}, "prior_weight"),
                     ({"prior": "ekfac", "prior_size": 0}, "prior_size"),
                     ({"prior_mode": "blend"}, "prior='ekfac'"),
                     ({"prior_points": "subset"}, "prior='ekfac'"),
                     ({"prior": "ekfac", "prior_points": "all"}, "prior_points must be"),
                     ({"prior": "ekfac", "prior_points": "subset", "prior_size": 100,
                       "prior_mode": "blend"}, "pass one of them"),
                     ({"prior": "ekfac", "prior_points": "subset"}, "nothing would be added")]:
        with pytest.raises(ValueError, match=msg):
            repif.InfluenceEstimator(model, train, solver="woodbury", sample_size=32,
                                     **bad).fit()
    with pytest.raises(ValueError, match="shrinkage or a prior"):
        repif.InfluenceEstimator(model, train, solver="woodbury", sample_size=32,
                                 shrinkage=0.3, prior="ekfac").fit()


def test_first_sampler_takes_the_pool_in_order(digits_mlp):
    model, train, _ = digits_mlp
    pool = torch.arange(100, 200)
    for seed in (0, 1):
        est = repif.InfluenceEstimator(model, train, sampler="first", sample_size=10,
                                       seed=seed, solver="woodbury")
        sub = est.fitter.select(pool)
        assert torch.equal(sub.indices, torch.arange(100, 110))
        torch.testing.assert_close(sub.weights, torch.full((10,), 0.1, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["fill", "calibrate"])
def test_quadratic_form_with_a_prior_is_the_solve_dotted(digits_mlp, mode):
    """Self-influence's quadratic form gᵀ(C + λI)⁻¹g, taken in the prior's eigenbasis (an
    orthogonal rotation), equals the row-wise dot of g with the solve; float64 round-off of the
    two factorisation paths, hence the tolerance."""
    est = _estimator(digits_mlp, prior="ekfac", prior_mode=mode)
    g = _test_gradients(est, digits_mlp)
    torch.testing.assert_close(est.solver.quadratic(g), (g * est.solver.solve(g)).sum(1),
                               rtol=1e-8, atol=1e-12)


def test_prior_on_the_subset_with_the_pools_basis(digits_mlp):
    """prior_points="subset" with kronecker_options basis_size: the prior is EK-FAC with its
    eigenbasis from the pool and its eigenvalues from the weighted subset (built here by hand
    from fit_kronecker), and the solve is the dense solve of the blend it stands for."""
    model, (x, y), _ = digits_mlp
    est = _estimator(digits_mlp, sampler="logit-importance", prior="ekfac",
                     prior_mode="blend", prior_weight=0.3, prior_points="subset",
                     kronecker_options={"basis_size": "pool", "cache_dir": False})
    prior = est.solver.prior
    sub = est.subset
    fm = est.solver.operator.fm
    want = fit_kronecker(fm, x[sub.indices], y[sub.indices], sub.weights,
                         basis=(x, y, torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)))
    for a, b in zip(prior.factors, want.factors, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.s_a, b.s_a, rtol=1e-9, atol=1e-12)
    c_t = _dense_subset_ggn(est)
    u = _basis(prior)
    lam = torch.cat([f.eigenvalues.reshape(-1) for f in prior.factors])
    combined = u.T @ torch.diag(0.3 * lam) @ u + 0.7 * c_t
    g = _test_gradients(est, digits_mlp)
    eye = torch.eye(c_t.shape[0], dtype=c_t.dtype)
    ref = torch.linalg.solve(combined + LAMBDA * eye, g.T).T
    got = est.inverse_hvp(g)
    assert float((got - ref).norm() / ref.norm()) < 1e-8


def test_fill_with_an_ekfac_prior_on_the_subset_would_add_nothing(digits_mlp):
    """Why prior_points='subset' refuses "fill" for EK-FAC: the prior's eigenvalues are the
    subset's own GGN diagonal in its basis, so the fill's d = max(Λ_K − diag_Q(C_T), 0) is 0
    (checked here on a prior fitted by hand on the subset, with the pool's basis)."""
    model, (x, y), _ = digits_mlp
    est = _estimator(digits_mlp, sampler="logit-importance")
    sub = est.subset
    prior = fit_kronecker(est.solver.operator.fm, x[sub.indices], y[sub.indices], sub.weights,
                          basis=(x, y, torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)))
    u = _basis(prior)
    own = torch.einsum("jp,pq,jq->j", u, _dense_subset_ggn(est), u)
    lam = torch.cat([f.eigenvalues.reshape(-1) for f in prior.factors])
    torch.testing.assert_close(lam, own, rtol=1e-8, atol=1e-10 * float(lam.max()))
