"""K-FAC and EK-FAC (repif.curvature.kfac, solver "eigen", the preconditioner of cg and lissa).

Every test runs in float64 with fixed seeds on models small enough for dense references:

* K-FAC equals kron(G, A) per layer built by hand (activations by hooks, output-side gradients
  by autograd through additive probes at each layer's output, patches by F.unfold);
* EK-FAC's Λ is the exact GGN block's diagonal in the Kronecker eigenbasis (always), so it is
  the exact GGN wherever that basis diagonalises the GGN (one-layer models below) and never
  further from it than K-FAC;
* the sampler's Horvitz–Thompson weights make A and G unbiased;
* preconditioned CG and LiSSA reach the direct solve's answer in fewer iterations;
* other layer types give one clear error, or are treated as identity / frozen on request.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _kronecker_reference import hand_factors
from torch import nn

import repif
from repif.curvature import kfac, kronecker_passes
from repif.curvature.operator import CurvatureOperator
from repif.errors import CorruptFileError, TooLargeError
from repif.io import load_tensors, save_tensors_atomic
from repif.samplers import Pool
from repif.task import ClassificationTask, FunctionalModel, Task

pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _permutation(layers: list[kfac.KroneckerLayer], p: int) -> torch.Tensor:
    """Flat parameter index of each entry of the layers' (out, d) matrices, layer by layer
    (block-diagonal order); parameters outside the layers follow in flat order."""
    idx = torch.arange(p)[None].double()
    order = [layer.gather(idx)[0].flatten().long() for layer in layers]
    used = torch.cat(order)
    rest = torch.tensor([i for i in range(p) if i not in set(used.tolist())], dtype=torch.long)
    return torch.cat([used, rest])


class _CNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(3, 2, 2, bias=False), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 4, bias=False),
        )


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_kfac_equals_its_dense_kronecker_construction(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
        x = torch.randn(12, 6, dtype=torch.float64)
    else:
        model = _CNN().double().eval()
        x = torch.randn(12, 1, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    w = torch.rand(12, dtype=torch.float64)
    w /= w.sum()
    task = ClassificationTask(weight_decay=0.01)
    fm = FunctionalModel(model, task)
    layers, others = kfac.kronecker_layers(fm)
    assert not others and len(layers) == (2 if arch == "mlp" else 4)
    a_ref, g_ref = hand_factors(model, layers, x, y, w, task)
    a_got, g_got = kfac.kronecker_statistics(fm, x, y, w, layers)
    for a, b in zip(a_got + g_got, a_ref + g_ref, strict=True):
        assert _rel(a, b) < 1e-12

    curv = kfac.fit_kronecker(fm, x, y, w, kind="kfac")
    p = fm.space.size
    perm = _permutation(layers, p)
    blocks = torch.block_diag(*[torch.kron(g, a) for g, a in zip(g_ref, a_ref, strict=True)])
    dense_ref = torch.zeros(p, p, dtype=torch.float64)
    dense_ref[perm[:, None], perm[None, :]] = blocks
    dense_ref += 0.01 * torch.eye(p, dtype=torch.float64)  # weight decay
    dense = curv.dense()
    assert _rel(dense, dense_ref) < 1e-12
    # the eigen solver inverts it: (C + λI)⁻¹ g
    g = torch.randn(3, p, dtype=torch.float64)
    want = torch.linalg.solve(dense_ref + 0.05 * torch.eye(p, dtype=torch.float64), g.T).T
    solver = repif.solvers.build("eigen", {}).fit(curv, 0.05)
    assert _rel(solver.solve(g), want) < 1e-11


def _ggn(fm, x, y, w) -> torch.Tensor:
    return CurvatureOperator(fm, x, y, w).dense()


def test_ekfac_is_the_exact_ggn_diagonal_in_the_kronecker_eigenbasis(digits):
    """EK-FAC's Λ_kl = Σ_i w_i Σ_c (Q_Gᵀ R_ic Q_A)²_kl is the diagonal of the exact GGN block in
    Q_G ⊗ Q_A (for every model), hence the closest matrix of that eigenbasis to the GGN in
    Frobenius norm: never further from it than K-FAC."""
    x, y = (torch.from_numpy(t[:200]) for t in digits)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double().eval()
    fm = FunctionalModel(model, ClassificationTask())
    w = torch.rand(200, dtype=torch.float64)
    w /= w.sum()
    ggn = _ggn(fm, x, y, w)
    ek = kfac.fit_kronecker(fm, x, y, w, kind="ekfac")
    k = kfac.fit_kronecker(fm, x, y, w, kind="kfac")
    for layer, f in zip(ek.layers, ek.factors, strict=True):
        idx = layer.gather(torch.arange(fm.space.size)[None].double())[0].flatten().long()
        block = ggn[idx[:, None], idx[None, :]]
        q = torch.kron(f.q_g, f.q_a)
        assert _rel(torch.diagonal(q.T @ block @ q), f.eigenvalues.flatten()) < 1e-11
    assert _rel(ek.dense(), ggn) < _rel(k.dense(), ggn)


class _SquaredError(Task):
    """½‖f − y‖²: Λ = I for every point (the generic output-Hessian factor path)."""

    def loss_from_output(self, output, targets):
        return 0.5 * (output - targets).pow(2).sum(-1)


def test_ekfac_equals_the_exact_ggn_on_one_layer_models():
    """On a one-layer model the layer block is the whole GGN, Σ_i w_i Λ_i ⊗ ā_i ā_iᵀ, and
    EK-FAC equals it exactly when the Kronecker eigenbasis diagonalises it:

    * squared error (Λ_i = I): the GGN is I ⊗ A, so K-FAC is exact too;
    * two-class softmax regression on inputs along the coordinate axes (distinct scales, no
      bias): Λ_i = p_i(1 − p_i)·uuᵀ with u = (1, −1) for every point and every ā_i ā_iᵀ is
      diagonal, so the GGN is diagonal in Q_G ⊗ Q_A — but it is uuᵀ ⊗ Σ w_i p_i(1−p_i) ā_i ā_iᵀ,
      not G ⊗ A, so K-FAC (which assumes Λ_i independent of ā_i) is not exact.

    With general inputs and C > 2 the Λ_i do not share eigenvectors and no Kronecker basis
    diagonalises the GGN; EK-FAC is then its best approximation in that basis (test above).
    """
    gen = torch.Generator().manual_seed(0)
    lam = 1e-3
    # squared error, general inputs with a bias column
    model = nn.Linear(5, 3).double().eval()
    x = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    w = torch.full((40,), 1 / 40, dtype=torch.float64)
    fm = FunctionalModel(model, _SquaredError())
    eye = torch.eye(fm.space.size, dtype=torch.float64)
    ggn = _ggn(fm, x, y, w)
    for kind in ("kfac", "ekfac"):
        assert _rel(kfac.fit_kronecker(fm, x, y, w, kind=kind).dense(), ggn) < 1e-12
    # binary softmax regression on coordinate inputs
    d = 6
    model = nn.Linear(d, 2, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, d, dtype=torch.float64, generator=gen))
    axis = torch.arange(30) % d
    x = torch.zeros(30, d, dtype=torch.float64)
    x[torch.arange(30), axis] = 0.5 + torch.rand(30, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (30,), generator=gen)
    w = torch.rand(30, dtype=torch.float64, generator=gen)
    w /= w.sum()
    fm = FunctionalModel(model, ClassificationTask())
    eye = torch.eye(fm.space.size, dtype=torch.float64)
    ggn = _ggn(fm, x, y, w)
    g = torch.randn(4, fm.space.size, dtype=torch.float64, generator=gen)
    exact = torch.linalg.solve(ggn + lam * eye, g.T).T
    ek = kfac.fit_kronecker(fm, x, y, w, kind="ekfac")
    assert _rel(ek.dense(), ggn) < 1e-12
    assert _rel(repif.solvers.build("eigen", {}).fit(ek, lam).solve(g), exact) < 1e-9
    k = kfac.fit_kronecker(fm, x, y, w, kind="kfac")
    assert _rel(k.dense(), ggn) > 0.05  # the test separates EK-FAC from K-FAC


def test_weighted_factors_are_unbiased(digits):
    """With logit-importance's raw Horvitz–Thompson weights (self_normalize=False), A_T and G_T
    are unbiased for the pool's A and G (both are linear in the weights). Over S = 150 seeds,
    the error of the mean in units of its own standard error, z = ‖mean − pool‖ / (ŝ/√S) with
    ŝ² the seeds' mean squared Frobenius deviation, is ≈ 1 when unbiased (a root-mean-square
    over many roughly independent standardised entries; measured 1.05 for A, 1.24 for G); we
    accept ≤ 3. Uniform weights on the same subsets ignore the inclusion probabilities and fail
    the same check (measured 6.8 for A and 26 for G, where the curvature proxy acts)."""
    xs, ys = digits
    x, y = torch.from_numpy(xs[:300]), torch.from_numpy(ys[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):  # some confident points: the inclusion probabilities then differ a lot
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    fm = FunctionalModel(model, ClassificationTask())
    layers, _ = kfac.kronecker_layers(fm)

    def factors(idx, w):
        a, g = kfac.kronecker_statistics(fm, x[idx], y[idx], w, layers)
        return torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in g])

    truth = factors(torch.arange(300), torch.full((300,), 1 / 300, dtype=torch.float64))
    with torch.no_grad():
        logits = model(x)
    pool = Pool(torch.arange(300), y, 10, stats=lambda: (logits, logits))
    sampler = repif.samplers.build("logit-importance", {"self_normalize": False})
    seeds, m = 150, 30
    weighted, uniform = [], []
    for s in range(seeds):
        sub = sampler.select(pool, m, seed=s)
        weighted.append(factors(sub.indices, sub.weights))
        uniform.append(factors(sub.indices, torch.full((m,), 1 / m, dtype=torch.float64)))

    def z(samples, which):
        st = torch.stack([sample[which] for sample in samples])
        mean = st.mean(0)
        spread = ((st - mean).pow(2).sum(1).mean() * seeds / (seeds - 1)).sqrt()
        return float((mean - truth[which]).norm() / (spread / seeds ** 0.5))

    assert z(weighted, 0) <= 3.0 and z(weighted, 1) <= 3.0
    assert z(uniform, 0) > 4.0 and z(uniform, 1) > 10.0


def _scaled_softmax_regression(digits, spread: float = 1.0):
    """Softmax regression on 1,000 digits whose 64 features are rescaled by factors from
    10^-spread to 10^spread (a badly scaled input, the ill-conditioning K-FAC's A factor
    removes: it whitens each layer's inputs); 150 Adam steps."""
    xs, ys = digits
    scale = torch.logspace(-spread, spread, 64, dtype=torch.float64)
    scale = scale[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    x, y = torch.from_numpy(xs) * scale, torch.from_numpy(ys)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:1000]), y[:1000]).backward()
        opt.step()
    return model.eval(), (x[:1000], y[:1000]), (x[1000:1004], y[1000:1004])


