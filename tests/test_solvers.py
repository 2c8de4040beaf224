"""Iterative and low-rank solvers against the dense ``direct`` solve (itself checked against
closed forms in test_reference_influence.py), on the briefly trained digits MLP of conftest
(Linear(64, 32)-Tanh-Linear(32, 10), float64, p = 2,410) with GGN curvature.

Settings used throughout (unless a test says otherwise): a random curvature subset of 128
training points (sampler="random", seed=0), damping λ = 0.03, no weight decay. The subset GGN's
top eigenvalue is ≈ 0.6, so (C + λI) has condition number ≈ 20.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import repif

pytestmark = pytest.mark.usefixtures("single_thread")

LAMBDA = 0.03
SUBSET = 128


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest row-wise relative error ‖got_i − ref_i‖ / ‖ref_i‖."""
    got, ref = got.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max())


def _estimator(mlp, solver: str, **options) -> repif.InfluenceEstimator:
    model, train, _ = mlp
    kw = {"damping": LAMBDA, "sample_size": SUBSET, "seed": 0, "curvature": "ggn", **options}
    return repif.InfluenceEstimator(model, train, solver=solver, **kw).fit()


@pytest.fixture(scope="module")
def reference(digits_mlp):
    """Direct solve on the shared subset: test gradients G (3, p) and V = (C + λI)⁻¹ G."""
    est = _estimator(digits_mlp, "direct")
    _, _, (xte, yte) = digits_mlp
    g = est.test_gradients((xte[:3], yte[:3]))
    return est, g, est.inverse_hvp(g)


def test_cg_matches_direct(digits_mlp, reference):
    direct, g, v = reference
    est = _estimator(digits_mlp, "cg", tol=1e-8, max_iter=1000)
    assert torch.equal(est.subset.indices, direct.subset.indices)
    # measured ≈ 5e-9 after ~25 iterations; the acceptance bound is 1e-4
    assert _rel(est.inverse_hvp(g), v) <= 1e-6
    _, _, (xte, yte) = digits_mlp
    np.testing.assert_allclose(
        est.influence((xte[:3], yte[:3]), train_indices=torch.arange(20)).numpy(),
        direct.influence((xte[:3], yte[:3]), train_indices=torch.arange(20)).numpy(),
        rtol=1e-5, atol=1e-8,
    )


def test_cg_blocks_of_right_hand_sides_match_one_at_a_time(digits_mlp, reference):
    """block_size=2 on 3 right-hand sides (a full block and a partial one) against block_size=1:
    every column runs its own recursion, so iterations and solutions agree."""
    _, g, v = reference
    one = _estimator(digits_mlp, "cg", tol=1e-8, block_size=1)
    two = _estimator(digits_mlp, "cg", tol=1e-8, block_size=2)
    a, b = one.inverse_hvp(g), two.inverse_hvp(g)
    assert one.solver.iterations == two.solver.iterations
    assert _rel(b, a) <= 1e-9 and _rel(b, v) <= 1e-6


