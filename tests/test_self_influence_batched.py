"""Self-influence of many points at the cost of a batched solve (or a factorisation's quadratic
form), equal to the per-point loop −∇l_iᵀ(C + λI)⁻¹∇l_i."""

from __future__ import annotations

import pytest
import torch

import repif

CASES = {
    "direct": ("direct", {}),
    "cg": ("cg", {"tol": 1e-12}),  # 10,000 factor rows over the budget: block CG
    "cg-subset": ("cg", {"tol": 1e-12, "sample_size": 64}),  # through the Woodbury factor
    "woodbury": ("woodbury", {"sample_size": 64}),
    "eigen": ("eigen", {"curvature": "ekfac", "sample_size": 64}),
    "arnoldi": ("arnoldi", {"rank": 20}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_self_influence_equals_the_per_point_loop(case, digits_mlp, monkeypatch):
    model, train, _ = digits_mlp
    solver, options = CASES[case]
    est = repif.InfluenceEstimator(model, train, solver=solver, damping=0.05, seed=0,
                                   max_memory=2**28, **options).fit()
    idx = torch.arange(0, 40, 2)
    loop = torch.stack([-(g * est.inverse_hvp(g)).sum() for g in est.train_gradients(idx)])
    calls = []
    solve = type(est.solver).solve

    def counted(self, g):
        calls.append(g.shape[0])
        return solve(self, g)

    monkeypatch.setattr(type(est.solver), "solve", counted)
    batched = est.self_influence(idx)
    # the loop's round-off differs only in summation order (CG: in each right-hand side's own
    # recursion, converged to 1e-12)
    torch.testing.assert_close(batched, loop, rtol=1e-8, atol=1e-10)
    assert len(calls) <= 1  # one block solve, or none (a factorisation's quadratic form)
    assert bool((batched <= 0).all())
    if case == "cg-subset":
        assert not calls and est.solver._woodbury  # the factorisation's form, no CG