def test_preconditioned_cg_and_lissa_reach_the_same_answer_in_fewer_iterations(digits):
    """EK-FAC (fitted on the same 256-point subset) as the preconditioner of CG and LiSSA on the
    exact subset GGN, λ = 0.01: same answer as the direct solve. Measured: CG 111 → 69
    iterations; LiSSA needs ≈ 17,700 steps without the preconditioner and ≈ 1,400 with it, so
    at depth 2,500 only the preconditioned series has converged."""
    model, train, test = _scaled_softmax_regression(digits)
    kw = dict(damping=0.01, sample_size=256, seed=0)
    ref = repif.InfluenceEstimator(model, train, solver="direct", **kw).fit()
    g = ref.test_gradients(test)
    want = ref.inverse_hvp(g)
    plain = repif.InfluenceEstimator(model, train, solver="cg", tol=1e-10, **kw).fit()
    pre = repif.InfluenceEstimator(model, train, solver="cg", tol=1e-10,
                                   preconditioner="ekfac", **kw).fit()
    assert torch.equal(pre.subset.indices, ref.subset.indices)
    assert _rel(plain.inverse_hvp(g), want) < 1e-8
    assert _rel(pre.inverse_hvp(g), want) < 1e-8
    assert max(pre.solver.iterations) < 0.8 * min(plain.solver.iterations)
    assert "preconditioner_fit_s" in pre.timings

    lissa = dict(solver="lissa", depth=2500, tol=1e-9, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # plain LiSSA stops at depth
        slow = repif.InfluenceEstimator(model, train, **lissa).fit().inverse_hvp(g[:1])
    fast_est = repif.InfluenceEstimator(model, train, preconditioner="ekfac", **lissa).fit()
    fast = fast_est.inverse_hvp(g[:1])
    assert _rel(fast, want[:1]) < 1e-6
    assert _rel(slow, want[:1]) > 1e-3
    assert max(fast_est.solver.steps_taken) < 2500


def test_plain_cg_unchanged_by_the_preconditioner_code(digits_mlp):
    """Without a preconditioner CG's arithmetic is the old one: a hand-written copy of the
    plain recursion gives the same solution up to round-off."""
    model, train, test = digits_mlp
    est = repif.InfluenceEstimator(model, train, solver="cg", damping=0.03, sample_size=64,
                                   seed=0, tol=1e-8).fit()
    g = est.test_gradients((test[0][:3], test[1][:3]))
    op, lam = est.solver.operator, 0.03
    x = torch.zeros_like(g)
    r = g.clone()
    d = r.clone()
    rr = (r * r).sum(1)
    norm = rr.sqrt()
    active = torch.arange(3)
    for _ in range(1000):
        if active.numel() == 0:
            break
        da = d[active]
        ad = op.matmat(da) + lam * da
        curv = (da * ad).sum(1)
        alpha = (rr[active] / curv)[:, None]
        x[active] += alpha * da
        r_a = r[active] - alpha * ad
        r[active] = r_a
        rr_new = (r_a * r_a).sum(1)
        d[active] = r_a + (rr_new / rr[active])[:, None] * da
        rr[active] = rr_new
        active = active[~(rr_new.sqrt() <= 1e-8 * norm[active])]
    # a second implementation of the same recurrence: equal up to round-off (the library's
    # operator sums its products in chunks of its own)
    torch.testing.assert_close(est.inverse_hvp(g), x, rtol=1e-10, atol=1e-12)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.bn(self.norm(torch.tanh(self.fc(self.emb(ids))))))


