"""Aggregates a study's cells into the per-(sampler, size) table and its headline claims."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from statistics import fmean, pstdev
from typing import Any

from torch import Tensor

from repif.metrics import seed_spread

BASELINE = "random"

#: F1 within this of random's best still counts as "matching" it: half a test-set point in
#: a few hundred, far below the seed-to-seed spread of any sampler.
MATCH_TOLERANCE = 0.005

_METRICS = ("f1", "f1_literature", "forget", "consistency", "accuracy_remaining",
            "ihvp_rel_error", "ihvp_cosine", "time_s", "peak_mem_bytes")


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return fmean(vals), (pstdev(vals) if len(vals) > 1 else 0.0)


def aggregate(
    results: dict[str, Any],
    vectors: Callable[[int, str, int], list[Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (sampler, size): mean and std over removed classes × seeds of every metric,
    and the seed spread (1 − mean pairwise cosine across seeds, averaged over classes)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for cell in results["cells"]:
        groups[(cell["sampler"], cell["sample_size"])].append(cell)
    order = {s: i for i, s in enumerate(results["config"]["samplers"])}
    rows = []
    for (sampler, m), cells in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                      kv[0][1])):
        row: dict[str, Any] = {"sampler": sampler, "sample_size": m, "n": len(cells)}
        for key in _METRICS:
            row[key], row[key + "_std"] = _mean_std([c.get(key) for c in cells])
        if vectors is not None:
            classes = sorted({c["removed_class"] for c in cells})
            row["seed_spread"] = _mean_std([seed_spread(vectors(k, sampler, m))
                                            for k in classes])[0]
        rows.append(row)
    return rows


def references(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over removed classes of each reference kind's metrics."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("full", "retrain"):
        refs = [r for r in results["references"] if r["kind"] == kind]
        if refs:
            out[kind] = {k: _mean_std([r.get(k) for r in refs])[0]
                         for k in ("f1", "f1_literature", "forget", "consistency",
                                   "accuracy_remaining", "time_s", "peak_mem_bytes")}
    return out


def update_cost(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]
                ) -> dict[str, float]:
    """The influence updates' mean time and peak memory over all cells, each as a fraction of
    retraining from scratch (the reference the update replaces); empty without a retrain."""
    retrain = refs.get("retrain")
    if not retrain or not rows:
        return {}
    time_s = fmean(r["time_s"] for r in rows)
    mem = fmean(r["peak_mem_bytes"] for r in rows)
    return {"update_time_s": time_s, "retrain_time_s": retrain["time_s"],
            "time_ratio": time_s / retrain["time_s"],
            "update_peak_mem_bytes": mem, "retrain_peak_mem_bytes": retrain["peak_mem_bytes"],
            "memory_ratio": mem / max(retrain["peak_mem_bytes"], 1)}


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the study shows against ``random`` (docs/design.md, "Protocol").

    ``match``: per smart sampler, the smallest size whose mean F1 reaches random's F1 at
    random's largest size (within MATCH_TOLERANCE), and the time and memory saved there.
    ``error_match``: the same for the inverse-HVP error against the full-pool solve.
    ``gain``: per smart sampler, the mean F1 gain over random at the sizes where random is
    still below its own plateau (its F1 at its largest size minus MATCH_TOLERANCE).
    """
    by = defaultdict(dict)
    for r in rows:
        by[r["sampler"]][r["sample_size"]] = r
    if BASELINE not in by:
        return {}
    base = by[BASELINE]
    m_max = max(base)
    target = base[m_max]
    below = [m for m in sorted(base) if base[m]["f1"] < target["f1"] - MATCH_TOLERANCE]
    out: dict[str, Any] = {"random_max_size": m_max, "random_f1_at_max": target["f1"],
                           "random_error_at_max": target["ihvp_rel_error"],
                           "match": {}, "gain": {}, "error_match": {}}
    for sampler, sizes in by.items():
        if sampler == BASELINE:
            continue
        for name, key, reaches in (
            ("match", "f1", lambda r: r["f1"] >= target["f1"] - MATCH_TOLERANCE),
            ("error_match", "ihvp_rel_error",
             lambda r: r["ihvp_rel_error"] <= target["ihvp_rel_error"]),
        ):
            hit = next((m for m in sorted(sizes) if reaches(sizes[m])), None)
            if hit is not None:
                r = sizes[hit]
                out[name][sampler] = {
                    "size": hit, key: r[key],
                    "time_saved": 1 - r["time_s"] / target["time_s"],
                    "memory_saved": 1 - r["peak_mem_bytes"] / max(target["peak_mem_bytes"], 1),
                }
        gains = [sizes[m]["f1"] - base[m]["f1"] for m in below if m in sizes]
        if gains:
            out["gain"][sampler] = {"sizes": [m for m in below if m in sizes],
                                    "mean_f1_gain": fmean(gains)}
    return out


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> str:
    """A fixed-width text table (mean ± std per sampler and size) followed by the references."""
    head = (f"{'sampler':<26}{'m':>5}  {'F1':>15}  {'F1 lit':>7}  {'forget':>7}  "
            f"{'consist':>7}  {'ihvp err':>15}  {'spread':>7}  {'time s':>8}  {'mem MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = r.get("seed_spread", float("nan"))
        lines.append(
            f"{r['sampler']:<26}{r['sample_size']:>5}  {_fmt(r['f1'], r['f1_std']):>15}  "
            f"{r.get('f1_literature', float('nan')):>7.3f}  "
            f"{r['forget']:>7.3f}  {r['consistency']:>7.3f}  "
            f"{_fmt(r['ihvp_rel_error'], r['ihvp_rel_error_std']):>15}  {spread:>7.4f}  "
            f"{r['time_s']:>8.3f}  {r['peak_mem_bytes'] / 2**20:>7.1f}"
        )
    for kind, r in refs.items():
        name = {"full": "reference: full pool", "retrain": "reference: retrain"}[kind]
        lines.append(f"{name:<26}{'':>5}  {r['f1']:>15.3f}  "
                     f"{r.get('f1_literature', float('nan')):>7.3f}  {r['forget']:>7.3f}  "
                     f"{r['consistency']:>7.3f}  {'':>15}  {'':>7}  {r['time_s']:>8.3f}  "
                     f"{r['peak_mem_bytes'] / 2**20:>7.1f}")
    return "\n".join(lines)


def _saving(fraction: float, what: str) -> str:
    """'12.3% less time' for a saving, '4.5% more time' for a loss."""
    return f"{100 * abs(fraction):.1f}% {'less' if fraction >= 0 else 'more'} {what}"


def conclusions(head: dict[str, Any], cost: dict[str, float] | None = None) -> list[str]:
    """One plain sentence each for time, memory and F1 (and, given :func:`update_cost`, the
    update against retraining)."""
    lines = []
    if cost:
        lines.append(
            f"Against retraining: an update took {cost['update_time_s']:.1f} s on average, "
            f"{100 * cost['time_ratio']:.1f}% of the retrain's {cost['retrain_time_s']:.1f} s, "
            f"with {100 * cost['memory_ratio']:.0f}% of its peak memory."
        )
    if not head:
        return ["No 'random' baseline was run, so nothing is compared against it.", *lines]
    m_max, f1_max = head["random_max_size"], head["random_f1_at_max"]
    if head["match"]:
        best_t = max(head["match"].items(), key=lambda kv: kv[1]["time_saved"])
        best_m = max(head["match"].items(), key=lambda kv: kv[1]["memory_saved"])
        time_s = (f"Time: {best_t[0]} matches random's F1 at m={m_max} ({f1_max:.3f}) with "
                  f"m={best_t[1]['size']}, {_saving(best_t[1]['time_saved'], 'time')}.")
        mem_s = (f"Memory: {best_m[0]} does so with "
                 f"{_saving(best_m[1]['memory_saved'], 'peak memory')} (m={best_m[1]['size']}).")
    else:
        time_s = (f"Time: no smart sampler reached random's F1 at m={m_max} ({f1_max:.3f}) "
                  "at a smaller size, so no time is saved.")
        mem_s = "Memory: likewise, no memory is saved at equal F1."
    if head["gain"]:
        best = max(head["gain"].items(), key=lambda kv: kv[1]["mean_f1_gain"])
        f1_s = (f"F1: at sizes where random is below its plateau ({best[1]['sizes']}), "
                f"{best[0]} changes F1 by {100 * best[1]['mean_f1_gain']:+.1f} points on average.")
    else:
        f1_s = "F1: random is already at its plateau at every size run, so no F1 gain is possible."
    if head["error_match"]:
        best_e = min(head["error_match"].items(), key=lambda kv: kv[1]["size"])
        err_s = (f"Faithfulness: {best_e[0]} reaches random's inverse-HVP error at m={m_max} "
                 f"({head['random_error_at_max']:.3f}) with m={best_e[1]['size']} "
                 f"({_saving(best_e[1]['time_saved'], 'time')}, "
                 f"{_saving(best_e[1]['memory_saved'], 'memory')}).")
    elif math.isnan(head["random_error_at_max"]):
        err_s = ("Faithfulness: not measured (no full-pool reference in this run: "
                 "--references none).")
    else:
        err_s = (f"Faithfulness: no smart sampler reaches random's inverse-HVP error at "
                 f"m={m_max} with fewer samples.")
    return [time_s, mem_s, f1_s, err_s, *lines]
