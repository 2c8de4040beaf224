"""Spectral helpers: power iteration and Lanczos on a symmetric curvature operator."""

from __future__ import annotations

import torch
from torch import Tensor

from repif.curvature.operator import CurvatureOperator


def _start_vector(op: CurvatureOperator, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64).to(op.fm.device, op.fm.dtype)
    return v / v.norm()


def top_eigenvalue(op: CurvatureOperator, *, iters: int = 30, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of C by power iteration (Rayleigh quotient of the last iterate).

    It is an underestimate when it has not converged; callers add a safety margin.
    """
    v = _start_vector(op, seed)
    lam = 0.0
    for _ in range(iters):
        w = op.matvec(v)
        lam = float(v @ w)
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0
        v = w / norm
    return abs(lam)


def lanczos(op: CurvatureOperator, k: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k Lanczos steps with full re-orthogonalisation → Ritz values (m,) and vectors (m, p).

    Returns the eigenpairs of the Krylov projection sorted by decreasing value; m ≤ k when the
    Krylov space is exhausted early.
    """
    k = min(k, op.size)
    q = _start_vector(op, seed)
    basis = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for j in range(k):
        w = op.matvec(basis[j])
        alpha = basis[j] @ w
        alphas.append(alpha)
        q_mat = torch.stack(basis)
        w = w - q_mat.T @ (q_mat @ w)  # full re-orthogonalisation, twice for stability
        w = w - q_mat.T @ (q_mat @ w)
        beta = w.norm()
        if j == k - 1 or float(beta) <= 1e-10 * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(t)
    order = torch.argsort(vals, descending=True)
    ritz_vectors = (torch.stack(basis[:m]).T @ vecs[:, order]).T
    return vals[order], ritz_vectors
