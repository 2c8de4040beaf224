"""repif's influence quantities against independent float64 references.

Every expected value here is computed in the test itself with numpy / scipy / plain torch
(closed-form gradients and Hessians, autograd Jacobians, retraining with L-BFGS + Newton), never
with repif's own gradient, curvature or solver code.

Conventions checked (see ``repif.estimator``): C = Σ_T w_i ∇²l(z_i) + wd·I, λ = damping,
I(z, z_t) = −∇l(z_t)ᵀ (C + λI)⁻¹ ∇l(z), arranged (n_test, n_train); removing z alone changes
the test loss by about −I(z, z_t)/n.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from sklearn.datasets import load_diabetes
from threadpoolctl import threadpool_limits
from torch import nn

import repif

pytestmark = pytest.mark.usefixtures("single_thread")

C_DIGITS, D_DIGITS = 10, 64


# --------------------------------------------------------------------------- closed forms
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _augment(x: np.ndarray) -> np.ndarray:
    """x̃ = [x, 1]."""
    return np.hstack([x, np.ones((len(x), 1))])


def _linear_order(d: int, c: int) -> np.ndarray:
    """Positions that reorder an "augmented" vector vec(W̃), W̃ = [W | b] of shape (c, d + 1),
    into nn.Linear's flat order (weight row-major, then bias)."""
    idx = np.arange(c * (d + 1)).reshape(c, d + 1)
    return np.concatenate([idx[:, :d].ravel(), idx[:, d]])


class SoftmaxRegression:
    """Multinomial logistic regression in closed form, parameters θ̃ = vec([W | b]) (c·(d+1))."""

    def __init__(self, d: int, c: int) -> None:
        self.d, self.c = d, c
        self.order = _linear_order(d, c)

    def probs(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        return _softmax(_augment(x) @ theta.reshape(self.c, self.d + 1).T)

    def losses(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = self.probs(theta, x)
        return -np.log(p[np.arange(len(y)), y])

    def objective(self, theta, x, y, wd):
        """Mean cross-entropy + (wd/2)‖θ‖² and its gradient (augmented order)."""
        p = self.probs(theta, x)
        n = len(y)
        r = p.copy()
        r[np.arange(n), y] -= 1.0
        loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * wd * theta @ theta
        return loss, (r.T @ _augment(x)).ravel() / n + wd * theta

    def grads(self, theta, x, y) -> np.ndarray:
        """(n, p) per-sample gradients (p − onehot) ⊗ x̃, in nn.Linear order."""
        r = self.probs(theta, x)
        r[np.arange(len(y)), y] -= 1.0
        g = (r[:, :, None] * _augment(x)[:, None, :]).reshape(len(y), -1)
        return g[:, self.order]

    def hessian(self, theta, x, weights, wd, *, linear_order=True) -> np.ndarray:
        """Σ_i w_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + wd·I."""
        p = self.probs(theta, x)
        xa = _augment(x)
        n, c, a = len(x), self.c, self.d + 1
        lam = p[:, :, None] * np.eye(c)[None] - p[:, :, None] * p[:, None, :]
        outer = (xa[:, :, None] * xa[:, None, :]).reshape(n, a * a)
        h = ((lam * weights[:, None, None]).reshape(n, c * c).T @ outer)
        h = h.reshape(c, c, a, a).transpose(0, 2, 1, 3).reshape(c * a, c * a)
        h = h + wd * np.eye(c * a)
        return h[np.ix_(self.order, self.order)] if linear_order else h

    def fit(self, x, y, wd, theta0=None, *, lbfgs_iter=300, tol=1e-11) -> np.ndarray:
        """L-BFGS, then Newton steps with backtracking until ‖∇‖ < ``tol`` (strictly convex)."""
        theta = np.zeros(self.c * (self.d + 1)) if theta0 is None else theta0.copy()
        uniform = np.full(len(y), 1.0 / len(y))
        with threadpool_limits(limits=1, user_api="blas"):
            if lbfgs_iter:
                theta = scipy.optimize.minimize(
                    self.objective, theta, args=(x, y, wd), jac=True, method="L-BFGS-B",
                    options={"maxiter": lbfgs_iter, "gtol": 1e-7, "ftol": 0.0},
                ).x
            for _ in range(50):
                loss, g = self.objective(theta, x, y, wd)
                if np.linalg.norm(g) < tol:
                    break
                step = np.linalg.solve(self.hessian(theta, x, uniform, wd, linear_order=False), g)
                s = 1.0
                while self.objective(theta - s * step, x, y, wd)[0] > loss and s > 1e-6:
                    s /= 2
                theta = theta - s * step
        gnorm = np.linalg.norm(self.objective(theta, x, y, wd)[1])
        assert gnorm < tol, f"reference training did not converge: ‖∇L‖ = {gnorm:.2e}"
        return theta

    def to_module(self, theta: np.ndarray) -> nn.Linear:
        lin = nn.Linear(self.d, self.c).double()
        w = theta.reshape(self.c, self.d + 1)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w[:, : self.d]))
            lin.bias.copy_(torch.from_numpy(w[:, self.d]))
        return lin

    def from_module(self, lin: nn.Linear) -> np.ndarray:
        w = lin.weight.detach().numpy()
        b = lin.bias.detach().numpy()
        return np.hstack([w, b[:, None]]).ravel()