def test_cg_warns_naming_the_unconverged_rows(digits_mlp, reference):
    _, g, _ = reference
    est = _estimator(digits_mlp, "cg", tol=1e-12, max_iter=3)
    with pytest.warns(RuntimeWarning, match=r"max_iter=3 for 3 of 3 right-hand sides"):
        est.inverse_hvp(g)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_batched_products_match_single_products(digits_mlp, curvature):
    """matmat (vmapped over rows, points split to the pair budget) against one matvec per row;
    for the GGN also against Aᵀ(A V) through the explicit factor, a second implementation."""
    est = _estimator(digits_mlp, "identity", curvature=curvature, weight_decay=1e-3)
    op = est.solver.operator
    vs = torch.randn(5, op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    single = torch.stack([op.matvec(v) for v in vs])
    torch.testing.assert_close(op.matmat(vs), single, rtol=1e-10, atol=1e-12)
    if curvature == "ggn":
        a = op.ggn_factor()
        via_factor = (vs @ a.T) @ a + op.weight_decay * vs
        torch.testing.assert_close(via_factor, single, rtol=1e-10, atol=1e-12)


def test_lissa_full_batch_matches_direct(digits_mlp, reference):
    """batch_size=None (the whole weighted subset each step, deterministic), scale="auto"
    (1.25 × (λ_max + λ) ≈ 0.75), depth 600, tol 1e-7: the contraction factor is 1 − λ/scale
    ≈ 0.96, so ~300 steps reach the early-stopping test. Measured error ≈ 3e-6."""
    _, g, v = reference
    est = _estimator(digits_mlp, "lissa", depth=600, solver_options={"batch_size": None},
                     scale="auto", tol=1e-7)
    assert _rel(est.inverse_hvp(g[:2]), v[:2]) <= 1e-4  # acceptance bound: 1e-2


def test_lissa_minibatch_within_loose_bound(digits_mlp, reference):
    """batch_size=64 curvature points per step (drawn ∝ weights, with replacement), depth 300,
    4 repeats averaged, scale="auto". Each repeat is an unbiased but noisy estimate; measured
    row errors 0.03-0.05 with 4 repeats (0.05-0.15 with 1). Bound: 0.15 and cosine ≥ 0.98."""
    _, g, v = reference
    est = _estimator(digits_mlp, "lissa", depth=300, repeats=4, solver_options={"batch_size": 64})
    assert est.solver.batch_size == 64
    got = est.inverse_hvp(g[1])
    assert _rel(got, v[1]) <= 0.15
    assert float(torch.nn.functional.cosine_similarity(got, v[1], dim=0)) >= 0.98


def test_lissa_same_seed_is_bit_identical(digits_mlp, reference):
    _, g, _ = reference
    a = _estimator(digits_mlp, "lissa", depth=40, solver_options={"batch_size": 16})
    b = _estimator(digits_mlp, "lissa", depth=40, solver_options={"batch_size": 16})
    assert a.solver.batch_size == b.solver.batch_size == 16
    a, b = a.inverse_hvp(g[0]), b.inverse_hvp(g[0])
    assert torch.equal(a, b)


def test_lissa_minibatches_follow_the_estimator_seed(digits_mlp, reference):
    _, g, _ = reference
    model, train, _ = digits_mlp
    # sample_size=None: the subset (whole pool) does not depend on the seed, only the batches do
    out = [
        repif.InfluenceEstimator(
            model, train, damping=LAMBDA, solver="lissa", depth=40, seed=s,
            solver_options={"batch_size": 16},
        ).fit(pool=torch.arange(SUBSET)).inverse_hvp(g[0])
        for s in (0, 1)
    ]
    assert not torch.equal(out[0], out[1])


# --------------------------------------------------------------------------- arnoldi, identity
def _output_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(k, C, p) Jacobian of the outputs w.r.t. the flat parameters (autograd, no repif)."""
    rows = []
    out = model(x)
    params = list(model.parameters())
    for i in range(out.shape[0]):
        for c in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in grads]))
    return torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)


@pytest.fixture(scope="module")
def low_rank(digits_mlp):
    """Curvature on 5 points, no weight decay: the GGN Σ J_iᵀΛ_iJ_i has rank 5 × 9 = 45
    (each Λ_i = diag(p) − ppᵀ has rank 9: its null vector is 1). Returns the direct estimator,
    the subset points' gradients (which lie in range(C)) and an orthonormal basis of range(C)
    from autograd Jacobians: range(C) = span{J_iᵀ u : u ⊥ 1}."""
    model, (xtr, ytr), _ = digits_mlp
    pool = torch.tensor([3, 141, 592, 653, 589])
    direct = repif.InfluenceEstimator(
        model, (xtr, ytr), damping=1e-2, solver="direct",
    ).fit(pool=pool)
    jac = _output_jacobian(model, xtr[pool])  # (5, 10, p)
    centre = torch.eye(10, dtype=torch.float64) - 1.0 / 10
    span = torch.einsum("iap,ab->ibp", jac, centre).reshape(-1, jac.shape[-1])  # (50, p)
    u, s, _ = torch.linalg.svd(span.T, full_matrices=False)
    rank = int((s > 1e-10 * s[0]).sum())
    return direct, pool, u[:, :rank], rank


@pytest.mark.parametrize("rank", [45, 60])
def test_arnoldi_exact_on_low_rank_curvature(digits_mlp, low_rank, rank):
    direct, pool, basis, true_rank = low_rank
    assert true_rank == 45
    model, train, _ = digits_mlp
    est = repif.InfluenceEstimator(
        model, train, damping=1e-2, solver="arnoldi", rank=rank,
    ).fit(pool=pool)
    g = direct.train_gradients(pool)  # gradients of the curvature points lie in range(C)
    assert _rel(g @ basis @ basis.T, g) < 1e-10
    assert _rel(est.inverse_hvp(g), direct.inverse_hvp(g)) <= 1e-6
    combo = torch.randn(4, 45, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = combo @ basis.T  # random vectors in range(C)
    assert _rel(est.inverse_hvp(r), direct.inverse_hvp(r)) <= 1e-6


def test_arnoldi_drops_the_part_outside_its_subspace(digits_mlp, low_rank):
    """Documented behaviour (Schioppa et al.): components outside the top-`rank` subspace are
    dropped, whereas direct multiplies them by 1/λ. With rank = rank(C) = 45:
    arnoldi(g) = direct(P g), P the projection on range(C)."""
    direct, pool, basis, _ = low_rank
    model, train, _ = digits_mlp
    est = repif.InfluenceEstimator(
        model, train, damping=1e-2, solver="arnoldi", rank=45,
    ).fit(pool=pool)
    r = torch.randn(3, basis.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    proj = r @ basis @ basis.T
    assert _rel(est.inverse_hvp(r), direct.inverse_hvp(proj)) <= 1e-6
    assert _rel(direct.inverse_hvp(r - proj), (r - proj) / 1e-2) <= 1e-8


def test_identity_returns_the_vector(digits_mlp):
    model, train, (xte, yte) = digits_mlp
    est = repif.InfluenceEstimator(model, train, solver="identity", sample_size=10).fit()
    g = torch.randn(2, est.num_params, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert torch.equal(est.inverse_hvp(g), g)
    assert torch.equal(est.inverse_hvp(g[0]), g[0])
    scores = est.influence((xte[:2], yte[:2]), train_indices=torch.arange(7))
    ref = -est.test_gradients((xte[:2], yte[:2])) @ est.train_gradients(torch.arange(7)).T
    torch.testing.assert_close(scores, ref, rtol=1e-12, atol=1e-14)


def test_woodbury_matches_direct(digits_mlp, reference):
    """The exact Woodbury GGN solve on the same subset, plain and with diagonal shrinkage."""
    direct, g, v = reference
    est = _estimator(digits_mlp, "woodbury")
    assert _rel(est.inverse_hvp(g), v) <= 1e-8
    shrunk_direct = _estimator(digits_mlp, "direct", shrinkage=0.3)
    shrunk = _estimator(digits_mlp, "woodbury", shrinkage=0.3)
    assert _rel(shrunk.inverse_hvp(g), shrunk_direct.inverse_hvp(g)) <= 1e-8


def test_solver_names_registered():
    assert {"direct", "cg", "lissa", "arnoldi", "identity"} <= set(repif.solvers.names())


def test_gram_matches_plain_product_and_accumulates():
    """repif.curvature.operator.gram multiplies only blocks on/above the diagonal; against AᵀA."""
    from repif.curvature.operator import gram

    a = torch.randn(700, 600, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = gram(a)
    parts = gram(a[300:], out=gram(a[:300]))
    for got in (whole, parts):
        torch.testing.assert_close(got, a.T @ a, rtol=1e-12, atol=1e-10)
        assert torch.equal(got, got.T)
