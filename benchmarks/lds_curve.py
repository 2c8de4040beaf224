"""LDS against the curvature sample size m: one curve per (estimator, sampler), beside exact,
whole-pool K-FAC/EK-FAC, the first-N-points convention and grad-dot.

    python benchmarks/lds_curve.py lr     # reads benchmarks/results/lds-mnist-lr/results.json
    python benchmarks/lds_curve.py mlp
    python benchmarks/lds_curve.py cnn    # reads benchmarks/results/lds-fashion-cnn/results.json

It reads the cells that ``benchmarks/lds.py`` wrote (run those first: the commands are in
``CURVES`` below and in the written .md), and writes ``benchmarks/results/lds-curve-<model>.png``,
``.md`` and ``.json``. Each point is the mean LDS over curvature-sample seeds at the damping
with the best mean for that (method, m) among those tried (chosen on the test points, as dattri
and ``benchmarks/lds.py`` do; among the dampings run with at least ``MIN_SEEDS`` seeds where
any were); error bars are the standard error over seeds (sd/√seeds). A
deterministic sampler (``first``) has one seed and no bar.

Held-out λ: the same numbers with the damping chosen without the points it is scored on. The
test points are split into two seeded halves; λ is picked on one half and the LDS read on the
other, both ways round, and the two readings averaged (2-fold cross-validation over the
queries, from the per-test-point LDS the cells store; no retraining). Where a row tried one
damping only, both choices agree.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repif import io  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Per model: its run directory under benchmarks/results, the pool size (the training points the
#: curvature is sampled from: dattri's first 5,000 MNIST images; the first 2,000 Fashion-MNIST
#: images for the CNN) and the name the page and plot show.
MODELS = {"lr": ("lds-mnist-lr", 5000, "MNIST-LR"), "mlp": ("lds-mnist-mlp", 5000, "MNIST-MLP"),
          "cnn": ("lds-fashion-cnn", 2000, "Fashion-MNIST CNN")}

#: Commands that fill each curve (run with one torch thread; each resumes the run directory).
BLEND = "ggn:woodbury+prior=ekfac+prior_mode=blend+prior_weight=0.8"
#: EK-FAC with its eigenbasis fitted on the whole pool and its eigenvalues on the subset.
BASIS = "ekfac+basis_size=pool:eigen"
#: The subset GGN blended with that EK-FAC (fitted on the subset, eigenbasis from the pool).
SUBSET_PRIOR = ("ggn+basis_size=pool:woodbury+prior=ekfac+prior_mode=blend+prior_weight=0.8"
                "+prior_points=subset")
CURVES = {
    "lr": [
        f"python benchmarks/lds.py lr --methods {BLEND}@random,{BLEND}@logit-importance "
        "--sizes 50,100,250,500 --seeds 5 --dampings 0.03   # stopped after m = 250",
        f"python benchmarks/lds.py lr --methods {BLEND}@random,{BLEND}@logit-importance "
        "--sizes 500 --seeds 3 --dampings 0.03   # m = 500: 3 seeds (time)",
        "python benchmarks/lds.py lr --methods ekfac:eigen@first --sizes 50,100,250,500,1000 "
        "--seeds 1 --dampings 0.03",
        "python benchmarks/lds.py lr --methods ggn:woodbury@first --sizes 50,100,250,500 "
        "--seeds 1 --dampings 0.1",
        f"python benchmarks/lds.py lr --methods {BLEND}@first --sizes 50,100,250,500 --seeds 1 "
        "--dampings 0.03",
        "python benchmarks/lds.py lr --methods ggn:woodbury+prior=ekfac+prior_mode=blend+"
        "prior_weight=0.5@logit-importance --sizes 500 --seeds 3 --dampings 0.03",
        "python benchmarks/lds.py lr --methods ggn:woodbury@logit-importance+proxy=gini-feature "
        "--sizes 50,100,250,500 --seeds 5 --dampings 0.01,0.1",
        "python benchmarks/lds.py lr --methods ggn:woodbury@logit-importance+proxy=leverage,"
        "ggn:woodbury@logit-importance+proxy=leverage+ridge=0.1 --sizes 50,100 --seeds 5 "
        "--dampings 0.01,0.1   # two torch threads",
        f"python benchmarks/lds.py lr --methods {BLEND}@logit-importance+proxy=leverage "
        "--sizes 50,100,250,500 --seeds 5 --dampings 0.03   # two torch threads",
        "python benchmarks/lds.py lr --methods ggn:woodbury+prior=ekfac+prior_mode=blend+"
        "prior_weight=0.3@logit-importance,ggn:woodbury+prior=ekfac+prior_mode=blend+"
        "prior_weight=0.3@logit-importance+proxy=leverage --sizes 500 --seeds 3 "
        "--dampings 0.01,0.03",
        f"python benchmarks/lds.py lr --methods {BASIS}@logit-importance,{BASIS}@random "
        "--sizes 50,100,250,500 --seeds 5 --dampings 0.01,0.03,0.1",
        f"python benchmarks/lds.py lr --methods {SUBSET_PRIOR}@logit-importance,"
        f"{SUBSET_PRIOR}@random --sizes 50,100,250,500 --seeds 5 --dampings 0.01,0.03",
        "(the plain ggn:woodbury@random / @logit-importance cells and the whole-pool rows: the "
        "commands of lds-mnist-lr.md)",
    ],
    "mlp": [
        f"python benchmarks/lds.py mlp --methods {BLEND}@logit-importance,{BLEND}@random "
        "--sizes 250 --seeds 1 --dampings 0.001",
        f"python benchmarks/lds.py mlp --methods {BLEND}@logit-importance --sizes 500 --seeds 1 "
        "--dampings 0.001",
        f"python benchmarks/lds.py mlp --methods {BLEND}@logit-importance --sizes 250 --seeds 1 "
        "--dampings 0.0001,0.01   # stopped after λ = 0.0001",
        f"python benchmarks/lds.py mlp --methods {BLEND}@logit-importance --sizes 500 --seeds 3 "
        "--dampings 0.001",
        "python benchmarks/lds.py mlp --methods ggn:woodbury@random,ggn:woodbury@logit-importance"
        " --sizes 50,100,250,500 --seeds 5 --dampings 0.001,0.01   # stopped during m = 250 "
        "(seeds 2–4 of m = 50, 100 and seed 2 of m = 250 added, against a ground truth retrained "
        "on another machine: its noise row reads 0.578, as before)",
        "python benchmarks/lds.py mlp --methods ggn:woodbury@random,ggn:woodbury@logit-importance"
        " --sizes 500 --seeds 3 --dampings 0.001,0.01",
        f"python benchmarks/lds.py mlp --methods {BASIS}@logit-importance,{BASIS}@random "
        "--sizes 50,100,250,500 --seeds 3 --dampings 0.00001,0.0001,0.001",
        f"python benchmarks/lds.py mlp --methods {SUBSET_PRIOR}@logit-importance,"
        f"{SUBSET_PRIOR}@random --sizes 50,100,250,500 --seeds 3 --dampings 0.001",
        "(the other rows: the commands of lds-mnist-mlp.md)",
    ],
    "cnn": [
        "python benchmarks/lds.py cnn",
        f"python benchmarks/lds.py cnn --methods {BASIS}@logit-importance,{BASIS}@random "
        "--sizes 20,40,100,200 --seeds 5 --dampings 0.01,0.1",
        f"python benchmarks/lds.py cnn --methods {SUBSET_PRIOR}@logit-importance,"
        f"{SUBSET_PRIOR}@random --sizes 20,40,100,200 --seeds 5 --dampings 0.1",
    ],
}

#: Seeds a row needs to count in the sampler comparison (a standard error over fewer is noise).
MIN_SEEDS = 3
#: The curves drawn: (estimator, sampler); the table lists every measured row.
PLOTTED = [("ggn:woodbury", "random"), ("ggn:woodbury", "logit-importance"),
           ("ggn:woodbury", "first"), (BLEND, "random"), (BLEND, "logit-importance"),
           (BLEND, "first"), ("ekfac:eigen", "first"),
           (BLEND.replace("0.8", "0.5"), "logit-importance"), (BASIS, "random"),
           (BASIS, "logit-importance"), (SUBSET_PRIOR, "random"),
           (SUBSET_PRIOR, "logit-importance")]
#: Short names in the plot's legend.
LABELS = {"ggn:woodbury": "subset GGN (woodbury)",
          BLEND: "subset GGN + 0.8·EK-FAC(pool) (woodbury prior, blend)",
          BLEND.replace("0.8", "0.5"): "subset GGN + 0.5·EK-FAC(pool)",
          "ekfac:eigen": "EK-FAC on the subset",
          BASIS: "EK-FAC, eigenbasis from the pool, eigenvalues from the subset",
          SUBSET_PRIOR: "subset GGN + 0.8·that EK-FAC (woodbury, prior_points=subset)"}
#: Whole-pool reference lines (method names as the LDS benchmark writes them).
REFERENCES = ["ggn:direct", "kfac:eigen", "ekfac:eigen", "grad-dot"]
#: Samplers that use no model statistics (the baselines a smart sampler must beat).
BASELINE_SAMPLERS = ("random", "first")


#: Seed of the split of the test points into two halves for the held-out choice of λ.
SPLIT_SEED = 0


def _half_mean(per_test: list, idx: list[int]) -> float:
    vals = [per_test[i] for i in idx if per_test[i] is not None and math.isfinite(per_test[i])]
    return fmean(vals) if vals else float("nan")


def held_out(by_d: dict[float, list[tuple[int, list]]], n_test: int) -> dict:
    """LDS with λ chosen on one half of the test points and read on the other, both ways
    (module doc): mean, standard error over seeds and the two dampings chosen."""
    perm = random.Random(SPLIT_SEED).sample(range(n_test), n_test)
    halves = (perm[: n_test // 2], perm[n_test // 2:])

    def score(d: float, h: int) -> float:
        return fmean(_half_mean(pt, halves[h]) for _, pt in by_d[d])

    chosen = [max(by_d, key=lambda d, h=h: score(d, h)) for h in (0, 1)]
    # per seed: (read on half 1 at the λ chosen on half 0 + read on half 0 at half 1's λ) / 2
    at = [{seed: _half_mean(pt, halves[1 - h]) for seed, pt in by_d[chosen[h]]} for h in (0, 1)]
    seeds = sorted(set(at[0]) & set(at[1]))
    vals = [(at[0][s] + at[1][s]) / 2 for s in seeds]
    se = stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return {"mean": fmean(vals), "se": se, "seeds": len(vals),
            "dampings": [f"{d:g}" for d in chosen]}


def _split(method: str) -> tuple[str, str | None]:
    body, at, sampler = method.partition("@")
    return body, (sampler if at else None)


def curves(results: dict) -> tuple[dict, dict]:
    """(curves, references): curves[estimator][sampler][m] = {mean, se, seeds, damping};
    references[method] = {score, se, damping} at its best damping."""
    cells: dict[tuple[str, int], dict[float, list[float]]] = defaultdict(lambda: defaultdict(
        list))
    per_test: dict[tuple[str, int], dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for c in results["cells"]:
        if c["score"] is not None and math.isfinite(c["score"]):
            key, d = (c["method"], c["sample_size"]), float(c["damping"])
            cells[key][d].append(c["score"])
            per_test[key][d].append((c["seed"], c["per_test"]))
    out: dict = defaultdict(lambda: defaultdict(dict))
    refs: dict = {}
    for (method, m), by_d in cells.items():
        # the best mean among dampings run with ≥ MIN_SEEDS seeds where there are any (a mean
        # over fewer is noise), else among all
        enough = [d for d in by_d if len(by_d[d]) >= MIN_SEEDS] or list(by_d)
        best = max(enough, key=lambda d: fmean(by_d[d]))
        vals = by_d[best]
        se = stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
        entry = {"mean": fmean(vals), "se": se, "seeds": len(vals), "damping": best,
                 "by_damping": {f"{d:g}": fmean(v) for d, v in sorted(by_d.items())},
                 "held_out": held_out(per_test[(method, m)],
                                      len(per_test[(method, m)][best][0][1]))}
        est, sampler = _split(method)
        if sampler is None:
            if m == 0:
                refs[method] = entry
            continue
        out[est][sampler][m] = entry
    return out, refs


def goals(name: str, cur: dict, refs: dict, pool: int) -> list[str]:
    """The issue's goals, checked on the measured numbers (``pool``: the pool's size)."""
    lines = []
    tenth = pool // 10
    exact = refs.get("ggn:direct", {}).get("mean")
    if exact is not None:
        best = []
        for est, by_s in cur.items():
            for sampler, pts in by_s.items():
                for m, e in pts.items():
                    if m <= tenth:
                        best.append((exact - e["mean"], est, sampler, m, e["mean"]))
        if best:
            gap, est, sampler, m, v = min(best)
            met = "met" if gap <= 0.01 else "missed"
            lines.append(f"- Within 0.01 LDS of exact ({exact:.3f}) at m ≤ {tenth} (10% of the "
                         f"pool): {met}; closest {est}@{sampler} m = {m}: {v:.3f} (gap "
                         f"{gap:.3f}).")
    for est, by_s in sorted(cur.items()):
        if "random" not in by_s:
            continue
        smart = [s for s in by_s if s not in BASELINE_SAMPLERS]
        if by_s["random"] and max(e["seeds"] for e in by_s["random"].values()) < MIN_SEEDS:
            continue
        if not smart:
            continue
        verdicts = []
        all_ok = True
        for m in sorted(by_s["random"]):
            r = by_s["random"][m]
            if m > tenth or r["seeds"] < MIN_SEEDS:
                continue
            cands = [(by_s[s][m]["mean"], s) for s in smart
                     if m in by_s[s] and by_s[s][m]["seeds"] >= MIN_SEEDS]
            if not cands:
                continue
            v, s = max(cands)
            e = by_s[s][m]
            se = math.sqrt(r["se"] ** 2 + e["se"] ** 2)
            ok = v - r["mean"] > se
            all_ok &= ok
            verdicts.append(f"m = {m}: {s} {v:.3f} vs random {r['mean']:.3f} (diff "
                            f"{v - r['mean']:+.3f}, SE {se:.3f}{'' if ok else ', not > 1 SE'})")
        if verdicts:
            lines.append(f"- {est}: best smart sampler beats random by > 1 SE at every m ≤ "
                         f"{tenth}: {'met' if all_ok else 'missed'} — " + "; ".join(verdicts)
                         + ".")
    if name == "mlp":
        top = max(((e["mean"], est, s, m) for est, by_s in cur.items()
                   for s, pts in by_s.items() for m, e in pts.items() if m <= tenth),
                  default=None)
        if top:
            v, est, s, m = top
            lines.append(f"- MNIST-MLP ≥ 0.332 (TRAK-10) from ≤ 10% of the pool: "
                         f"{'met' if v >= 0.332 else 'missed'}; best {est}@{s} m = {m}: "
                         f"{v:.3f}.")
    return lines


def plot(name: str, cur: dict, refs: dict, path: Path, pool: int, title: str) -> None:
    fig, ax = plt.subplots(figsize=(12.5, 5.2))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a dozen curves: ten colours repeat
    styles = {"ggn:woodbury": "--", BLEND: "-", "ekfac:eigen": ":"}
    markers = {"random": "o", "logit-importance": "s", "first": "x"}
    for est, by_s in sorted(cur.items()):
        for sampler, pts in sorted(by_s.items()):
            if (est, sampler) not in PLOTTED:
                continue
            ms = sorted(pts)
            x = [100 * m / pool for m in ms]
            y = [pts[m]["mean"] for m in ms]
            err = [pts[m]["se"] for m in ms]
            ax.errorbar(x, y, yerr=err, capsize=3, linestyle=styles.get(est, "-."),
                        marker=markers.get(sampler, "^"),
                        label=f"{LABELS.get(est, est)} @ {sampler}")
    colors = {"ggn:direct": "black", "kfac:eigen": "tab:gray", "ekfac:eigen": "tab:brown",
              "grad-dot": "tab:olive"}
    for ref in REFERENCES:
        if ref in refs:
            ax.axhline(refs[ref]["mean"], color=colors[ref], linestyle="--", linewidth=1,
                       label=f"{ref} (whole pool) {refs[ref]['mean']:.3f}")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20])
    ax.set_xticklabels(["1%", "2%", "5%", "10%", "20%"])
    ax.set_xlabel(f"curvature sample m (% of the {pool:,}-point pool)")
    ax.set_ylabel("LDS (mean over seeds ± SE)")
    ax.set_title(f"{title}: LDS against retraining vs curvature sample size")
    ax.grid(alpha=0.3)
    # beside the axes: with a dozen curves and the whole-pool lines, inside it hides some
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def held_out_summary(cur: dict, refs: dict) -> list[str]:
    """How much choosing λ on the test points moved the numbers: the largest change, and every
    entry whose two held-out choices differ from the test-tuned one."""
    entries = [(f"{est}@{s} m = {m}", e) for est, by_s in cur.items()
               for s, pts in by_s.items() for m, e in pts.items()]
    entries += [(ref, e) for ref, e in refs.items()]
    diffs = [(e["mean"] - e["held_out"]["mean"], name, e) for name, e in entries]
    worst = max(diffs, key=lambda t: abs(t[0]))
    lines = [f"- Largest change against the test-tuned λ: {worst[0]:+.4f} ({worst[1]}: "
             f"{worst[2]['mean']:.3f} → {worst[2]['held_out']['mean']:.3f}); over "
             f"{len(entries)} entries, {sum(len(e['by_damping']) > 1 for _, e in entries)} of "
             "them with more than one damping tried."]
    moved = [f"{name} (λ {e['damping']:g} → {' / '.join(e['held_out']['dampings'])}: "
             f"{e['held_out']['mean']:.3f})" for _, name, e in sorted(diffs, key=lambda t: t[1])
             if any(float(d) != e["damping"] for d in e["held_out"]["dampings"])]
    if moved:
        lines.append("- Entries whose held-out λ differs: " + "; ".join(moved) + ".")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    args = p.parse_args(argv)
    run_dir, pool, title = MODELS[args.model]
    results = io.read_json(RESULTS / run_dir / "results.json")
    cur, refs = curves(results)
    stem = RESULTS / f"lds-curve-{args.model}"
    plot(args.model, cur, refs, stem.with_suffix(".png"), pool, title)
    checks = goals(args.model, cur, refs, pool)
    io.write_json_atomic(stem.with_suffix(".json"), {
        "model": args.model, "pool": pool, "commands": CURVES[args.model],
        "curves": cur, "references": refs, "goals": checks,
        "ground_truth": results.get("ground_truth"), "environment": results.get("environment")})
    recipe = ("dattri's recipe" if args.model in ("lr", "mlp") else "the setting's recipe")
    lines = [f"# LDS against curvature sample size, {title}", "",
             f"![LDS vs m](lds-curve-{args.model}.png)", "",
             "Reproduce (one torch thread; each command resumes "
             f"`benchmarks/results/{run_dir}/`), then "
             f"`python benchmarks/lds_curve.py {args.model}`:", "",
             *(f"    {c}" for c in CURVES[args.model]), "",
             "Mean LDS over curvature-sample seeds at the best damping per (method, m) among "
             "those tried (chosen on the test points, as dattri does); ± is the standard error "
             "over seeds. The ground truth: 50 random halves of the pool retrained once each "
             f"({recipe}, see `{run_dir}.md`).", "",
             "| estimator | sampler | " + " | ".join(f"{p}%" for p in (1, 2, 5, 10, 20))
             + " |", "| --- | --- |" + " ---: |" * 5]
    for est, by_s in sorted(cur.items()):
        for sampler, pts in sorted(by_s.items()):
            cells = []
            for pct in (1, 2, 5, 10, 20):
                e = pts.get(pool * pct // 100)
                if e is None:
                    cells.append("")
                elif e["seeds"] == 1:
                    cells.append(f"{e['mean']:.3f} (1 seed; λ {e['damping']:g})")
                else:
                    cells.append(f"{e['mean']:.3f} ± {e['se']:.3f} ({e['seeds']}; "
                                 f"λ {e['damping']:g})")
            lines.append(f"| {est} | {sampler} | " + " | ".join(cells) + " |")
    lines += ["", "Whole-pool references:", ""]
    for ref in REFERENCES:
        if ref in refs:
            lines.append(f"- {ref}: {refs[ref]['mean']:.3f} (λ {refs[ref]['damping']:g})")
    lines += ["", "Held-out λ (module doc: chosen on one half of the test points, read on the "
              "other, both ways):", "", *held_out_summary(cur, refs)]
    lines += ["", "Goals (issue: sampled curvature at ground truth):", "", *checks]
    io.write_bytes_atomic(stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