def _rel(got, ref) -> float:
    """Norm-wise relative error ‖got − ref‖ / ‖ref‖."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _assert_entrywise(got, ref, rtol: float) -> float:
    """Every entry within rtol of the reference (plus rtol·1e-3·max|ref| for entries that are
    ~0 by cancellation); returns the largest entry-wise relative error among the rest."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    atol = rtol * 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
    big = np.abs(ref) > 1e3 * atol
    return float((np.abs(got - ref)[big] / np.abs(ref[big])).max())


# --------------------------------------------------------------------------- 1. softmax regression
@pytest.fixture(scope="module")
def softmax_problem(digits):
    """Softmax regression on 1,000 digits (wd = 1e-3, L-BFGS + Newton) and 20 test points."""
    x, y = digits
    perm = np.random.default_rng(1).permutation(len(x))
    tr, te = perm[:1000], perm[1000:1020]
    sr = SoftmaxRegression(D_DIGITS, C_DIGITS)
    wd = 1e-3
    theta = sr.fit(x[tr], y[tr], wd, lbfgs_iter=200, tol=1e-8)
    return {
        "sr": sr, "theta": theta, "wd": wd, "model": sr.to_module(theta),
        "xtr": x[tr], "ytr": y[tr], "xte": x[te], "yte": y[te],
    }


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_softmax_regression_full_curvature_matches_closed_form(softmax_problem, curvature):
    sp = softmax_problem
    sr, theta, wd, lam = sp["sr"], sp["theta"], sp["wd"], 1e-3
    xtr, ytr, xte, yte = sp["xtr"], sp["ytr"], sp["xte"], sp["yte"]
    n = len(ytr)

    # reference: H = mean_i Λ_i ⊗ x̃_i x̃_iᵀ + wd I (+ λ I); I = −g_t (H + λI)⁻¹ g_j
    g_tr, g_te = sr.grads(theta, xtr, ytr), sr.grads(theta, xte, yte)
    a = sr.hessian(theta, xtr, np.full(n, 1.0 / n), wd) + lam * np.eye(len(theta))
    v_te = np.linalg.solve(a, g_te.T).T
    ref_scores = -v_te @ g_tr.T
    ref_self = -np.einsum("ij,ij->i", g_tr, np.linalg.solve(a, g_tr.T).T)

    est = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), curvature=curvature, damping=lam,
        solver="direct", weight_decay=wd,
    ).fit()
    assert est.subset.indices.tolist() == list(range(n))
    np.testing.assert_allclose(est.subset.weights.numpy(), np.full(n, 1.0 / n), rtol=1e-15)

    np.testing.assert_allclose(est.train_gradients().numpy(), g_tr, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        est.test_gradients((_t(xte), _t(yte))).numpy(), g_te, rtol=1e-10, atol=1e-13
    )

    scores = est.influence((_t(xte), _t(yte))).numpy()
    assert scores.shape == (20, n)
    worst = _assert_entrywise(scores, ref_scores, 1e-6)
    assert _rel(scores, ref_scores) <= 1e-8, worst

    # a subset of train indices, in an arbitrary order
    some = np.array([17, 3, 999, 500, 3])
    np.testing.assert_allclose(
        est.influence((_t(xte), _t(yte)), train_indices=_t(some)).numpy(),
        ref_scores[:, some], rtol=1e-6, atol=1e-9 * np.abs(ref_scores).max(),
    )

    self_inf = est.self_influence().numpy()
    _assert_entrywise(self_inf, ref_self, 1e-6)
    assert (self_inf < 0).all()  # PSD curvature + damping ⇒ strictly negative
    np.testing.assert_allclose(
        est.self_influence(_t(np.array([5, 6]))).numpy(), ref_self[[5, 6]], rtol=1e-6
    )

    # inverse_hvp: a (p,) vector and a (k, p) batch
    r = np.random.default_rng(0).standard_normal((3, len(theta)))
    ref_r = np.linalg.solve(a, r.T).T
    assert _rel(est.inverse_hvp(_t(r)).numpy(), ref_r) <= 1e-8
    one = est.inverse_hvp(_t(g_te[0]))
    assert one.shape == (len(theta),)
    assert _rel(one.numpy(), v_te[0]) <= 1e-8

    # top-k: proponents are the most negative scores, opponents the most positive
    top = est.top_k((_t(xte[0]), _t(yte[0:1])), k=5)
    order = np.argsort(ref_scores[0])
    assert sorted(top.proponents.tolist()) == sorted(order[:5].tolist())
    assert sorted(top.opponents.tolist()) == sorted(order[-5:].tolist())
    np.testing.assert_allclose(top.proponent_scores.numpy(), ref_scores[0, top.proponents],
                               rtol=1e-6)