def test_other_layer_types_give_a_clear_error_or_follow_the_option():
    torch.manual_seed(0)
    model = _Mixed().double().eval()
    ids, y = torch.randint(0, 5, (20,)), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError) as err:
        repif.InfluenceEstimator(model, (ids, y), curvature="ekfac", solver="eigen").fit()
    msg = str(err.value)
    for name in ("emb (Embedding", "norm (LayerNorm", "bn (BatchNorm1d", "other_layers",
                 "'identity'", "'frozen'"):
        assert name in msg
    assert "fc (" not in msg and "head (" not in msg
    g = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    fm = FunctionalModel(model, ClassificationTask())
    _, others = kfac.kronecker_layers(fm, "identity")
    for mode in ("identity", "frozen"):
        est = repif.InfluenceEstimator(model, (ids, y), curvature="ekfac", solver="eigen",
                                       damping=0.1, weight_decay=0.01,
                                       kronecker_options={"other_layers": mode})
        v = est.inverse_hvp(g)
        for _, off, n in others:
            want = g[:, off : off + n] / 0.11 if mode == "identity" else 0 * g[:, off : off + n]
            torch.testing.assert_close(v[:, off : off + n], want, rtol=1e-14, atol=0)
        assert est.influence((ids[:2], y[:2])).shape == (2, 20)
    # a grouped convolution is named with its settings
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 3)).double()
    with pytest.raises(ValueError, match=r"Conv2d with groups=2"):
        kfac.kronecker_layers(FunctionalModel(conv, ClassificationTask()))
    # a preconditioner must act on every parameter
    with pytest.raises(ValueError, match="other_layers='identity', not 'frozen'"):
        repif.InfluenceEstimator(model, (ids, y), solver="cg", preconditioner="ekfac",
                                 kronecker_options={"other_layers": "frozen"}).fit()


