"""Plots (PNG) and a readable ``report.html`` for a finished study."""

from __future__ import annotations

import html
import io as io_
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repif import io  # noqa: E402
from repif.studies.class_removal.summary import conclusions, update_cost  # noqa: E402

PLOTS = (
    ("f1", "F1 (forget vs consistency)", "f1_vs_size.png", "f1"),
    ("f1_literature", "F1 of the literature (forget vs accuracy on the other classes)",
     "f1_literature_vs_size.png", "f1_literature"),
    ("ihvp_rel_error", "inverse-HVP relative error vs full pool", "ihvp_error_vs_size.png", None),
    ("time_s", "time of sampling + solve + update (s)", "time_vs_size.png", "time_s"),
    ("peak_mem_bytes", "peak memory growth (MB)", "memory_vs_size.png", "peak_mem_bytes"),
)


def plot(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]], out: Path) -> list[str]:
    """One PNG per metric against sample size, a line per sampler with ± std error bars and the
    references as horizontal lines; returns the file names."""
    names = []
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for key, label, fname, ref_key in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        scale = 2**-20 if key == "peak_mem_bytes" else 1.0
        if all(_missing(r.get(key)) for r in rows):
            plt.close(fig)  # results written before the metric existed
            continue
        for s in samplers:
            rs = [r for r in rows if r["sampler"] == s]
            ax.errorbar([r["sample_size"] for r in rs], [r[key] * scale for r in rs],
                        yerr=[r[key + "_std"] * scale for r in rs], marker="o", capsize=3,
                        label=s, linestyle="--" if s == "random" else "-")
        if ref_key:
            for kind, style in (("full", ":"), ("retrain", "-.")):
                if kind in refs:
                    ax.axhline(refs[kind][ref_key] * scale, color="black", linestyle=style,
                               label=f"{kind} reference")
        ax.set_xscale("log", base=2)
        if key == "ihvp_rel_error":
            ax.set_yscale("log")
        _finish(fig, ax, "curvature sample size m", label, out / fname)
        names.append(fname)
    if all(not _missing(r.get("time_s")) and not _missing(r.get("f1")) for r in rows):
        names.append(_plot_f1_against_time(rows, refs, samplers, out))
    return names


F1_TIME_PNG = "f1_vs_time.png"


def _plot_f1_against_time(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]],
                          samplers: list[str], out: Path) -> str:
    """F1 against the whole time of an update (every cost charged), a line per sampler through
    its sample sizes (each point labelled with m): the cheaper route to a given F1 lies left."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in samplers:
        rs = sorted((r for r in rows if r["sampler"] == s), key=lambda r: r["sample_size"])
        line = ax.errorbar([r["time_s"] for r in rs], [r["f1"] for r in rs],
                           yerr=[r["f1_std"] for r in rs], marker="o", capsize=3, label=s,
                           linestyle="--" if s == "random" else "-")
        for r in rs:
            ax.annotate(f"{r['sample_size']}", (r["time_s"], r["f1"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3), color=line[0].get_color())
    if "retrain" in refs:
        ax.axhline(refs["retrain"]["f1"], color="black", linestyle="-.", label="retrain reference")
    ax.set_xscale("log")
    _finish(fig, ax, "time of one update, every cost charged (s)", "F1 (forget vs consistency)",
            out / F1_TIME_PNG)
    return F1_TIME_PNG


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
    """Label, grid and legend ``ax``, then write ``fig`` to ``path`` as a PNG (atomically, like
    every other output) and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = io_.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    io.write_bytes_atomic(path, png.getvalue)


def _missing(v: Any) -> bool:
    return v is None or v != v  # None or NaN


def _num(v: Any, digits: int = 3) -> str:
    return "—" if _missing(v) else f"{v:.{digits}f}"