def test_softmax_regression_random_subset_matches_weighted_reference(softmax_problem):
    sp = softmax_problem
    sr, theta, wd, lam = sp["sr"], sp["theta"], sp["wd"], 1e-2
    xtr, ytr, xte, yte = sp["xtr"], sp["ytr"], sp["xte"], sp["yte"]
    est = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), curvature="hessian", damping=lam, solver="direct",
        sampler="random", sample_size=200, seed=3, weight_decay=wd,
    ).fit()
    idx, w = est.subset.indices.numpy(), est.subset.weights.numpy()
    assert len(idx) == 200 and len(np.unique(idx)) == 200
    assert idx.min() >= 0 and idx.max() < len(ytr)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)

    a = sr.hessian(theta, xtr[idx], w, wd) + lam * np.eye(len(theta))
    g_tr, g_te = sr.grads(theta, xtr, ytr), sr.grads(theta, xte, yte)
    ref_scores = -np.linalg.solve(a, g_te.T).T @ g_tr.T
    _assert_entrywise(est.influence((_t(xte), _t(yte))).numpy(), ref_scores, 1e-6)
    ref_self = -np.einsum("ij,ij->i", g_tr[:50], np.linalg.solve(a, g_tr[:50].T).T)
    _assert_entrywise(est.self_influence(_t(np.arange(50))).numpy(), ref_self, 1e-6)

    # small chunks (per-sample gradients and score blocks) change nothing
    chunked = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), curvature="hessian", damping=lam, solver="direct",
        sampler="random", sample_size=200, seed=3, weight_decay=wd, chunk_size=37,
    )
    _assert_entrywise(chunked.influence((_t(xte), _t(yte))).numpy(), ref_scores, 1e-6)

    # the subset really matters: the full-data curvature gives different scores
    full = sr.hessian(theta, xtr, np.full(len(ytr), 1 / len(ytr)), wd) + lam * np.eye(len(theta))
    assert _rel(-np.linalg.solve(full, g_te.T).T @ g_tr.T, ref_scores) > 1e-3

    # same seed ⇒ the same subset, bit for bit; another seed ⇒ another subset
    again = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), sampler="random", sample_size=200, seed=3,
    ).fit()
    assert torch.equal(again.subset.indices, est.subset.indices)
    assert torch.equal(again.subset.weights, est.subset.weights)
    other = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), sampler="random", sample_size=200, seed=4,
    ).fit()
    assert not torch.equal(other.subset.indices, est.subset.indices)