def test_estimator_end_to_end_and_option_errors(digits_mlp):
    model, train, test = digits_mlp
    kw = dict(damping=0.03, sample_size=128, seed=0, sampler="logit-importance")
    ref = repif.InfluenceEstimator(model, train, solver="direct", **kw).fit()
    v_ref = ref.inverse_hvp(ref.test_gradients((test[0][:3], test[1][:3])))
    for kind in ("kfac", "ekfac"):
        est = repif.InfluenceEstimator(model, train, curvature=kind, solver="eigen", **kw)
        scores = est.influence((test[0][:3], test[1][:3]), train_indices=torch.arange(50))
        assert scores.shape == (3, 50) and torch.isfinite(scores).all()
        assert torch.equal(est.subset.indices, ref.subset.indices)
        v = est.inverse_hvp(est.test_gradients((test[0][:3], test[1][:3])))
        cos = F.cosine_similarity(v, v_ref)
        assert float(cos.min()) > 0.8  # an approximation of the same solve
        assert (est.self_influence(torch.arange(10)) <= 0).all()
        new = est.remove(torch.arange(20))
        assert not torch.equal(next(new.parameters()), next(model.parameters()))
    for bad, match in [
        (dict(curvature="kfac", solver="cg"), "use solver='eigen'"),
        (dict(curvature="ggn", solver="eigen"), "curvature='kfac' or curvature='ekfac'"),
        (dict(solver="cg", kronecker_options={"fisher": "sampled"}), "kronecker_options"),
        (dict(solver="cg", preconditioner="shampoo"), "preconditioner must be one of"),
        (dict(curvature="ekfac", solver="eigen", shrinkage="auto"), "shrinkage applies"),
        (dict(curvature="ekfac", solver="eigen", kronecker_options={"fisher": "mc"}),
         "fisher must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            repif.InfluenceEstimator(model, train, **{**kw, **bad})
    with pytest.raises(TypeError, match="does not take option"):
        repif.InfluenceEstimator(model, train, curvature="kfac", solver="eigen",
                                 kronecker_options={"damping": 1.0}, **kw)


def test_sampled_fisher_is_unbiased_for_the_output_hessian():
    """E[u uᵀ] = Λ for the sampled output vectors: cross-entropy's p − e_ŷ with ŷ drawn from the
    predictive, and the generic B ε (here ½‖f − y‖², Λ = I); 40,000 draws per point, so each
    entry's standard error is below 0.005."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, dtype=torch.float64)
    draws = 40_000
    out = logits.repeat_interleave(draws, 0)
    uniform = torch.rand(out.shape, dtype=torch.float64)
    y = torch.zeros(out.shape[0], dtype=torch.long)
    ce = ClassificationTask()
    u = ce.sampled_output_gradient(out, y, uniform).reshape(3, draws, 4)
    moment = torch.einsum("ndc,nde->nce", u, u) / draws
    lam = ce.output_hessian_factor(logits, y[:3])
    lam = lam.transpose(-1, -2) @ lam
    assert float((moment - lam).abs().max()) < 0.01
    u = _SquaredError().sampled_output_gradient(out, out, uniform).reshape(3, draws, 4)
    moment = torch.einsum("ndc,nde->nce", u, u) / draws
    assert float((moment - torch.eye(4, dtype=torch.float64)).abs().max()) < 0.05


def test_sampled_fisher_factors_average_to_the_exact_ones(digits_mlp):
    """``fisher="sampled"`` keeps A, and its G (one label per point) averages to the exact G over
    seeds: z ≤ 3 as in the unbiasedness test (60 seeds); the same seed gives the same bits."""
    model, train, _ = digits_mlp
    fm = FunctionalModel(model, ClassificationTask())
    layers, _ = kfac.kronecker_layers(fm)
    x, y = train[0][:64], train[1][:64]
    w = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w /= w.sum()
    a_exact, g_exact = kfac.kronecker_statistics(fm, x, y, w, layers)
    truth = torch.cat([g.flatten() for g in g_exact])
    draws = []
    for seed in range(60):
        a, g = kfac.kronecker_statistics(fm, x, y, w, layers, fisher="sampled", seed=seed)
        assert all(_rel(s, e) < 1e-14 for s, e in zip(a, a_exact, strict=True))
        draws.append(torch.cat([t.flatten() for t in g]))
    st = torch.stack(draws)
    spread = ((st - st.mean(0)).pow(2).sum(1).mean() * 60 / 59).sqrt()
    assert float((st.mean(0) - truth).norm() / (spread / 60 ** 0.5)) <= 3.0
    again = kfac.kronecker_statistics(fm, x, y, w, layers, fisher="sampled", seed=59)[1]
    assert torch.equal(torch.cat([t.flatten() for t in again]), draws[-1])


def test_factor_cache_is_reused_checked_and_refitted(digits_mlp, tmp_path, monkeypatch):
    model, train, test = digits_mlp
    kw = dict(damping=0.03, sample_size=64, seed=0, curvature="ekfac", solver="eigen",
              sampler="logit-importance", kronecker_options={"cache_dir": str(tmp_path)})
    first = repif.InfluenceEstimator(model, train, **kw)
    g = first.test_gradients((test[0][:2], test[1][:2]))
    v = first.inverse_hvp(g)
    files = list(tmp_path.glob("ekfac-*.safetensors"))
    assert len(files) == 1
    _, meta = load_tensors(files[0])
    cache = meta["cache"]
    assert cache["sampler"] == "logit-importance" and cache["m"] == 64 and cache["seed"] == 0
    assert {"model", "data", "subset", "kind", "fisher"} <= set(cache)

    def no_fit(*a, **k):
        raise AssertionError("refitted although the cache matches")

    with monkeypatch.context() as mp:
        mp.setattr(kfac, "fit_kronecker", no_fit)
        assert torch.equal(repif.InfluenceEstimator(model, train, **kw).inverse_hvp(g), v)
    # another seed is another subset: another file
    repif.InfluenceEstimator(model, train, **{**kw, "seed": 1}).fit()
    assert len(list(tmp_path.glob("ekfac-*.safetensors"))) == 2
    # a file whose metadata were changed is refitted with a warning
    tensors, meta = load_tensors(files[0])
    meta["cache"]["m"] = 65
    save_tensors_atomic(files[0], tensors, meta)
    with pytest.warns(RuntimeWarning, match=r"other metadata \(m\)"):
        assert torch.equal(repif.InfluenceEstimator(model, train, **kw).inverse_hvp(g), v)
    # a damaged file likewise
    raw = bytearray(files[0].read_bytes())
    raw[-5] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum"):
        assert torch.equal(repif.InfluenceEstimator(model, train, **kw).inverse_hvp(g), v)
    assert issubclass(CorruptFileError, ValueError)


def test_budget_sizes_the_factor_passes(digits_mlp):
    """A tiny memory budget gives small chunks, not other numbers; factors that do not fit the
    budget at all are refused naming the options."""
    model, train, _ = digits_mlp
    x, y = train[0][:100], train[1][:100]
    fm = FunctionalModel(model, ClassificationTask())
    w = torch.full((100,), 0.01, dtype=torch.float64)
    layers, _ = kfac.kronecker_layers(fm)
    fixed = kfac.factor_bytes(fm, layers)
    big = kfac.kronecker_statistics(fm, x, y, w, layers, budget=repif.MemoryBudget(2**30))
    small = kfac.kronecker_statistics(fm, x, y, w, layers,
                                      budget=repif.MemoryBudget(fixed + 2**16))
    assert kronecker_passes._chunk_rows(fm, layers, x, repif.MemoryBudget(fixed + 2**16),
                                        fixed, True, 100) < 100
    for a, b in zip(big[0] + big[1], small[0] + small[1], strict=True):
        assert _rel(a, b) < 1e-13
    with pytest.raises(TooLargeError, match="other_layers"):
        kfac.fit_kronecker(fm, x, y, w, budget=repif.MemoryBudget(2**16))


def test_corrections_chunks_count_every_layers_unfolded_inputs(monkeypatch):
    """The EK-FAC corrections pass keeps every layer's unfolded inputs ā of a chunk across its
    backward passes: the chunk size counts them all, so they stay within the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1),
                          *[nn.Conv2d(2, 2, 3, padding=1) for _ in range(4)],
                          nn.Flatten(), nn.Linear(2 * 16 * 16, 3)).double()
    x, y = torch.randn(64, 1, 16, 16, dtype=torch.float64), torch.randint(0, 3, (64,))
    fm = FunctionalModel(model, ClassificationTask())
    layers, _ = kfac.kronecker_layers(fm)
    fixed = kfac.factor_bytes(fm, layers)
    budget = repif.MemoryBudget(fixed + 2**22)
    setup = kronecker_passes._setup(fm, x, y, torch.full((64,), 1 / 64, dtype=torch.float64),
                                    layers, "sampled", budget, 0, corrections=True)
    assert 1 < setup.rows < 64
    sizes: list[int] = []
    unfold = kronecker_passes._inputs

    def recorded(layer, a):
        out = unfold(layer, a)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(kronecker_passes, "_inputs", recorded)
    bases = [(torch.eye(layer.d, dtype=torch.float64),
              torch.eye(layer.out, dtype=torch.float64)) for layer in layers]
    kronecker_passes._corrections(fm, layers, setup, bases)
    per_chunk = [sum(sizes[i : i + len(layers)]) for i in range(0, len(sizes), len(layers))]
    assert len(per_chunk) == -(-64 // setup.rows)
    assert max(per_chunk) <= budget.bytes - fixed


@pytest.mark.slow
def test_two_processes_give_one_process_numbers(tmp_path):
    """2 gloo processes (each summing the factors over its share of the subset, all-reduced)
    give one process's numbers to round-off, and the same bits on both ranks."""
    from test_distributed import LAUNCH_TIMEOUT_S, _launch, _wait

    worker = Path(__file__).with_name("_kfac_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    procs = _launch([str(worker), str(one)], 1, one) + _launch([str(worker), str(two)], 2, two)
    for code, err in _wait(procs, LAUNCH_TIMEOUT_S):
        assert code == 0, err[-3000:]
    single = torch.load(one / "rank0.pt")
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert single.keys() == rank0.keys() == rank1.keys()
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        assert _rel(rank0[key], single[key]) <= 1e-8, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kw", [dict(curvature="ekfac", solver="eigen"),
                                dict(curvature="kfac", solver="eigen",
                                     kronecker_options={"fisher": "sampled"}),
                                dict(solver="cg", preconditioner="ekfac", tol=1e-10)])
