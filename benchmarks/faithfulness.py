"""Faithfulness of subset-curvature inverse-HVPs: every sampler against the full-pool solve.

Protocol (docs/design.md, "Protocol"): remove class 0. The pool R is every training point of the
other classes, g = (1/|R|) Σ_{z in class 0} ∇l(z), and the reference v_R = (C_R + λI)⁻¹ g uses the
GGN of all of R (CG to a relative residual of 1e-10, checked afterwards). For every sampler, sample
size m and seed, v_T = InfluenceEstimator(..., solver="woodbury", sampler=s, sample_size=m,
seed=seed).fit(R).inverse_hvp(g); each sampler also runs with ``shrinkage="auto"`` (labelled
"<sampler>+shrink"). Per (sampler, m): ‖v_T − v_R‖/‖v_R‖ and cosine(v_T, v_R) as mean ± std
over seeds, and the seed spread 1 − mean pairwise cosine of the v_T across seeds.

    python benchmarks/faithfulness.py                 # the full run (writes benchmarks/results)
    python benchmarks/faithfulness.py --quick         # a smoke run into a temporary folder

Writes ``faithfulness.json`` (config, reference solves, one row per run, the summary and the
headline), ``faithfulness.md`` (tables a person reads) and ``faithfulness.png`` (error vs m).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

import repif
from repif import datasets, io, samplers, training
from repif.estimator import InfluenceEstimator
from repif.studies.evaluation.methods import parse_method

REMOVED_CLASS = 0
DAMPING = 0.01
CURVATURE = "ggn"
REFERENCE_TOL = 1e-10
#: A reference solve is accepted when ‖(C_R + λI) v_R − g‖ ≤ this × ‖g‖ (CG stops silently at
#: max_iter, so the residual is re-measured here).
REFERENCE_MAX_RESIDUAL = 1e-8
SHRINK_SUFFIX = "+shrink"

#: Model and training recipe per dataset. digits: the library's defaults (30 epochs, Adam 1e-2,
#: hidden 64 → 4,810 parameters). Fashion-MNIST: 5,000 training points and an MLP with 8 hidden
#: units (6,370 parameters), Adam 3e-3 for 20 epochs: the Woodbury solve costs (10·m)²·P, so a
#: wider model (hidden 64: 50,890 parameters, 1 GB factor at m = 256) does not fit 20 seeds × 12
#: sampler variants × 5 sizes in minutes on 2 cores; the small CNN's full-pool CG reference alone
#: ran > 15 minutes.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"load": {}, "model": "mlp", "hidden": None, "train": {}},
    "fashion-mnist": {
        "load": {"limit_train": 5000, "limit_test": 1000},
        "model": "mlp",
        "hidden": 8,
        "train": {"epochs": 20, "lr": 3e-3},
    },
}
QUICK_LIMIT_TRAIN = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; "
                   "with --quick a temporary folder)")
    p.add_argument("--seeds", type=int, default=20, help="sampler seeds per (sampler, m)")
    p.add_argument("--sizes", default="16,32,64,128,256", help="comma-separated sample sizes m")
    p.add_argument("--datasets", default="digits,fashion-mnist", help="comma-separated")
    p.add_argument("--samplers", default=",".join(samplers.names()),
                   help="comma-separated registered samplers, each with options as "
                   "name+key=value (default: all, with their defaults)")
    p.add_argument("--no-shrink", action="store_true", help="skip the shrinkage='auto' runs")
    p.add_argument("--damping", type=float, default=DAMPING)
    p.add_argument("--cache-dir", default=os.environ.get(
        "REPIF_CACHE", str(Path.home() / ".cache" / "repif" / "models")),
        help="trained-model cache (default $REPIF_CACHE or ~/.cache/repif/models)")
    p.add_argument("--jobs", type=int, default=2,
                   help="worker processes, one (dataset, sampler, m) cell at a time (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: on a shared 2-core machine, "
                        "2 threads made a full-pool GGN product 28× slower, 2.65 s vs 0.094 s)")
    p.add_argument("--merge", action="store_true",
                   help="re-run only --datasets × --samplers and replace their rows in the "
                        "existing OUT/faithfulness.json (same seeds, sizes and damping)")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite faithfulness.md and .png from OUT/faithfulness.json")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 2 seeds, m = 16,32, Fashion-MNIST limited to "
                        f"{QUICK_LIMIT_TRAIN} training points")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sizes = min(args.seeds, 2), "16,32"
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for d in args.datasets:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}; this benchmark knows {', '.join(DATASETS)}")
    for s in args.samplers:
        try:
            sampler_of(s)
        except (KeyError, ValueError) as e:
            p.error(f"sampler {s!r}: {e} (registered: {', '.join(samplers.names())}; options "
                    "as name+key=value, e.g. logit-importance+proxy=leverage)")
    if args.seeds < 2:
        p.error("--seeds must be at least 2 (the seed spread needs pairs)")
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "repif-faithfulness-quick")
                    if args.quick else "benchmarks/results")
    return args


# ------------------------------------------------------------------------------- one dataset
def load_model(name: str, cache_dir: str, quick: bool) -> dict[str, Any]:
    """The dataset (float64 inputs), the trained float64 model, the pool R and class 0."""
    spec = DATASETS[name]
    load_kw = dict(spec["load"])
    if quick and "limit_train" in load_kw:
        load_kw["limit_train"] = min(load_kw["limit_train"], QUICK_LIMIT_TRAIN)
    ds = datasets.load(name, **load_kw)
    t0 = time.perf_counter()
    model = training.load_or_train(
        ds, spec["model"], seed=0, cache_dir=cache_dir, hidden=spec["hidden"], **spec["train"]
    )
    train_s = time.perf_counter() - t0
    model = model.double().eval()
    x, y = ds.train
    x = x.double()
    with torch.no_grad():
        test_acc = float((model(ds.test[0].double()).argmax(1) == ds.test[1]).double().mean())
        train_acc = float((model(x).argmax(1) == y).double().mean())
    pool = torch.nonzero(y != REMOVED_CLASS).flatten()
    removed = torch.nonzero(y == REMOVED_CLASS).flatten()
    info = {
        "dataset": name,
        "n_train": len(y),
        "n_test": len(ds.test[1]),
        "pool_size": len(pool),
        "removed_size": len(removed),
        "model": spec["model"],
        "hidden": spec["hidden"],
        "train_recipe": {"seed": 0, **spec["train"]},
        "load_options": load_kw,
        "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "train_or_load_s": train_s,
    }
    return {"model": model, "x": x, "y": y, "pool": pool, "removed": removed, "info": info}


def prepare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`load_model` (training and caching the model) plus the full-pool reference."""
    prep = load_model(name, args.cache_dir, args.quick)
    t0 = time.perf_counter()
    ref = InfluenceEstimator(
        prep["model"], (prep["x"], prep["y"]), curvature=CURVATURE, damping=args.damping,
        solver="cg", tol=REFERENCE_TOL, max_iter=20_000,
    )
    g = ref.train_gradients(prep["removed"]).sum(0) / len(prep["pool"])
    ref.fit(prep["pool"])
    v_ref = ref.inverse_hvp(g)
    op = ref.solver.operator
    residual = float((op.matvec(v_ref) + args.damping * v_ref - g).norm() / g.norm())
    if not residual <= REFERENCE_MAX_RESIDUAL:
        raise RuntimeError(
            f"{name}: reference CG residual {residual:.2e} > {REFERENCE_MAX_RESIDUAL:.0e}"
        )
    prep["info"]["reference"] = {
        "solver": "cg",
        "tol": REFERENCE_TOL,
        "iterations": ref.solver.iterations[-1],
        "relative_residual": residual,
        "g_norm": float(g.norm()),
        "v_norm": float(v_ref.norm()),
        "time_s": time.perf_counter() - t0,
    }
    prep["g"], prep["v_ref"] = g, v_ref
    return prep