def test_softmax_regression_stratified_subset_weights(softmax_problem):
    """Stratified weights (N_c/N)/m_c: the weighted reference is still matched exactly."""
    sp = softmax_problem
    sr, theta, wd, lam = sp["sr"], sp["theta"], sp["wd"], 1e-2
    xtr, ytr, xte, yte = sp["xtr"], sp["ytr"], sp["xte"][:5], sp["yte"][:5]
    est = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), curvature="ggn", damping=lam, solver="direct",
        sampler="stratified", sample_size=100, seed=0, weight_decay=wd,
    ).fit()
    idx, w = est.subset.indices.numpy(), est.subset.weights.numpy()
    counts = np.bincount(ytr, minlength=C_DIGITS)
    for k in range(C_DIGITS):  # each drawn class carries its pool share of the weight
        np.testing.assert_allclose(w[ytr[idx] == k].sum(), counts[k] / len(ytr), rtol=1e-12)
    a = sr.hessian(theta, xtr[idx], w, wd) + lam * np.eye(len(theta))
    ref = -np.linalg.solve(a, sr.grads(theta, xte, yte).T).T @ sr.grads(theta, xtr, ytr).T
    _assert_entrywise(est.influence((_t(xte), _t(yte))).numpy(), ref, 1e-6)


# --------------------------------------------------------------------------- 2. linear regression
class SquaredErrorTask(repif.ClassificationTask):
    """Per-sample 0.5·(f(x) − y)² for a model with one output and float targets."""

    def loss_from_output(self, output, y):
        return 0.5 * (output.squeeze(-1) - y) ** 2

    def check_targets(self, y, output_dim):
        if not y.is_floating_point() or output_dim != 1:
            raise ValueError("squared error needs float targets and one output")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_linear_regression_matches_closed_form(curvature):
    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype(np.float64) * 10.0, y.astype(np.float64) / 100.0
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    n, d, wd, lam = len(ytr), x.shape[1], 1e-2, 1e-3

    # ridge solution of mean 0.5 (x̃θ − y)² + (wd/2)‖θ‖² (bias regularised too), θ = [w, b]
    xa = _augment(xtr)
    hess = xa.T @ xa / n + wd * np.eye(d + 1)
    theta = np.linalg.solve(hess, xa.T @ ytr / n)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(_t(theta[None, :d]))
        model.bias.copy_(_t(theta[d:]))

    g_tr = (xa @ theta - ytr)[:, None] * xa
    xta = _augment(xte)
    g_te = (xta @ theta - yte)[:, None] * xta
    a = hess + lam * np.eye(d + 1)
    ref = -np.linalg.solve(a, g_te.T).T @ g_tr.T
    ref_self = -np.einsum("ij,ij->i", g_tr, np.linalg.solve(a, g_tr.T).T)

    est = repif.InfluenceEstimator(
        model, (_t(xtr), _t(ytr)), curvature=curvature, damping=lam, solver="direct",
        weight_decay=wd, task=SquaredErrorTask(),
    )
    scores = est.influence((_t(xte), _t(yte))).numpy()
    assert scores.shape == (len(yte), n)
    assert _rel(scores, ref) <= 1e-8
    _assert_entrywise(scores, ref, 1e-8)
    _assert_entrywise(est.self_influence().numpy(), ref_self, 1e-8)
    r = np.random.default_rng(0).standard_normal(d + 1)
    assert _rel(est.inverse_hvp(_t(r)).numpy(), np.linalg.solve(a, r)) <= 1e-10
    # the model was at the ridge optimum: the regularised mean gradient vanishes there
    mean_g = est.train_gradients().numpy().mean(0) + wd * theta
    assert np.linalg.norm(mean_g) < 1e-12


