"""pyDVL (pydvl.influence.torch): DirectInfluence (exact), CgInfluence (block CG), LissaInfluence,
ArnoldiInfluence, NystroemSketchInfluence, EkfacInfluence (EK-FAC and plain K-FAC) and
InverseHarmonicMeanInfluence (DataInf-like).

Convention mapping: the loss handed to pyDVL is F.cross_entropy (mean reduction), so per-sample
gradients are ∇l(z) and every curvature is that of the *mean* loss: DirectInfluence sums
size-weighted batch Hessians and divides by n; the operators of CG, Arnoldi and Nyström average the
batch-mean Hessians over batches (unweighted, hence equal batches: one batch, or a divisor of n);
LiSSA uses one mini-batch mean per step. `regularization` is added as r·I to that matrix, so
r = λ + wd gives repif's C + λI. These methods use the exact Hessian (pyDVL's
SecondOrderMode.GAUSS_NEWTON is the empirical Fisher Σ ggᵀ, not the GGN). `influences(x_test,
y_test, x_train, y_train, mode=Up)` returns the (n_test, n_train) matrix g_testᵀ(H + rI)⁻¹g_train
(positive = helpful): repif's score is its negation.

Settings: CG solves all test gradients at once (solve_simultaneously=True; its stopping test is
‖residual‖ < max(rtol²·‖b‖, atol²), so rtol=1e-3 is a relative residual of 1e-6). LiSSA runs 1000
steps with dampen=0 and a scale above the largest mini-batch Hessian eigenvalue (scale 5 on the MLP,
whose top eigenvalue is ≈1.2; 200 on the CNN, whose 64-point batches reach ≈180). Both need H + rI
positive definite, as it is at the benchmark's λ; with λ small enough to leave it indefinite block
CG breaks down (non-finite SVD) and LiSSA diverges. Arnoldi keeps the top 100 eigenpairs by
magnitude and applies 1/r on their complement (use_woodbury=True; pyDVL's default drops the
complement); the Nyström sketch does the same. EK-FAC's `hessian_regularization` = r is added to its
eigenvalue-corrected K-FAC diagonal of the mean curvature; its factors come from one backward pass
of Σ_k √p_k log p_k per batch (a surrogate for the Fisher), and only nn.Linear layers are supported
(the CNN raises). InverseHarmonicMean uses its own operator, 1/n Σ (g gᵀ + rI)⁻¹. Batch sizes keep
the vmapped Hessian products of the CNN within memory.
"""

from __future__ import annotations

import torch.nn.functional as F
from common import main
from torch.utils.data import DataLoader, TensorDataset


def _per_arch(value, meta):
    return value[meta["arch"]] if isinstance(value, dict) else value


def _divisor_batch(n: int, cap: int) -> int:
    """Largest batch size <= cap that divides n (equal batches: mean of batch means = mean)."""
    return max(b for b in range(1, min(n, cap) + 1) if n % b == 0)


def influence(kind, batch_size=None, batch_cap=None, **opts):
    """``batch_size`` for methods whose batching does not change the matrix; otherwise the largest
    divisor of n not above ``batch_cap`` (None: one batch). Any argument may be a dict keyed by
    the architecture ("mlp", "cnn")."""

    def method(model, train, test, meta):
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            EkfacInfluence,
            InverseHarmonicMeanInfluence,
            LissaInfluence,
            NystroemSketchInfluence,
        )

        reg = meta["damping"] + meta["weight_decay"]
        kw = {k: _per_arch(v, meta) for k, v in opts.items()}
        n = len(train[1])
        bs = _per_arch(batch_size, meta) or _divisor_batch(n, _per_arch(batch_cap, meta) or n)
        if kind == "ekfac":
            inf = EkfacInfluence(model, hessian_regularization=reg, **kw)
        else:
            cls = {"direct": DirectInfluence, "cg": CgInfluence, "lissa": LissaInfluence,
                   "arnoldi": ArnoldiInfluence, "nystroem": NystroemSketchInfluence,
                   "ihm": InverseHarmonicMeanInfluence}[kind]
            inf = cls(model, F.cross_entropy, regularization=reg, **kw)
        inf.fit(DataLoader(TensorDataset(*train), batch_size=bs))
        scores = inf.influences(*test, *train, mode=InfluenceMode.Up)
        return -scores
    return method


METHODS = {
    "direct": influence("direct", batch_size={"mlp": 256, "cnn": 16}),
    "cg": influence("cg", batch_cap={"mlp": None, "cnn": 100}, rtol=1e-3, atol=1e-6,
                    maxiter=1000, solve_simultaneously=True),
    # relative residual 1e-3 (rtol² = 1e-3), as repif's "cg-loose"
    "cg-loose": influence("cg", batch_cap={"mlp": None, "cnn": 100}, rtol=0.0316, atol=1e-6,
                          maxiter=1000, solve_simultaneously=True),
    "lissa": influence("lissa", batch_size={"mlp": 256, "cnn": 64}, maxiter=1000,
                       scale={"mlp": 5.0, "cnn": 200.0}, dampen=0.0, warn_on_max_iteration=False),
    "arnoldi": influence("arnoldi", rank=100, use_woodbury=True),
    "nystroem": influence("nystroem", batch_cap={"mlp": 512, "cnn": 100}, rank=100),
    "ekfac": influence("ekfac", batch_size=256, update_diagonal=True),
    "kfac": influence("ekfac", batch_size=256, update_diagonal=False),
    "inverse-harmonic-mean": influence("ihm", batch_size=256),
}

#: K-FAC/EK-FAC estimate the Fisher (= GGN) and InverseHarmonicMean an empirical-Fisher surrogate;
#: every other method works on the exact Hessian.
TARGETS = {m: "ggn" if m in ("ekfac", "kfac", "inverse-harmonic-mean") else "hessian"
           for m in METHODS}

if __name__ == "__main__":
    main(METHODS, "pydvl", TARGETS)