def sampler_of(spec: str) -> samplers.Sampler:
    """A registered sampler from ``name[+key=value…]`` (the LDS benchmark's sampler syntax)."""
    method = parse_method(f"ggn:woodbury@{spec}")
    if method.shrinkage:
        raise ValueError("shrinkage is this benchmark's own variant: leave +shrink out")
    return samplers.build(method.sampler, dict(method.sampler_options))


def run_one(prep: dict[str, Any], sampler: str, shrink: bool, m: int, seed: int,
            damping: float) -> tuple[dict[str, Any], torch.Tensor]:
    t0 = time.perf_counter()
    est = InfluenceEstimator(
        prep["model"], (prep["x"], prep["y"]), curvature=CURVATURE, damping=damping,
        solver="woodbury", sampler=sampler_of(sampler), sample_size=m, seed=seed,
        shrinkage="auto" if shrink else 0.0,
    )
    est.fit(prep["pool"])
    t1 = time.perf_counter()
    v = est.inverse_hvp(prep["g"])
    t2 = time.perf_counter()
    v_ref = prep["v_ref"]
    row = {
        "dataset": prep["info"]["dataset"],
        "sampler": sampler + (SHRINK_SUFFIX if shrink else ""),
        "base_sampler": sampler,
        "shrinkage": "auto" if shrink else 0.0,
        "sample_size": m,
        "seed": seed,
        "ihvp_rel_error": float((v - v_ref).norm() / v_ref.norm()),
        "ihvp_cosine": float(v @ v_ref / (v.norm() * v_ref.norm())),
        "norm_ratio": float(v.norm() / v_ref.norm()),
        "sample_s": est.timings["sample_s"],
        "solve_s": est.timings["solver_fit_s"] + (t2 - t1),
        "total_s": t2 - t0,
    }
    return row, v