# --------------------------------------------------------------------------- MLP (autograd refs)
def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _mlp_output_fn(model: nn.Module):
    """θ ↦ model(x; θ) written out by hand for Linear-Tanh-Linear (no repif, no functional_call)."""
    shapes = [p.shape for p in model.parameters()]
    sizes = [int(np.prod(s)) for s in shapes]

    def out(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (t.reshape(s) for t, s in zip(theta.split(sizes), shapes, strict=True))
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    return out


def _mlp_jacobian_and_probs(f, theta, x):
    """(k, 10, p) output Jacobians by autograd and (k, 10) softmax probabilities."""
    jac = torch.autograd.functional.jacobian(lambda t: f(t, x), theta, vectorize=True)
    return jac, torch.softmax(f(theta, x), -1)


def _ce_grads(jac, prob, y):
    """Per-sample cross-entropy gradients J_iᵀ (p_i − onehot(y_i))."""
    r = prob - nn.functional.one_hot(y, prob.shape[-1]).double()
    return torch.einsum("iap,ia->ip", jac, r)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_mlp_curvature_matches_autograd_dense(digits_mlp, curvature):
    """Non-linear model, curvature on a 40-point pool: the GGN from autograd Jacobians
    Σ w_i J_iᵀ Λ_i J_i, or the exact Hessian from torch.autograd.functional.hessian."""
    model, (xtr, ytr), (xte, yte) = digits_mlp
    pool = torch.arange(0, 1000, 25)
    m = len(pool)
    wd, lam = 1e-3, 5e-2
    f = _mlp_output_fn(model)
    theta = _flat_params(model)
    assert torch.allclose(f(theta, xtr[:3]), model(xtr[:3]), rtol=0, atol=1e-14)
    p = theta.numel()

    xs, ys = xtr[pool], ytr[pool]
    if curvature == "ggn":
        jac, prob = _mlp_jacobian_and_probs(f, theta, xs)
        lam_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        jl = torch.einsum("iab,ibq->iaq", lam_out / m, jac)
        c = jac.reshape(-1, p).T @ jl.reshape(-1, p)
    else:
        def mean_loss(t):
            return -torch.log_softmax(f(t, xs), -1)[torch.arange(m), ys].mean()

        c = torch.autograd.functional.hessian(mean_loss, theta, vectorize=True)
    a = (c + (wd + lam) * torch.eye(p, dtype=torch.float64)).numpy()
    a = 0.5 * (a + a.T)

    j_te, p_te = _mlp_jacobian_and_probs(f, theta, xte[:5])
    j_tr, p_tr = _mlp_jacobian_and_probs(f, theta, xtr[:30])
    g_te = _ce_grads(j_te, p_te, yte[:5]).numpy()
    g_tr = _ce_grads(j_tr, p_tr, ytr[:30]).numpy()
    ref = -np.linalg.solve(a, g_te.T).T @ g_tr.T

    est = repif.InfluenceEstimator(
        model, (xtr, ytr), curvature=curvature, damping=lam, solver="direct", weight_decay=wd,
    ).fit(pool=pool)  # sample_size=None: the whole pool, uniform weights
    assert torch.equal(est.subset.indices, pool)
    np.testing.assert_allclose(est.train_gradients(torch.arange(30)).numpy(), g_tr,
                               rtol=1e-9, atol=1e-12)
    scores = est.influence((xte[:5], yte[:5]), train_indices=torch.arange(30)).numpy()
    _assert_entrywise(scores, ref, 1e-6)


# --------------------------------------------------------------------------- 4. leave-one-out
@pytest.fixture(scope="module")
def convex_problem(digits):
    """L2-regularised softmax regression (wd = 1e-2) on 300 digits, trained to ‖∇L‖ < 1e-11."""
    x, y = digits
    perm = np.random.default_rng(2).permutation(len(x))
    tr, te = perm[:300], perm[300:600]
    sr = SoftmaxRegression(D_DIGITS, C_DIGITS)
    wd = 1e-2
    theta = sr.fit(x[tr], y[tr], wd)
    return {"sr": sr, "wd": wd, "theta": theta, "xtr": x[tr], "ytr": y[tr],
            "xte": x[te], "yte": y[te]}


def test_leave_one_out_retraining_correlates_with_influence(convex_problem):
    """Predicted Δloss(z_t) on removing z is −I(z, z_t)/n (up-weighting z by ε = −1/n);
    compare with retraining without z to ‖∇L‖ < 1e-11 for 30 points (the 20 largest |I| and
    10 random others). The objective is strictly convex (wd > 0), so the retrained minimiser
    is unique; Newton iterations from θ̂ reach it in a few steps."""
    cp = convex_problem
    sr, wd, theta = cp["sr"], cp["wd"], cp["theta"]
    xtr, ytr = cp["xtr"], cp["ytr"]
    n = len(ytr)
    # the test point: the highest-loss one, where the influence signal is strong
    t_idx = int(np.argmax(sr.losses(theta, cp["xte"], cp["yte"])))
    xt, yt = cp["xte"][t_idx : t_idx + 1], cp["yte"][t_idx : t_idx + 1]
    base_loss = sr.losses(theta, xt, yt)[0]

    est = repif.InfluenceEstimator(
        sr.to_module(theta), (_t(xtr), _t(ytr)), curvature="hessian", damping=0.0,
        solver="direct", weight_decay=wd,
    )
    scores = est.influence((_t(xt), _t(yt)))[0].numpy()
    rng = np.random.default_rng(0)
    top = np.argsort(-np.abs(scores))[:20]
    rest = np.setdiff1d(np.arange(n), top)
    chosen = np.concatenate([top, rng.choice(rest, size=10, replace=False)])

    predicted = -scores[chosen] / n
    actual = []
    for j in chosen:
        keep = np.arange(n) != j
        th_j = sr.fit(xtr[keep], ytr[keep], wd, theta0=theta, lbfgs_iter=0)
        actual.append(sr.losses(th_j, xt, yt)[0] - base_loss)
    actual = np.array(actual)
    pearson = float(np.corrcoef(predicted, actual)[0, 1])
    slope = float(predicted @ actual / (predicted @ predicted))
    assert pearson >= 0.95, (pearson, slope)
    assert 0.5 < slope < 2.0, (pearson, slope)  # the right scale and sign, not just correlation


# --------------------------------------------------------------------------- 5. class removal
def test_remove_class_approaches_retraining(convex_problem):
    """Newton removal of a whole class with the full-pool curvature of the remaining points
    (sample_size=None, damping 0, weight decay as trained) against retraining without that
    class to ‖∇L_R‖ < 1e-11 (strictly convex, so the minimiser is unique)."""
    cp = convex_problem
    sr, wd, theta = cp["sr"], cp["wd"], cp["theta"]
    xtr, ytr = cp["xtr"], cp["ytr"]
    removed_class = 3
    removed = np.flatnonzero(ytr == removed_class)
    keep = ytr != removed_class
    theta_r = sr.fit(xtr[keep], ytr[keep], wd)  # from zero: L-BFGS, then Newton
    model = sr.to_module(theta)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    est = repif.InfluenceEstimator(
        model, (_t(xtr), _t(ytr)), curvature="ggn", damping=0.0, solver="direct",
        weight_decay=wd,
    )
    # independent Newton iterates on L_R(θ) = mean_R l + (wd/2)‖θ‖², started at θ̂ (η = 1)
    xr, yr = xtr[keep], ytr[keep]
    uniform = np.full(len(yr), 1.0 / len(yr))
    newton = [theta]
    for _ in range(3):
        t = newton[-1]
        grad = sr.objective(t, xr, yr, wd)[1]
        newton.append(t - np.linalg.solve(sr.hessian(t, xr, uniform, wd, linear_order=False), grad))

    dist = {}
    for steps in (1, 3):
        new = est.remove(_t(removed), steps=steps)
        assert isinstance(new, nn.Linear) and new is not model
        got = sr.from_module(new)
        assert _rel(got, newton[steps]) <= 1e-8, steps
        dist[steps] = np.linalg.norm(got - theta_r) / np.linalg.norm(theta_r)
    start = np.linalg.norm(theta - theta_r) / np.linalg.norm(theta_r)

    # an estimator already fitted on every point (removed ones included) draws its curvature
    # from the remaining points for the call, and keeps its own fit
    fitted = repif.InfluenceEstimator(
        model, (_t(xtr), _t(ytr)), curvature="ggn", damping=0.0, solver="direct",
        weight_decay=wd,
    ).fit()
    assert _rel(sr.from_module(fitted.remove(_t(removed))), newton[1]) <= 1e-8
    assert fitted.subset.indices.tolist() == list(range(len(ytr)))

    # the caller's model and the estimator's copy are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    np.testing.assert_array_equal(sr.from_module(est.model), theta)

    # measured: start 0.387, one step 0.120, three steps 0.0184 (four: 0.0028)
    assert dist[1] < 0.5 * start, (start, dist)
    assert dist[3] < 0.25 * dist[1], (start, dist)
    assert dist[3] < 0.03, (start, dist)


def test_shrinkage_matches_reference(softmax_problem):
    """shrinkage ρ (GGN only): C = (1 − ρ) C_T + ρ diag(C_T) + wd·I, C_T the weighted subset GGN
    without weight decay (repif.curvature's documented definition)."""
    sp = softmax_problem
    sr, theta, wd, lam, rho = sp["sr"], sp["theta"], sp["wd"], 1e-3, 0.4
    xtr, ytr, xte, yte = sp["xtr"], sp["ytr"], sp["xte"][:4], sp["yte"][:4]
    est = repif.InfluenceEstimator(
        sp["model"], (_t(xtr), _t(ytr)), curvature="ggn", damping=lam, solver="direct",
        sample_size=30, seed=1, weight_decay=wd, shrinkage=rho,
    ).fit()
    idx, w = est.subset.indices.numpy(), est.subset.weights.numpy()
    c_t = sr.hessian(theta, xtr[idx], w, 0.0)
    a = (1 - rho) * c_t + np.diag(rho * np.diag(c_t) + wd + lam)
    ref = -np.linalg.solve(a, sr.grads(theta, xte, yte).T).T @ sr.grads(theta, xtr, ytr).T
    _assert_entrywise(est.influence((_t(xte), _t(yte))).numpy(), ref, 1e-6)


# ----------------------------------------------------------------- parameter subsets, data
def test_frozen_first_layer_gives_last_layer_closed_form(digits_mlp):
    """Only trainable parameters count: with the first layer frozen, the model is softmax
    regression on the fixed features h = tanh(W₁x + b₁), and influence is its closed form."""
    import copy

    base, (xtr, ytr), (xte, yte) = digits_mlp
    model = copy.deepcopy(base)
    for prm in model[0].parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        h_tr, h_te = model[1](model[0](xtr[:400])).numpy(), model[1](model[0](xte[:6])).numpy()
    sr, wd, lam = SoftmaxRegression(32, C_DIGITS), 1e-2, 1e-3
    theta = sr.fit(h_tr, ytr[:400].numpy(), wd, tol=1e-8)
    head = sr.to_module(theta)
    with torch.no_grad():
        model[2].weight.copy_(head.weight)
        model[2].bias.copy_(head.bias)
    n = 400
    a = sr.hessian(theta, h_tr, np.full(n, 1 / n), wd) + lam * np.eye(len(theta))
    g_tr, g_te = sr.grads(theta, h_tr, ytr[:400].numpy()), sr.grads(theta, h_te, yte[:6].numpy())
    ref = -np.linalg.solve(a, g_te.T).T @ g_tr.T

    est = repif.InfluenceEstimator(
        model, (xtr[:400], ytr[:400]), curvature="hessian", damping=lam, solver="direct",
        weight_decay=wd,
    )
    assert est.num_params == 330
    _assert_entrywise(est.influence((xte[:6], yte[:6])).numpy(), ref, 1e-6)
    assert not model[0].weight.requires_grad  # the caller's flags are left alone


def test_dataset_input_matches_tuple(softmax_problem):
    from torch.utils.data import TensorDataset

    sp = softmax_problem
    x, y = _t(sp["xtr"][:300]), _t(sp["ytr"][:300])
    test = (_t(sp["xte"][:3]), _t(sp["yte"][:3]))
    kw = {"damping": 1e-2, "weight_decay": sp["wd"]}
    a = repif.InfluenceEstimator(sp["model"], (x, y), **kw).influence(test)
    b = repif.InfluenceEstimator(sp["model"], TensorDataset(x, y), **kw).influence(test)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_regression_dataset_keeps_float_targets():
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(40, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    kw = {"damping": 1e-2, "task": SquaredErrorTask()}
    a = repif.InfluenceEstimator(model, (x, y), **kw).influence((x[:2], y[:2]))
    b = repif.InfluenceEstimator(model, TensorDataset(x, y), **kw).influence((x[:2], y[:2]))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
