"""Summary table, plots (PNG) and ``report.html`` of an evaluation run."""

from __future__ import annotations

import html
import io as io_
import math
from collections import defaultdict
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repif import io  # noqa: E402

NAMES = {"lds": "LDS", "loo": "LOO correlation"}


def _mean(values: list[Any]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return fmean(vals) if vals else float("nan")


def reliability(results: dict[str, Any]) -> dict[str, Any] | None:
    """The ground truth's noise entry with missing numbers (stored as null) as NaN."""
    rel = results.get("ground_truth", {}).get("reliability")
    if not rel:
        return None
    return {k: float("nan") if v is None else v for k, v in rel.items()}


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, sample size): the damping with the best mean score over seeds
    (chosen on the evaluated test points, as dattri does), with that damping's mean score, its
    std over seeds, the mean per-cell standard error over test points, time and memory. Every
    damping's mean is kept under ``by_damping``."""
    groups: dict[tuple[str, int], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for c in results["cells"]:
        groups[(c["method"], c["sample_size"])][float(c["damping"])].append(c)
    methods = [*results["config"]["methods"], *(c["method"] for c in results["cells"])]
    order = {m: i for i, m in enumerate(dict.fromkeys(methods))}  # the config's, then the rest
    rows = []
    for (method, size), by_d in sorted(groups.items(),
                                       key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        means = {d: _mean([c["score"] for c in cells]) for d, cells in by_d.items()}
        best = max(means, key=lambda d: -math.inf if math.isnan(means[d]) else means[d])
        cells = by_d[best]
        vals = [c["score"] for c in cells if c["score"] is not None]
        row = {"method": method, "sample_size": size, "damping": best, "score": means[best],
               "score_std": pstdev(vals) if len(vals) > 1 else 0.0,
               "score_se": _mean([c.get("score_se") for c in cells]), "seeds": len(cells),
               "time_s": _mean([c["time_s"] for c in cells]),
               "fit_time_s": _mean([c.get("fit_time_s") for c in cells]),
               "peak_mem_bytes": _mean([c["peak_mem_bytes"] for c in cells]),
               "by_damping": {f"{d:g}": means[d] for d in sorted(means)}}
        for k in ("pooled", "slope", "median_rel_error", "pooled_reweight", "slope_reweight",
                  "median_rel_error_reweight"):
            if k in cells[0]:
                row[k] = _mean([c.get(k) for c in cells])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`table`'s rows and the ground truth's noise."""
    metric = results["config"]["metric"]
    name = NAMES[metric]
    loo = metric == "loo"
    head = (f"{'method':<40}{'m':>6}  {'damping':>8}  {name + ' ± se':>16}  {'seed sd':>7}  "
            + (f"{'pooled':>7}  {'slope':>6}  {'med.err':>7}  " if loo else "")
            + f"{'time s':>8}  {'mem MB':>7}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        score = f"{r['score']:.3f} ± {r['score_se']:.3f}"
        lines.append(
            f"{r['method']:<40}{r['sample_size'] or 'all':>6}  {r['damping']:>8g}  "
            f"{score:>16}  {r['score_std']:>7.3f}  "
            + (f"{r.get('pooled', nan):>7.3f}  {r.get('slope', nan):>6.2f}  "
               f"{r.get('median_rel_error', nan):>7.3f}  " if loo else "")
            + f"{r['time_s']:>8.2f}  {r['peak_mem_bytes'] / 2**20:>7.1f}")
    rel = reliability(results)
    if rel:
        lines.append(f"ground truth: an independent retraining seed scores {rel['mean']:.3f} ± "
                     f"{rel['se']:.3f} against it (ceiling for a perfect method ≈ "
                     f"{rel['ceiling']:.3f})")
    return "\n".join(lines)


def _png(fig: Any, path: Path) -> None:
    buf = io_.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    io.write_bytes_atomic(path, buf.getvalue)


def plot(rows: list[dict[str, Any]], results: dict[str, Any], out: Path) -> list[str]:
    """``score_vs_size.png`` (sampled methods against m, whole-pool methods and baselines as
    horizontal lines, the ground truth's ceiling dashed) and ``score_vs_time.png``."""
    name = NAMES[results["config"]["metric"]]
    sampled = defaultdict(list)
    flat = []
    for r in rows:
        (sampled[r["method"]] if r["sample_size"] else flat).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in sampled.items():
        ax.errorbar([r["sample_size"] for r in rs], [r["score"] for r in rs],
                    yerr=[r["score_std"] for r in rs], marker="o", capsize=3, label=method,
                    linestyle="--" if "@random" in method else "-")
    for i, r in enumerate(flat):
        ax.axhline(r["score"], color=f"C{(len(sampled) + i) % 10}", linestyle=":",
                   label=f"{r['method']} (whole pool)")
    rel = reliability(results)
    if rel and math.isfinite(rel.get("ceiling", float("nan"))):
        ax.axhline(rel["ceiling"], color="grey", linestyle="--", label="ground-truth ceiling")
    if sampled:
        ax.set_xscale("log")
    ax.set_xlabel("curvature sample size m")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _png(fig, out / "score_vs_size.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        rs = [r for r in rows if r["method"] == method]
        ax.plot([r["time_s"] for r in rs], [r["score"] for r in rs], marker="o",
                color=f"C{i % 10}", label=method, linestyle="-" if len(rs) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("time per method: curvature fit + scores (s)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _png(fig, out / "score_vs_time.png")
    return ["score_vs_size.png", "score_vs_time.png"]


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write the plots and ``report.html`` into ``out``; returns the HTML path."""
    rows = table(results)
    pngs = plot(rows, results, out) if rows else []
    cfg, gt = results["config"], results.get("ground_truth", {})
    name = NAMES[cfg["metric"]]
    loo = cfg["metric"] == "loo"
    body = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['sample_size'] or 'all'}</td>"
        f"<td>{r['damping']:g}</td><td>{r['score']:.3f} ± {r['score_se']:.3f}</td>"
        f"<td>{r['score_std']:.3f}</td><td>{r['seeds']}</td>"
        + (f"<td>{r.get('pooled', float('nan')):.3f}</td>"
           f"<td>{r.get('slope', float('nan')):.2f}</td>"
           f"<td>{r.get('median_rel_error', float('nan')):.3f}</td>" if loo else "")
        + f"<td>{r['time_s']:.2f}</td><td>{r['peak_mem_bytes'] / 2**20:.1f}</td></tr>"
        for r in rows)
    extra = "<th>pooled r</th><th>slope</th><th>median rel. error</th>" if loo else ""
    rel = reliability(results)
    rel_text = (f"An independent retraining seed (seed {rel['seed']}) scores {rel['mean']:.3f} "
                f"± {rel['se']:.3f} against the ground truth; a perfect method would reach about "
                f"{rel['ceiling']:.3f}." if rel else "The ground truth's noise was not measured.")
    if cfg["metric"] == "lds":
        what = (f"{cfg['subsets']} random subsets of {gt.get('subset_size', '?')} of the "
                f"{gt.get('n_train', '?')} training points (fraction {cfg['fraction']}), each "
                f"retrained with {cfg['gt_seeds']} seed(s). LDS(t) is the Spearman correlation "
                "across subsets between the summed attribution of each subset's points and the "
                "retrained model's target; the table shows its mean over test points.")
    else:
        what = (f"{gt.get('loo_points', '?')} training points each left out in turn and the "
                f"model retrained on the other {gt.get('n_train', 0) - 1} with the same recipe "
                f"({cfg['gt_seeds']} seed(s)). Predicted change of the target: "
                "−(τ_j − τ̄)/(n − 1) (the retraining convention). The score is the Pearson "
                "correlation across left-out points per test point, averaged; pooled r, slope "
                "(1 = the right scale) and the median relative error are over all (test, "
                "point) pairs.")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>repif evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:3px 6px;
text-align:right}}img{{max-width:49%}}</style></head><body>
<h1>{name} against retraining</h1>
<p>Dataset <b>{html.escape(str(cfg['dataset']))}</b>, model <b>{html.escape(str(cfg['model']))}
</b> ({results.get('num_params', '?')} parameters), target <b>{cfg['target']}</b>
({'−cross-entropy' if cfg['target'] == 'loss' else 'correct-class margin'}) on
{gt.get('n_test', '?')} test points; attributed model's test accuracy
{gt.get('attributed_model_test_accuracy', float('nan')):.3f}.</p>
<p>Ground truth: {what} {rel_text} {gt.get('retrains', '?')} retrained models.</p>
<h2>Results</h2>
<p>Per method and sample size, the damping with the best mean {name} over seeds is shown
(picked on these test points, as dattri does). ± is the standard error over test points;
"seed sd" the spread over curvature-sample seeds. Time and memory cover the curvature fit and
every score.</p>
<table><tr><th>method</th><th>m</th><th>damping</th><th>{name}</th><th>seed sd</th>
<th>seeds</th>{extra}<th>time (s)</th><th>peak mem (MB)</th></tr>{body}</table>
<h2>Plots</h2>{''.join(f'<img src="{p}" alt="{p}">' for p in pngs)}
</body></html>"""
    path = out / "report.html"
    io.write_bytes_atomic(path, page.encode)
    return path