#: Per-process memo of :func:`load_model` results (worker processes load each dataset once).
_LOADED: dict[str, dict[str, Any]] = {}


def init_worker(threads: int) -> None:
    """Thread limits for torch and for numpy's BLAS / scikit-learn's OpenMP pools (herding and
    k-means): on the shared machine, 2 BLAS threads made one herding draw 13× slower."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    _LIMITS.append(threadpool_limits(limits=threads))


_LIMITS: list[Any] = []  # keeps the thread limits alive for the life of the process


def run_cell(task: dict[str, Any]) -> tuple[list[dict], float]:
    """All seeds of one (dataset, sampler, shrinkage, m): the rows and the seed spread."""
    name = task["dataset"]
    if name not in _LOADED:
        _LOADED[name] = load_model(name, task["cache_dir"], task["quick"])
    prep = {**_LOADED[name], "g": task["g"], "v_ref": task["v_ref"]}
    rows, vs = [], []
    for seed in range(task["seeds"]):
        row, v = run_one(prep, task["sampler"], task["shrink"], task["m"], seed, task["damping"])
        rows.append(row)
        vs.append(v)
    return rows, seed_spread(vs)


# ---------------------------------------------------------------------------------- summaries
def seed_spread(vs: list[torch.Tensor]) -> float:
    """1 − mean pairwise cosine of the v_T across seeds (0: every seed gives the same v_T)."""
    u = torch.stack([v / v.norm() for v in vs])
    cos = u @ u.T
    k = len(vs)
    return float(1.0 - (cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))


def summarise(rows: list[dict], spreads: dict[tuple, float]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["dataset"], r["sampler"], r["sample_size"]) for r in rows):
        dataset, label, m = key
        spread = spreads[key]
        cell = [r for r in rows if (r["dataset"], r["sampler"], r["sample_size"]) == key]
        err = np.array([r["ihvp_rel_error"] for r in cell])
        cos = np.array([r["ihvp_cosine"] for r in cell])
        out.append({
            "dataset": dataset,
            "sampler": label,
            "sample_size": m,
            "seeds": len(cell),
            "error_mean": float(err.mean()),
            "error_std": float(err.std(ddof=1)),
            "cosine_mean": float(cos.mean()),
            "cosine_std": float(cos.std(ddof=1)),
            "norm_ratio_mean": float(np.mean([r["norm_ratio"] for r in cell])),
            "spread": spread,
            "sample_s_mean": float(np.mean([r["sample_s"] for r in cell])),
            "solve_s_mean": float(np.mean([r["solve_s"] for r in cell])),
        })
    return out


def matching_size(sizes: list[int], errors: list[float], target: float) -> dict[str, Any]:
    """Smallest m whose mean error ≤ target, interpolating linearly in (log m, error) between
    the last grid size above the target and the first at or below it."""
    for k, (m, e) in enumerate(zip(sizes, errors, strict=True)):
        if e <= target:
            if k == 0:
                return {"m": float(m), "bound": "≤", "grid_m": m}
            m0, e0 = sizes[k - 1], errors[k - 1]
            t = (e0 - target) / (e0 - e) if e0 != e else 1.0
            return {"m": math.exp(math.log(m0) + t * (math.log(m) - math.log(m0))),
                    "bound": "=", "grid_m": m}
    return {"m": None, "bound": ">", "grid_m": None}


def mann_whitney_p(a: list[float], b: list[float]) -> float | None:
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:  # scipy is optional here
        return None
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def headline(summary: list[dict], rows: list[dict], datasets_: list[str],
             sizes: list[int]) -> dict[str, Any]:
    """Per dataset: for each sampler the m matching random's error at the largest m (the sample
    reduction factor), and at equal m the error and spread ratios against random."""
    out: dict[str, Any] = {}
    top = max(sizes)
    for d in datasets_:
        cells = {(s["sampler"], s["sample_size"]): s for s in summary if s["dataset"] == d}
        if ("random", top) not in cells:
            continue
        target = cells[("random", top)]["error_mean"]
        labels = list(dict.fromkeys(s["sampler"] for s in summary if s["dataset"] == d))
        per = {}
        for label in labels:
            errs = [cells[(label, m)]["error_mean"] for m in sizes]
            match = matching_size(sizes, errs, target)
            equal_m = {}
            for m in sizes:
                a = [r["ihvp_rel_error"] for r in rows
                     if (r["dataset"], r["sampler"], r["sample_size"]) == (d, label, m)]
                b = [r["ihvp_rel_error"] for r in rows
                     if (r["dataset"], r["sampler"], r["sample_size"]) == (d, "random", m)]
                rnd = cells[("random", m)]
                equal_m[str(m)] = {
                    "error_ratio": cells[(label, m)]["error_mean"] / rnd["error_mean"],
                    "spread_ratio": cells[(label, m)]["spread"] / rnd["spread"],
                    "p_error_vs_random": None if label == "random" else mann_whitney_p(a, b),
                }
            per[label] = {
                "matching_m": match["m"],
                "matching_bound": match["bound"],
                "reduction_factor": None if match["m"] is None else top / match["m"],
                "equal_m": equal_m,
            }
        best = min(
            labels,
            key=lambda lb: (per[lb]["matching_m"] is None, per[lb]["matching_m"] or 0.0,
                            cells[(lb, top)]["error_mean"]),
        )
        out[d] = {"target_m": top, "target_error": target, "best": best, "samplers": per}
    return out


# ---------------------------------------------------------------------------------- reports
def fmt_m(entry: dict[str, Any]) -> str:
    if entry["matching_m"] is None:
        return "not reached"
    prefix = "≤ " if entry["matching_bound"] == "≤" else ""
    return f"{prefix}{entry['matching_m']:.0f}"


def fmt_factor(entry: dict[str, Any], top: int) -> str:
    if entry["reduction_factor"] is None:
        return "< 1"
    prefix = "≥ " if entry["matching_bound"] == "≤" else ""
    return f"{prefix}{entry['reduction_factor']:.1f}×"


def cells_of(summary: list[dict], dataset: str) -> dict[tuple[str, int], dict]:
    return {(s["sampler"], s["sample_size"]): s for s in summary if s["dataset"] == dataset}


def per_size_table(cells: dict, labels: list[str], sizes: list[int], title: str,
                   cell: Callable[[dict], str], note: str | None = None) -> list[str]:
    """Markdown lines of one table: a row per sampler label, a column per m, ``cell(stats)``."""
    out = [title, "", "| sampler | " + " | ".join(f"m={m}" for m in sizes) + " |",
           "|" + " --- |" * (1 + len(sizes))]
    out += [f"| {lab} | " + " | ".join(cell(cells[(lab, m)]) for m in sizes) + " |"
            for lab in labels]
    return out + (["", note] if note else [])


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    cfg, summary, head = result["config"], result["summary"], result["headline"]
    sizes = cfg["sizes"]
    lines = [
        "# Faithfulness of subset-curvature inverse-HVPs",
        "",
        f"Class {REMOVED_CLASS} removed; pool R = the other classes' training points; "
        f"g = (1/|R|) Σ_(class {REMOVED_CLASS}) ∇l; curvature {CURVATURE}, damping "
        f"λ = {cfg['damping']}, float64. Reference v_R: CG on the full-pool GGN to a relative "
        f"residual of {REFERENCE_TOL:g} (re-measured below). Each cell: solver \"woodbury\" on "
        f"the sampler's subset T, {cfg['seeds']} seeds. error = ‖v_T − v_R‖/‖v_R‖ (mean ± std "
        "over seeds); spread = 1 − mean pairwise cosine of v_T across seeds (lower = more "
        "consistent; read it beside the error, never alone). \"+shrink\" = the same subset with "
        "`shrinkage=\"auto\"`.",
        "",
        f"Generated by `python benchmarks/faithfulness.py` at commit "
        f"{(cfg.get('git', {}).get('commit') or 'unknown')[:10]} in {cfg['wall_s'] / 60:.1f} min "
        f"({cfg['jobs']} processes × {cfg['torch_threads']} torch thread(s), {cfg['platform']}; "
        "the CPU was shared with other work, so "
        "times are indicative only).",
        "",
    ]
    for mg in cfg.get("merges", []):
        lines[-1:] = [
            f"Then re-run and merged (`--merge`): {', '.join(mg['samplers'])} on "
            f"{', '.join(mg['datasets'])}, at commit "
            f"{(mg.get('git', {}).get('commit') or 'unknown')[:10]}, "
            f"{mg['wall_s'] / 60:.1f} min.",
            "",
        ]
    for d, info in result["datasets"].items():
        ref = info["reference"]
        lines += [
            f"## {d}",
            "",
            f"{info['n_train']} training points (pool |R| = {info['pool_size']}, "
            f"{info['removed_size']} removed), model `{info['model']}`"
            + (f" (hidden {info['hidden']})" if info["hidden"] else "")
            + f", {info['num_params']:,} parameters, test accuracy "
            f"{info['test_accuracy']:.3f}. Reference: {ref['iterations']} CG iterations, "
            f"relative residual {ref['relative_residual']:.1e}, ‖v_R‖ = {ref['v_norm']:.3g}.",
            "",
        ]
        if d in head:
            h = head[d]
            top = h["target_m"]
            rnd = cells_of(summary, d)[("random", top)]
            lines += [
                f"### Headline: sample size matching random at m = {top} "
                f"(mean error {h['target_error']:.3f})",
                "",
            ]
            if h["target_error"] > 0.5:
                lines += [
                    f"**Caution:** random's estimate at m = {top} is itself poor (cosine to v_R "
                    f"{rnd['cosine_mean']:.2f}, ‖v_T‖/‖v_R‖ = {rnd['norm_ratio_mean']:.2f}), so "
                    "a reduction factor here compares poor estimates with each other; read the "
                    "error and cosine tables below.",
                    "",
                ]
            lines += [
                f"Best: **{h['best']}**. Matching m interpolates the mean error linearly in "
                "log m between grid sizes; reduction = "
                f"{top} / matching m. Ratios are sampler / random at the same m (error, spread); "
                "p: two-sided Mann–Whitney U on the per-seed errors against random.",
                "",
                "| sampler | matching m | reduction | "
                + " | ".join(f"m={m}: err ratio, spread ratio (p)" for m in sizes)
                + " |",
                "|" + " --- |" * (3 + len(sizes)),
            ]
            for label, e in h["samplers"].items():
                cells = []
                for m in sizes:
                    q = e["equal_m"][str(m)]
                    p = q["p_error_vs_random"]
                    ptxt = "" if p is None else f" ({p:.1g})"
                    cells.append(f"{q['error_ratio']:.2f}, {q['spread_ratio']:.2f}{ptxt}")
                lines.append(
                    f"| {label} | {fmt_m(e)} | {fmt_factor(e, top)} | " + " | ".join(cells) + " |"
                )
            lines.append("")
        cells = cells_of(summary, d)
        labels = list(dict.fromkeys(s["sampler"] for s in summary if s["dataset"] == d))

        lines += per_size_table(
            cells, labels, sizes, "### Error (mean ± std) and seed spread",
            lambda s: f"{s['error_mean']:.3f} ± {s['error_std']:.3f} / {s['spread']:.1e}",
            "Cells: error mean ± std / spread.")
        lines += ["", *per_size_table(
            cells, labels, sizes, "### Cosine(v_T, v_R) and length ‖v_T‖/‖v_R‖ (means over seeds)",
            lambda s: f"{s['cosine_mean']:.3f} / {s['norm_ratio_mean']:.2f}")]
        lines += ["", *per_size_table(
            cells, labels, sizes, "### Mean time per run (s): sampler / solve (fit + apply)",
            lambda s: f"{s['sample_s_mean']:.3f} / {s['solve_s_mean']:.2f}")]
        lines.append("")
    io.write_bytes_atomic(path, lambda: "\n".join(lines).encode("utf-8"))


def write_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5.6), squeeze=False)
    base = list(dict.fromkeys(r["base_sampler"] for r in result["rows"]))
    colours = {b: plt.get_cmap("tab10")(i) for i, b in enumerate(base)}
    for ax, d in zip(axes[0], names, strict=True):
        summ = [s for s in result["summary"] if s["dataset"] == d]
        for label in dict.fromkeys(s["sampler"] for s in summ):
            pts = sorted((s for s in summ if s["sampler"] == label),
                         key=lambda s: s["sample_size"])
            b = label.removesuffix(SHRINK_SUFFIX)
            shrink = label.endswith(SHRINK_SUFFIX)
            ax.errorbar(
                [s["sample_size"] * (1.03 if shrink else 1.0) for s in pts],
                [s["error_mean"] for s in pts], yerr=[s["error_std"] for s in pts],
                label=label, color=colours[b], ls="--" if shrink else "-",
                marker="s" if shrink else "o", ms=3.5, capsize=2, lw=1.2,
            )
        if d in result["headline"]:
            h = result["headline"][d]
            ax.axhline(h["target_error"], color="grey", ls=":", lw=1,
                       label=f"random @ m={h['target_m']}")
        info = result["datasets"][d]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(result["config"]["sizes"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sample size m")
        ax.set_ylabel("‖v_T − v_R‖ / ‖v_R‖")
        ax.set_title(f"{d} ({info['model']}, {info['num_params']:,} params, "
                     f"{result['config']['seeds']} seeds)")
        ax.grid(True, which="both", alpha=0.3)
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def check_merge_grid(old: dict[str, Any], grid: dict[str, Any]) -> None:
    """Refuse (SystemExit) to merge a run whose seeds, sizes or damping (``grid``) differ from
    the earlier run's."""
    base = old["config"]
    for key in ("seeds", "sizes", "damping"):
        if base[key] != grid[key]:
            raise SystemExit(f"--merge: {key} = {grid[key]} differs from the earlier run's "
                             f"{base[key]}; re-run everything instead")


