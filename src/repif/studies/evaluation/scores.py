"""The ground-truth metrics: linear datamodeling score (LDS) and leave-one-out (LOO) correlation.

Pure functions of arrays (docs/design.md, "Protocol"). Attributions τ(t, j) are oriented so that
**positive helps**: τ is the change of the target f (higher is better: −loss or the
correct-class margin) per unit of up-weighting training point j. With repif's influence
I = −∇q(z_t)ᵀ(C + λI)⁻¹∇l(z_j) (the change of the query q per unit up-weighting), τ = −I when q is
the loss and f = −loss, and τ = +I when q and f are both the margin (:func:`orient`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

#: Leave-one-out conventions: how removing training point j changes the target, to first order.
#: "retrain": retrained on the n − 1 other points with the same recipe (the mean loss over n − 1
#: points, the same weight decay): Δf_j ≈ −(τ_j − τ̄)/(n − 1), τ̄ the mean attribution over all
#: n training points. "reweight": j's weight set to 0 while the others keep 1/n and the
#: regulariser stays fixed: Δf_j ≈ −τ_j/n.
LOO_CONVENTIONS = ("retrain", "reweight")


def orient(influence: np.ndarray, target: str) -> np.ndarray:
    """repif influence scores (query = the target's measurement) → attributions τ, positive
    helps: −I for the loss (f = −loss), +I for the margin (f = margin)."""
    if target == "loss":
        return -influence
    if target == "margin":
        return influence
    raise ValueError(f"unknown target {target!r}; use 'loss' or 'margin'")


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (T, S) arrays; NaN for a row that is constant in
    either array (its correlation is undefined)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    out = np.full(a.shape[0], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return np.clip(out, -1.0, 1.0)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rank correlation of two (T, S) arrays (average ranks for ties, as
    ``scipy.stats.spearmanr``); NaN for a row that is constant in either array."""
    return pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def lds(attributions: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-test-point linear datamodeling score.

    ``attributions`` (T, n): τ(t, j), positive helps; ``masks`` (S, n) bool: which training
    points subset k holds; ``targets`` (T, S): the target f of the model retrained on subset k
    (mean over ground-truth seeds). Returns (T,) Spearman correlations across the S subsets
    between Σ_{j∈S_k} τ(t, j) and f_k(t).
    """
    predicted = np.asarray(attributions, dtype=np.float64) @ np.asarray(masks, np.float64).T
    return spearman_rows(predicted, targets)


def loo_predicted(attributions: np.ndarray, points: np.ndarray,
                  convention: str = "retrain") -> np.ndarray:
    """Predicted change of the target when each of ``points`` is left out, (T, k), from
    attributions over **all** n training points (T, n); see :data:`LOO_CONVENTIONS`."""
    tau = np.asarray(attributions, dtype=np.float64)
    n = tau.shape[1]
    if convention == "retrain":
        if n < 2:
            raise ValueError("leave-one-out retraining needs at least 2 training points")
        return -(tau[:, points] - tau.mean(axis=1, keepdims=True)) / (n - 1)
    if convention == "reweight":
        return -tau[:, points] / n
    raise ValueError(f"unknown leave-one-out convention {convention!r}; use one of "
                     f"{', '.join(LOO_CONVENTIONS)}")


def loo_scores(predicted: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    """Leave-one-out agreement of (T, k) predicted and actual target changes.

    ``per_test``: Pearson across the k left-out points, per test point (what dattri reports,
    averaged); ``pooled``: Pearson over all (t, j) pairs; ``slope``: least-squares slope of actual
    on predicted through the origin over all pairs (1 = the right scale);
    ``median_rel_error``: the median over pairs of |predicted − actual| / |actual|. Per-test
    correlations ignore a per-test offset and scale, so they do not depend on the LOO convention;
    the other three do.
    """
    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    per_test = pearson_rows(p, a)
    pooled = float(pearson_rows(p.reshape(1, -1), a.reshape(1, -1))[0])
    denom = float((p * p).sum())
    slope = float((p * a).sum() / denom) if denom > 0 else float("nan")
    nonzero = a != 0
    rel = float(np.median(np.abs(p - a)[nonzero] / np.abs(a[nonzero]))) if nonzero.any() \
        else float("nan")
    return {"per_test": per_test, "pooled": pooled, "slope": slope, "median_rel_error": rel}


def summary(values: np.ndarray) -> dict[str, Any]:
    """Mean and standard error (std / √count, ddof 1) of the defined (finite) values, with the
    count of defined and undefined (NaN: constant rows) ones."""
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    se = float(ok.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "n": n, "n_undefined": int(v.size - n)}
