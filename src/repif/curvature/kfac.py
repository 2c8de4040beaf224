"""Kronecker-factored curvature (K-FAC, EK-FAC) fitted on the weighted curvature subset.

For every ``nn.Linear`` and ``nn.Conv2d`` layer (groups 1, numeric zero padding) the GGN block of
its parameters (weight, and bias as one more input column of 1s) is approximated by a Kronecker
product G ⊗ A in repif's flat parameter order (docs/design.md, "Kronecker factors"):

* A = Σ_i w_i (1/T) Σ_t ā_it ā_itᵀ — the layer's inputs ā (with a 1 appended when it has a
  bias), averaged over the T positions of a point (a convolution's output positions, with ā
  the unfolded input patch; a sequence's tokens; T = 1 for a plain Linear);
* G = Σ_i w_i Σ_c Σ_t g_ict g_ictᵀ — the gradients of (B_i f_i)_c with respect to the layer's
  outputs s_it, summed over positions, where B_iᵀB_i = Λ_i is the task's factor of the output
  Hessian (``fisher="exact"``: C backward passes per point, so G is the GGN's exact
  Kronecker statistic), or of u_iᵀ f_i for one random u_i with E[u_i u_iᵀ] = Λ_i
  (``fisher="sampled"``: one backward, e.g. the gradient at a label drawn from the model's
  predictive; cheaper, noisier).

Averaging A over positions and summing G gives the KFC convention (Grosse & Martens, 2016):
G ⊗ A = |T| Ω̃ ⊗ Γ̃ with Ω̃, Γ̃ the per-position means (``weight_sharing="expand"``, the
default). ``weight_sharing="reduce"`` (K-FAC-reduce, Eschenhagen et al., 2023) takes the
outer products after reducing the positions: A = Σ_i w_i ā_i ā_iᵀ with ā_i = (1/T) Σ_t ā_it
and G = Σ_i w_i Σ_c ĝ_ic ĝ_icᵀ with ĝ_ic = Σ_t g_ict — exact for a point whose output
gradients do not vary over positions (a linear network up to a pooling), and T times cheaper
to accumulate: T·d² multiply-adds per point and layer become d², which on a full-width
ResNet-18 at 28×28 is most of the factor pass. The weights w_i are the sampler's, so a
Horvitz–Thompson subset (``logit-importance``) gives unbiased A and G.

With A = Q_A diag(s_A) Q_Aᵀ and G = Q_G diag(s_G) Q_Gᵀ, the layer's block is
(Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ with Λ_kl = s_G,k s_A,l (``"kfac"``) or, for ``"ekfac"``
(George et al., 2018), the exact second moments of the per-sample per-output gradients in that
eigenbasis: Λ_kl = Σ_i w_i Σ_c (Q_Gᵀ R_ic Q_A)²_kl with R_ic = Σ_t g_ict ā_itᵀ — the GGN
block's own diagonal in the Kronecker eigenbasis. Weight decay adds wd to every eigenvalue; a
solve with damping λ divides by Λ + wd + λ, one small matrix product per side and layer.

Basis from another sample (``basis`` of :func:`fit_kronecker`, the ``basis_size`` option of
the ``"ekfac"`` kind): EK-FAC's two halves need not see the same points. The eigenbasis only
has to span the directions the curvature lives in, and a small subset's factors are rank
deficient (A has rank ≤ m·T), so their eigenvectors beyond that rank are arbitrary. Fitting A
and G on a larger uniform sample fixes the basis; Λ, the part that carries the scale and where
most of K-FAC's error sits (docs/design.md, "Kronecker factors"), is then the exact GGN
diagonal in that basis estimated from the sampler's weighted subset — unbiased for the pool's
under Horvitz–Thompson weights, as before.

Trainable parameters outside such layers raise a ValueError naming them, unless
``other_layers="identity"`` (their block is wd·I: only damping and weight decay act there) or
``"frozen"`` (left out: their entries of every product and solve are 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from repif.curvature.kronecker_layers import (  # noqa: F401  (importable from here)
    FISHER_MODES,
    KINDS,
    OTHER_LAYERS,
    WEIGHT_SHARING,
    KroneckerLayer,
    kronecker_layers,
)
from repif.curvature.kronecker_passes import (  # noqa: F401  (importable from here)
    KFAC_ACTIVATION_COPIES,
    _capture,
    _corrections,
    _factor_sums,
    _Pass,
    _setup,
    factor_bytes,
    kronecker_statistics,
)
from repif.errors import CorruptFileError
from repif.memory import MemoryBudget
from repif.task import FunctionalModel
from repif.validation import check_choice

#: Basis vectors pushed through one product when :meth:`KroneckerCurvature.dense` is built.
DENSE_BLOCK = 256

#: Relative diagonal shift for a retried factor eigendecomposition (see :func:`_eigh`).
EIGH_JITTER = 1e-10


#: Precisions the factors may be eigendecomposed in (``eigh_dtype``). float64 is the default
#: and the safe choice; float32 was 1.8–2.5× faster on one CPU thread for factors of 576–2,304
#: rows with a relative error of ~2e-4 in a solve damped by 1e-3 of the largest eigenvalue
#: (benchmarks/results/eigh-precision.md).
EIGH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _eigh(m: Tensor, dtype: str = "float64") -> tuple[Tensor, Tensor]:
    """Eigenvalues (clipped at 0: the factor is PSD, negatives are round-off) and eigenvectors
    of a symmetric matrix, computed in ``dtype`` (:data:`EIGH_DTYPES`) and returned in its own
    dtype."""
    sym = (0.5 * (m + m.T)).to(EIGH_DTYPES[dtype])
    try:
        vals, vecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        # LAPACK's divide-and-conquer can fail to converge on a large, low-rank factor with
        # many repeated (zero) eigenvalues (ResNet-18's 4,608-wide A on a few images). A shift
        # of EIGH_JITTER × the largest diagonal entry separates them; it is taken back from
        # the eigenvalues, so only round-off of that size remains.
        shift = EIGH_JITTER * float(sym.diagonal().abs().max().clamp_min(1e-300))
        eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
        noise = torch.randn(sym.shape, generator=torch.Generator(device=sym.device)
                            .manual_seed(0), dtype=sym.dtype, device=sym.device)
        vals, vecs = torch.linalg.eigh(sym + shift * (eye + 1e-3 * (noise + noise.T)))
        vals = vals - shift
    # contiguous: a basis read back from the factor cache is contiguous, and the same layout
    # makes the same kernels run, so a cached fit solves bit for bit as the fresh one
    return vals.clamp_min(0).to(m.dtype), vecs.to(m.dtype).contiguous()


@dataclass(frozen=True)
class LayerFactors:
    """A layer's eigenbases Q_A (d, d) and Q_G (out, out), their eigenvalues s_A and s_G, and
    the eigenvalues Λ (out, d) of its block in the basis Q_G ⊗ Q_A."""

    q_a: Tensor
    s_a: Tensor
    q_g: Tensor
    s_g: Tensor
    eigenvalues: Tensor


def fit_kronecker(
    fm: FunctionalModel, x: Any, y: Any, weights: Tensor, *, kind: str = "ekfac",
    fisher: str = "exact", other_layers: str = "error", budget: MemoryBudget | None = None,
    seed: int = 0, progress: bool | None = False, weight_sharing: str = "expand",
    eigh_dtype: str = "float64", basis: tuple[Any, Any, Tensor] | None = None,
) -> KroneckerCurvature:
    """K-FAC (``kind="kfac"``) or EK-FAC (``"ekfac"``) of ``fm`` on the points ``(x, y)`` (the
    gathered subset's model inputs and targets) with the sampler's ``weights``: one pass for A
    and G, their eigendecompositions, and for EK-FAC a second pass for the eigenvalue
    corrections. ``seed`` drives the sampled Fisher's draws; ``progress`` shows a bar per pass
    (:func:`repif.progress.bar`); ``weight_sharing`` is "expand" or "reduce" (module doc; it
    changes the basis, not EK-FAC's exact per-point Λ); ``eigh_dtype`` is the precision of
    the factors' eigendecompositions (:data:`EIGH_DTYPES`).

    ``basis`` = (x_B, y_B, w_B), EK-FAC only: the factors A and G — hence the eigenbasis
    Q_G ⊗ Q_A and s_A, s_G — come from those points with those weights, and only the
    eigenvalues Λ from ``(x, y, weights)`` (module doc, "basis from another sample"): a basis
    from a large cheap sample, eigenvalues from a small, well-chosen one."""
    check_choice(kind, KINDS, "kind")
    check_choice(eigh_dtype, tuple(EIGH_DTYPES), "eigh_dtype")
    if basis is not None and kind != "ekfac":
        raise ValueError("a basis from other points re-fits only EK-FAC's eigenvalues on the "
                         "subset; K-FAC's come with its factors: use kind='ekfac'")
    layers, others = kronecker_layers(fm, other_layers)
    setup = _setup(fm, x, y, weights, layers, fisher, budget, seed, corrections=kind == "ekfac",
                   progress=progress, weight_sharing=weight_sharing)
    factor_setup = setup if basis is None else _setup(
        fm, *basis, layers, fisher, budget, seed, corrections=False, progress=progress,
        weight_sharing=weight_sharing)
    a_mats, g_mats = _factor_sums(fm, layers, factor_setup)
    factors: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for i in range(len(layers)):
        s_a, q_a = _eigh(a_mats[i], eigh_dtype)
        a_mats[i] = None  # type: ignore[call-overload]  # free as we go
        s_g, q_g = _eigh(g_mats[i], eigh_dtype)
        g_mats[i] = None  # type: ignore[call-overload]
        factors.append((q_a, s_a, q_g, s_g))
    if kind == "ekfac":
        lams = _corrections(fm, layers, setup, [(f[0], f[2]) for f in factors])
    else:
        lams = [torch.outer(f[3], f[1]) for f in factors]
    fitted = [LayerFactors(q_a, s_a, q_g, s_g, lam)
              for (q_a, s_a, q_g, s_g), lam in zip(factors, lams, strict=True)]
    return KroneckerCurvature(kind, fm, layers, fitted, others, other_layers, fisher,
                              budget=budget, weight_sharing=weight_sharing)


# --------------------------------------------------------------------------- the curvature
class KroneckerCurvature:
    """A fitted K-FAC / EK-FAC curvature C = ⊕_layers (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ + wd·I
    (see the module doc). Offers ``matmat`` (C V), ``inverse`` ((C + λI)⁻¹ V),
    ``inverse_sqrt`` and ``dense``; the ``eigen`` solver inverts it and ``cg``/``lissa`` use
    its inverse as a preconditioner. ``kind`` is "kfac" or "ekfac"."""

    def __init__(
        self, kind: str, fm: FunctionalModel, layers: list[KroneckerLayer],
        factors: list[LayerFactors], others: list[tuple[str, int, int]], other_layers: str,
        fisher: str, *, weight_decay: float | None = None, budget: MemoryBudget | None = None,
        weight_sharing: str = "expand",
    ) -> None:
        self.kind, self.fm, self.layers, self.factors = kind, fm, layers, factors
        self.others, self.other_layers, self.fisher = others, other_layers, fisher
        self.weight_sharing = weight_sharing
        wd = fm.task.weight_decay if weight_decay is None else weight_decay
        self.weight_decay = float(wd)
        self.budget = budget or MemoryBudget.resolve(None, fm.device)

    @property
    def size(self) -> int:
        return self.fm.space.size

    def _map(self, v: Tensor, layer_fn: Callable[[Tensor], Tensor], other_scale: float) -> Tensor:
        """Q f(Λ) Qᵀ V per layer for (k, p) rows V, ``layer_fn`` giving f(Λ); the parameters
        outside the layers are multiplied by ``other_scale`` (0 when frozen)."""
        squeeze = v.ndim == 1
        rows = v[None] if squeeze else v
        out = torch.zeros_like(rows)
        for layer, f in zip(self.layers, self.factors, strict=True):
            m = layer.gather(rows)
            rot = torch.matmul(f.q_g.T, m) @ f.q_a
            rot = rot * layer_fn(f.eigenvalues)
            layer.scatter(torch.matmul(f.q_g, rot) @ f.q_a.T, out)
        if self.other_layers == "identity":
            for _, off, numel in self.others:
                out[:, off : off + numel] = other_scale * rows[:, off : off + numel]
        return out[0] if squeeze else out

    def matmat(self, v: Tensor) -> Tensor:
        """C V for (k, p) rows (or a (p,) vector)."""
        wd = self.weight_decay
        return self._map(v, lambda lam: lam + wd, wd)

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v)

    def inverse(self, v: Tensor, damping: float) -> Tensor:
        """(C + λI)⁻¹ V for (k, p) rows, λ = ``damping``."""
        mu = self.weight_decay + damping
        return self._map(v, lambda lam: (lam + mu).reciprocal(), 1.0 / mu if mu > 0 else 0.0)

    def quadratic(self, v: Tensor, damping: float) -> Tensor:
        """(k,) v_iᵀ(C + λI)⁻¹v_i for (k, p) rows: per layer Σ (Q_Gᵀ V Q_A)² / (Λ + wd + λ),
        the parameters outside the layers over wd + λ ("identity") or left out ("frozen")."""
        mu = self.weight_decay + damping
        out = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        for layer, f in zip(self.layers, self.factors, strict=True):
            rot = torch.matmul(f.q_g.T, layer.gather(v)) @ f.q_a
            out += (rot.pow(2) / (f.eigenvalues + mu)).sum((1, 2))
        if self.other_layers == "identity" and mu > 0:
            for _, off, numel in self.others:
                out += v[:, off : off + numel].pow(2).sum(1) / mu
        return out

    def inverse_sqrt(self, v: Tensor, damping: float) -> Tensor:
        """(C + λI)^(-1/2) V for (k, p) rows (the symmetric square root)."""
        mu = self.weight_decay + damping
        return self._map(v, lambda lam: (lam + mu).rsqrt(), mu ** -0.5 if mu > 0 else 0.0)

    def spectrum(self, damping: float) -> tuple[float, float]:
        """Smallest and largest eigenvalue of C + λI over the layers (and the identity-treated
        parameters)."""
        mu = self.weight_decay + damping
        lows = [float(f.eigenvalues.min()) + mu for f in self.factors]
        highs = [float(f.eigenvalues.max()) + mu for f in self.factors]
        if self.others and self.other_layers == "identity":
            lows.append(mu)
            highs.append(mu)
        return (min(lows), max(highs)) if lows else (mu, mu)

    def dense(self) -> Tensor:
        """The (p, p) matrix C (for checks on small models)."""
        p = self.size
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        return torch.cat([self.matmat(eye[s : s + DENSE_BLOCK]) for s in range(0, p, DENSE_BLOCK)])

    # ------------------------------------------------------------------ files
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata describing the fit (for :func:`save_tensors_atomic`)."""
        tensors: dict[str, Tensor] = {}
        for i, f in enumerate(self.factors):
            for key in ("q_a", "s_a", "q_g", "s_g", "eigenvalues"):
                tensors[f"{i}.{key}"] = getattr(f, key)
        meta = {"kind": self.kind, "fisher": self.fisher, "other_layers": self.other_layers,
                "weight_sharing": self.weight_sharing,
                "layers": [layer.describe() for layer in self.layers],
                "others": [list(o) for o in self.others]}
        return tensors, meta

    @classmethod
    def from_state(cls, fm: FunctionalModel, tensors: dict[str, Tensor], meta: dict[str, Any],
                   budget: MemoryBudget | None = None) -> KroneckerCurvature:
        """Rebuild a fit saved by :meth:`state` for ``fm`` (its layers must match)."""
        layers, others = kronecker_layers(fm, meta["other_layers"])
        if [layer.describe() for layer in layers] != meta["layers"] or [
                list(o) for o in others] != meta["others"]:
            raise CorruptFileError("the saved factors describe other layers than the model's")
        factors = []
        for i in range(len(layers)):
            parts = {k: tensors[f"{i}.{k}"].to(fm.device, fm.dtype)
                     for k in ("q_a", "s_a", "q_g", "s_g", "eigenvalues")}
            factors.append(LayerFactors(**parts))
        return cls(meta["kind"], fm, layers, factors, others, meta["other_layers"],
                   meta["fisher"], budget=budget,
                   weight_sharing=meta.get("weight_sharing", "expand"))