def _table_html(rows: list[dict[str, Any]]) -> str:
    head = ("<tr><th>sampler</th><th>m</th><th>F1</th><th>F1 (literature)</th><th>forget</th>"
            "<th>consistency</th>"
            "<th>acc. others</th><th>ihvp rel. error</th><th>seed spread</th><th>time (s)</th>"
            "<th>peak mem (MB)</th></tr>")
    body = []
    for r in rows:
        body.append(
            f"<tr><td>{html.escape(r['sampler'])}</td><td>{r['sample_size']}</td>"
            f"<td>{r['f1']:.3f} ± {r['f1_std']:.3f}</td><td>{_num(r.get('f1_literature'))}</td>"
            f"<td>{r['forget']:.3f}</td>"
            f"<td>{r['consistency']:.3f}</td><td>{r['accuracy_remaining']:.3f}</td>"
            f"<td>{r['ihvp_rel_error']:.3f} ± {r['ihvp_rel_error_std']:.3f}</td>"
            f"<td>{r.get('seed_spread', float('nan')):.4f}</td>"
            f"<td>{r['time_s']:.3f}</td><td>{r['peak_mem_bytes'] / 2**20:.1f}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def write_report(results: dict[str, Any], rows: list[dict[str, Any]],
                 refs: dict[str, dict[str, float]], head: dict[str, Any], out: Path) -> Path:
    """Write the PNG plots and ``report.html`` into ``out``; returns the HTML path."""
    pngs = plot(rows, refs, out)
    cfg = results["config"]
    lines = conclusions(head, update_cost(rows, refs))
    ref_rows = "".join(
        f"<tr><td>{k}</td><td>{v['f1']:.3f}</td><td>{_num(v.get('f1_literature'))}</td>"
        f"<td>{v['forget']:.3f}</td>"
        f"<td>{v['consistency']:.3f}</td><td>{v['accuracy_remaining']:.3f}</td>"
        f"<td>{v['time_s']:.3f}</td></tr>" for k, v in refs.items())
    method = next((c.get("memory_method") for c in results["cells"]), "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>repif class removal</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:3px 6px;
text-align:right}}img{{max-width:49%}}</style></head><body>
<h1>Class removal with influence updates</h1>
<p>Dataset <b>{html.escape(str(cfg['dataset']))}</b>, model <b>{html.escape(str(cfg['model']))}</b>
({results.get('num_params', '?')} parameters); removed class(es) {cfg['remove']};
curvature {cfg['curvature']}, damping {cfg['damping']}, solver {cfg['solver']},
scale {cfg['scale']} (picked on a validation split when "auto"), steps {cfg['steps']};
{cfg['seeds']} seeds per cell. Each cell draws a curvature subset of size m from the remaining
training points, takes the influence update and scores the new model on the test set.</p>
<h2>Conclusions</h2><ul>{''.join(f'<li>{html.escape(s)}</li>' for s in lines)}</ul>
<h2>Results (mean ± std over removed classes and seeds)</h2>{_table_html(rows)}
<h3>References (no sampling)</h3><table><tr><th>kind</th><th>F1</th><th>F1 (literature)</th>
<th>forget</th>
<th>consistency</th><th>acc. others</th><th>time (s)</th></tr>{ref_rows}</table>
<p>F1 = 2·forget·consistency/(forget+consistency); forget = 1 − fraction of the removed class's
test points still predicted as it; consistency = fraction of the other test points whose
prediction is unchanged. F1 (literature) = the class-removal literature's: forget against the
plain accuracy on the other classes' true labels. ihvp error = ‖v_T − v_R‖/‖v_R‖ against the
full-pool solve; seed spread = 1 − mean pairwise cosine of v_T across seeds (read it beside the
error: a sampler can be consistently wrong). Time and memory cover sampling (including the
feature/logit pass, made once per study and charged in full to every cell whose sampler reads
it), the solver's preparation, and the update. Memory: {html.escape(str(method))}.</p>
<h2>Plots</h2>{''.join(f'<img src="{p}" alt="{p}">' for p in pngs)}
</body></html>"""
    path = out / "report.html"
    io.write_bytes_atomic(path, page.encode)
    return path
