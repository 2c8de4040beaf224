"""EK-FAC with its eigenbasis from a larger sample (``kronecker_options={"basis_size": N}``).

References, independent of the fit's passes:

* the basis is the eigenbasis of A and G built by hand, point by point, on the basis points
  (tests/_kronecker_reference.py), and Λ is the diagonal, in that basis, of the exact GGN of the
  *subset* with the sampler's weights (a dense CurvatureOperator, built by autograd);
* through the estimator: the basis points are a uniform draw of the pool (of the removal's
  retained points when a pool is given), seeded, reproducible and cached apart from other
  fits; bad values and kinds that cannot use it are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from _kronecker_reference import hand_factors
from torch import nn

import repif
from repif.curvature import kfac
from repif.curvature.operator import CurvatureOperator
from repif.fitting import BASIS_STREAM
from repif.task import ClassificationTask, FunctionalModel

pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_basis(q: torch.Tensor, ref: torch.Tensor, vals: torch.Tensor) -> bool:
    """Eigenvectors agree up to sign (the test's spectra are simple): compared on the
    eigenvalues well above round-off only."""
    keep = vals > 1e-8 * vals.max()
    dots = (q[:, keep] * ref[:, keep]).sum(0).abs()
    return bool((dots > 1 - 1e-8).all())


def test_basis_from_other_points_and_eigenvalues_from_the_weighted_subset(digits):
    x_all, y_all = (torch.from_numpy(t[:300]) for t in digits)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double().eval()
    task = ClassificationTask(weight_decay=1e-3)
    fm = FunctionalModel(model, task)
    xb, yb = x_all[:200], y_all[:200]  # basis points, equal weights
    wb = torch.full((200,), 1 / 200, dtype=torch.float64)
    xs, ys = x_all[250:270], y_all[250:270]  # a 20-point subset, unequal weights
    ws = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ws /= ws.sum()

    fit = kfac.fit_kronecker(fm, xs, ys, ws, kind="ekfac", basis=(xb, yb, wb))
    layers, _ = kfac.kronecker_layers(fm)
    a_ref, g_ref = hand_factors(model, layers, xb, yb, wb, task)
    ggn = CurvatureOperator(fm, xs, ys, ws).dense() - task.weight_decay * torch.eye(
        fm.space.size, dtype=torch.float64)  # the subset's GGN without the decay
    for layer, f, a, g in zip(fit.layers, fit.factors, a_ref, g_ref, strict=True):
        s_a, q_a = torch.linalg.eigh(a)
        s_g, q_g = torch.linalg.eigh(g)
        assert _rel(f.s_a, s_a) < 1e-10 and _rel(f.s_g, s_g) < 1e-10
        assert _same_basis(f.q_a, q_a, s_a) and _same_basis(f.q_g, q_g, s_g)
        idx = layer.gather(torch.arange(fm.space.size)[None].double())[0].flatten().long()
        q = torch.kron(f.q_g, f.q_a)
        want = torch.diagonal(q.T @ ggn[idx[:, None], idx[None, :]] @ q)
        assert _rel(f.eigenvalues.flatten(), want) < 1e-10

    # the same points for both halves is plain EK-FAC, bit for bit
    plain = kfac.fit_kronecker(fm, xs, ys, ws, kind="ekfac")
    same = kfac.fit_kronecker(fm, xs, ys, ws, kind="ekfac", basis=(xs, ys, ws))
    for f, h in zip(plain.factors, same.factors, strict=True):
        assert torch.equal(f.eigenvalues, h.eigenvalues) and torch.equal(f.q_a, h.q_a)
    # the subset's eigenvalues in a basis that sees more of the inputs: the first layer's A
    # on 20 points has rank ≤ 20 of 65, so the subset's own basis leaves ≥ 45 directions at 0;
    # the basis fitted on 200 points puts the same subset's curvature in fewer, larger ones
    assert int((plain.factors[0].s_a > 1e-12).sum()) <= 20
    assert int((fit.factors[0].s_a > 1e-12).sum()) > 20
    with pytest.raises(ValueError, match="kind='ekfac'"):
        kfac.fit_kronecker(fm, xs, ys, ws, kind="kfac", basis=(xb, yb, wb))


def _estimator(model, train, **kw):
    base = dict(curvature="ekfac", solver="eigen", damping=0.03, sample_size=64, seed=0,
                sampler="logit-importance")
    return repif.InfluenceEstimator(model, train, **{**base, **kw})


def test_estimator_draws_the_basis_points_uniformly_and_reproducibly(digits_mlp, tmp_path):
    model, train, test = digits_mlp
    queries = (test[0][:4], test[1][:4])
    opts = {"basis_size": 400, "cache_dir": False}
    est = _estimator(model, train, kronecker_options=opts).fit()
    fitter = est.fitter
    points = fitter.prior_subset(None, 400, BASIS_STREAM)
    assert points.indices.numel() == 400 and torch.unique(points.indices).numel() == 400
    assert torch.equal(points.indices, points.indices.sort().values)  # training order
    # the same fit by hand: basis on those points with equal weights, Λ on the subset
    fm = FunctionalModel(model, ClassificationTask())
    xb, yb = train[0][points.indices], train[1][points.indices]
    sub = est.subset
    want = kfac.fit_kronecker(fm, train[0][sub.indices], train[1][sub.indices], sub.weights,
                              kind="ekfac", basis=(xb, yb, points.weights))
    v = est.inverse_hvp(est.test_gradients(queries))
    v_want = want.inverse(est.test_gradients(queries), 0.03)
    assert _rel(v, v_want) < 1e-10  # the same sums in the same order, up to chunking
    # same seed, same numbers; another seed, other basis points
    again = _estimator(model, train, kronecker_options=opts).fit()
    assert torch.equal(again.inverse_hvp(again.test_gradients(queries)), v)
    other = _estimator(model, train, seed=1, kronecker_options=opts).fit()
    assert not torch.equal(other.fitter.prior_subset(None, 400, BASIS_STREAM).indices,
                           points.indices)
    # "pool": every training point
    whole = _estimator(model, train, kronecker_options={"basis_size": "pool",
                                                        "cache_dir": False}).fit()
    assert whole.fitter.prior_subset(None, None, BASIS_STREAM).indices.numel() == len(train[0])
    # a cached fit records its basis points: another basis is not served from the cache
    cached = _estimator(model, train, kronecker_options={"basis_size": 400,
                                                         "cache_dir": str(tmp_path)}).fit()
    assert _rel(cached.inverse_hvp(cached.test_gradients(queries)), v) < 1e-12
    bigger = _estimator(model, train, kronecker_options={"basis_size": 800,
                                                         "cache_dir": str(tmp_path)}).fit()
    assert len(list(tmp_path.glob("ekfac-*.safetensors"))) == 2
    assert not torch.equal(bigger.inverse_hvp(bigger.test_gradients(queries)), v)


def test_the_basis_comes_from_the_pool_the_subset_was_drawn_from(digits_mlp, basis_draws):
    """A removal draws its subset from the retained points; the basis (and, the same way, a
    Woodbury prior) must come from them too, at every Newton step; the estimator's own fit and
    a new damping after the removal keep the whole training set."""
    model, train, _ = digits_mlp
    drawn = basis_draws
    est = _estimator(model, train, kronecker_options={"basis_size": "pool", "cache_dir": False})
    est.fit()
    assert len(drawn) == 1 and drawn[0].numel() == len(train[1])  # the whole training set
    removed = torch.nonzero(train[1] == 0).flatten()
    est.remove(removed, scale=1.0, steps=2)
    assert len(drawn) == 3  # one basis per Newton step, each on the retained points only
    for idx in drawn[1:]:
        assert idx.numel() == len(train[1]) - removed.numel()
        assert not bool(torch.isin(idx, removed).any())
    est.set_damping(0.1)  # the estimator's own fit again: a basis it refits is on every point
    assert all(idx.numel() == len(train[1]) for idx in drawn[3:])
    fitted = est.fitter.draw(torch.arange(500, 1000))
    assert torch.equal(fitted.pool, torch.arange(500, 1000))
    again = est.fitter.with_damping(0.2, fitted)
    assert torch.equal(again.pool, fitted.pool)


@pytest.mark.parametrize(("options", "match"), [
    (dict(curvature="ekfac", kronecker_options={"basis_size": 0}), "basis_size must be"),
    (dict(curvature="ekfac", kronecker_options={"basis_size": "all"}), "basis_size must be"),
    (dict(curvature="ekfac", kronecker_options={"basis_size": 2.5}), "basis_size must be"),
    (dict(curvature="kfac", kronecker_options={"basis_size": 100}), "use curvature='ekfac'"),
])
def test_bad_basis_options_are_refused_by_name(digits_mlp, options, match):
    model, train, _ = digits_mlp
    with pytest.raises(ValueError, match=match):
        _estimator(model, train, **options)