def check_mergeable(old: dict[str, Any], dataset: str, info: dict[str, Any]) -> None:
    """Refuse (SystemExit) to merge a dataset whose reference solve came out different from the
    earlier run's (another model: rows of the two could not be compared). A dataset the earlier
    run lacks is added."""
    if dataset not in old["datasets"]:
        return
    a, b = info["reference"]["v_norm"], old["datasets"][dataset]["reference"]["v_norm"]
    if abs(a - b) > 1e-8 * abs(b):
        raise SystemExit(f"--merge: {dataset} reference ‖v_R‖ {a} differs from the earlier {b} "
                         "(the model trained differently here); run the samplers to compare "
                         "together into another --out instead")


def merge_into(old: dict[str, Any], config: dict[str, Any], infos: dict[str, Any],
               rows: list[dict], spreads: dict[tuple, float], labels: list[str]):
    """Replace the rows of the re-run (dataset, sampler) pairs in an earlier result ``old``.

    Keeps the earlier configuration (recording this run under ``config["merges"]``) and adds
    the datasets it lacks. The run was checked against ``old`` before its cells
    (:func:`check_merge_grid`, :func:`check_mergeable`).
    """
    base = old["config"]
    redone = {(r["dataset"], r["sampler"]) for r in rows}
    kept = [r for r in old["rows"] if (r["dataset"], r["sampler"]) not in redone]
    old_spreads = {(c["dataset"], c["sampler"], c["sample_size"]): c["spread"]
                   for c in old["summary"] if (c["dataset"], c["sampler"]) not in redone}
    old_labels = list(dict.fromkeys(r["sampler"] for r in old["rows"]))
    merged = dict(base)
    merged["datasets"] = base["datasets"] + [d for d in config["datasets"]
                                             if d not in base["datasets"]]
    merged["merges"] = [*base.get("merges", []), {
        "datasets": config["datasets"], "samplers": config["samplers"],
        "shrinkage_variants": config["shrinkage_variants"], "git": config["git"],
        "wall_s": config["wall_s"],
    }]
    infos = {**old["datasets"], **{d: i for d, i in infos.items() if d not in old["datasets"]}}
    return (merged, infos, kept + rows, {**old_spreads, **spreads},
            old_labels + [lb for lb in labels if lb not in old_labels])