def test_cuda_matches_cpu(kw):
    ds = repif.datasets.load("digits")
    model = repif.train(repif.models.build("cnn", ds), ds.train, epochs=2, seed=0).double()
    opts = dict(damping=0.1, sampler="logit-importance", sample_size=64, seed=1, **kw)
    cpu = repif.InfluenceEstimator(model, ds.train, device="cpu", **opts)
    gpu = repif.InfluenceEstimator(model, ds.train, device="cuda", **opts)
    test = (ds.test[0][:5], ds.test[1][:5])
    assert torch.equal(cpu.subset.indices, gpu.subset.indices)
    assert _rel(gpu.influence(test).cpu(), cpu.influence(test)) <= 1e-6


def test_eigh_that_fails_to_converge_is_retried_with_a_shift(monkeypatch):
    """LAPACK's eigh failed to converge on ResNet-18's low-rank 4,608-wide A factor of a few
    images; the retry with a relative shift of 1e-10 gives the eigenpairs to that size."""
    from repif.curvature import kfac as kfac_module

    torch.manual_seed(0)
    b = torch.randn(50, 3, dtype=torch.float64)
    m = b @ b.T  # rank 3: 47 repeated zero eigenvalues
    real, calls = torch.linalg.eigh, []

    def flaky(a):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals, vecs = kfac_module._eigh(m)
    assert len(calls) == 2
    scale = float(m.diagonal().max())
    assert float(((vecs * vals) @ vecs.T - m).abs().max()) < 1e-8 * scale
    torch.testing.assert_close(vals[-3:], real(m)[0][-3:], rtol=1e-8, atol=1e-8 * scale)