def git_state() -> dict[str, Any]:
    """The repository commit and whether the library sources differ from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "library_modified": None}
    return {"commit": head, "library_modified": bool(dirty)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    out = Path(args.out)
    if args.replot:
        result = io.read_json(out / "faithfulness.json")
        write_markdown(out / "faithfulness.md", result)
        write_plot(out / "faithfulness.png", result)
        print(f"rewrote {out / 'faithfulness.md'} and .png")
        return result
    init_worker(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    git = git_state()  # at the start: the code the workers import
    started = time.perf_counter()
    variants = [False] if args.no_shrink else [False, True]
    labels = [s + (SHRINK_SUFFIX if v else "") for s in args.samplers for v in variants]
    earlier = io.read_json(out / "faithfulness.json") if args.merge else None
    if earlier is not None:  # before any cell runs, not after them all
        check_merge_grid(earlier, {"seeds": args.seeds, "sizes": args.sizes,
                                   "damping": args.damping})
    rows: list[dict] = []
    spreads: dict[tuple, float] = {}
    infos: dict[str, Any] = {}
    executor = None
    if args.jobs > 1:
        executor = ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(args.threads,),
        )
    try:
        for name in args.datasets:
            prep = prepare(name, args)
            infos[name] = prep["info"]
            if earlier is not None:  # before the cells, not after them
                check_mergeable(earlier, name, prep["info"])
            ref = prep["info"]["reference"]
            tqdm.write(
                f"{name}: {prep['info']['num_params']:,} params, test acc "
                f"{prep['info']['test_accuracy']:.3f}, |R| = {prep['info']['pool_size']}, "
                f"reference: {ref['iterations']} CG iterations, residual "
                f"{ref['relative_residual']:.1e}, {ref['time_s']:.0f} s"
            )
            _LOADED[name] = prep
            tasks = [
                {"dataset": name, "sampler": s, "shrink": v, "m": m, "seeds": args.seeds,
                 "damping": args.damping, "cache_dir": args.cache_dir, "quick": args.quick,
                 "g": prep["g"], "v_ref": prep["v_ref"]}
                for m in sorted(args.sizes, reverse=True)  # the costly cells first
                for s in args.samplers for v in variants
            ]
            bar = tqdm(total=len(tasks) * args.seeds, desc=name, unit="run", dynamic_ncols=True)
            if executor is None:
                done = (run_cell(t) for t in tasks)
            else:
                futures = [executor.submit(run_cell, t) for t in tasks]
                done = (f.result() for f in as_completed(futures))
            for cell_rows, spread in done:
                rows.extend(cell_rows)
                r = cell_rows[0]
                spreads[(name, r["sampler"], r["sample_size"])] = spread
                bar.update(len(cell_rows))
            bar.close()
            _LOADED.pop(name, None)
    finally:
        if executor is not None:
            executor.shutdown()
    config = {
        "benchmark": "faithfulness",
        "removed_class": REMOVED_CLASS,
        "curvature": CURVATURE,
        "damping": args.damping,
        "solver": "woodbury",
        "reference_solver": {"name": "cg", "tol": REFERENCE_TOL},
        "seeds": args.seeds,
        "sizes": args.sizes,
        "datasets": args.datasets,
        "samplers": args.samplers,
        "shrinkage_variants": ["0", "auto"][: len(variants)],
        "quick": args.quick,
        "dtype": "float64",
        "torch_threads": args.threads,
        "jobs": args.jobs,
        "platform": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "versions": {"repif": repif.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "git": git,
        "wall_s": time.perf_counter() - started,
    }
    if earlier is not None:
        config, infos, rows, spreads, labels = merge_into(
            earlier, config, infos, rows, spreads, labels
        )
    order = {lb: i for i, lb in enumerate(labels)}
    rows.sort(key=lambda r: (config["datasets"].index(r["dataset"]), order[r["sampler"]],
                             r["sample_size"], r["seed"]))
    summary = summarise(rows, spreads)
    result = {
        "config": config,
        "datasets": infos,
        "headline": headline(summary, rows, config["datasets"], config["sizes"]),
        "summary": summary,
        "rows": rows,
    }
    io.write_json_atomic(out / "faithfulness.json", result)
    write_markdown(out / "faithfulness.md", result)
    write_plot(out / "faithfulness.png", result)
    print(f"wrote {out / 'faithfulness.json'}, .md and .png "
          f"in {(time.perf_counter() - started) / 60:.1f} min")
    for d, h in result["headline"].items():
        e = h["samplers"][h["best"]]
        print(f"{d}: best {h['best']}: matches random@{h['target_m']} "
              f"(error {h['target_error']:.3f}) at m {fmt_m(e)} "
              f"({fmt_factor(e, h['target_m'])})")
    return result


if __name__ == "__main__":
    main()
