"""The class-removal study at the size the published claim was made: ResNet-18 on full MNIST.

    python benchmarks/study_resnet18.py cpu  --data-dir DIR     # width 16, the grid this CPU runs
    python benchmarks/study_resnet18.py cuda --data-dir DIR     # full width (11.2M), full grid
    python benchmarks/study_resnet18.py cpu-full --data-dir DIR # full width, one cell per point
    python benchmarks/study_resnet18.py cpu  --summarise        # only rewrite the summary

Each profile is one ``repif class-removal`` run (printed before it starts; it resumes after an
interrupt) into ``benchmarks/results/study-mnist-resnet18[-cuda]/`` (results.json, report.html,
plots; the trained models and estimates are not committed). The summary beside the published
figures goes to ``benchmarks/results/study-mnist-resnet18[-cuda].md`` after every run.

Set-up shared by both profiles (docs/design.md, "Protocol"): the 60,000 training images less a
stratified 10% validation split on which the step size η is picked (the literature picked it on
the test F1), the 10,000 test images, classes 0 and 3 removed in turn; Adam (lr 1e-3, batch 128,
weight decay 5e-4 as L2 in the loss, which the curvature includes), float32; K-FAC fitted on the
sampled subset with the sampler's weights (one sampled label per point; BatchNorm's parameters
left unchanged by the update), inverted in its eigenbasis. The full-pool reference is the same
K-FAC on every remaining point (so the inverse-HVP error measures sampling alone); the retrain
reference trains from scratch on the remaining points with the same recipe.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"

#: The published claim (class removal, smart sampler against random).
PUBLISHED = {"time_saved": 0.301, "memory_saved": 0.422, "f1_gain": 0.025}

#: Arguments every profile shares (see the module doc for the reasons).
COMMON = [
    "--dataset", "mnist", "--model", "resnet18", "--batch-size", "128", "--lr", "1e-3",
    "--weight-decay", "5e-4", "--dtype", "float32", "--curvature", "kfac", "--solver", "eigen",
    "--fisher", "sampled", "--other-layers", "frozen", "--damping", "0.01",
]

#: The samplers of the time claim: random, the best smart samplers with their pass over the
#: whole pool (charged to every cell), and the same two-phase (their own pass over 8·m uniform
#: candidates, inside the cell's time).
CLAIM_SAMPLERS = ("random,logit-importance,logit-importance+cand8,logit-stratified+cand8,"
                  "feature-kmeans+cand8")

#: cpu-full-claim: the time claim at full width, every cost charged: random against the two
#: logit samplers on their cheap route (a pass over 8·m uniform candidates), two seeds, float32
#: eigendecompositions, m = 64 and 256 (random's m = 1,024 cell of seed 0 is kept in
#: results.json; the rest of m = 1,024 was cut for time). The references are cpu-full's (their
#: full-pool solve alone took 90 minutes here): the same model (same recipe, seed and validation
#: split) and its η.
FULL_CLAIM_SAMPLERS = "random,logit-importance+cand8,logit-stratified+cand8"
#: η that cpu-full's full-pool reference picked on the validation split (its results.json).
FULL_SCALE = "0.01"

#: Every registered sampler, unless a profile names its own.
ALL_SAMPLERS = "random,stratified,feature-kmeans,feature-herding,logit-stratified,logit-importance"

#: cpu: width 16 (701k parameters), 2 epochs, three sizes and three seeds — what a 2-core CPU
#: runs in about an hour and a half per removed class; cpu-full: the full-width model (11.2M)
#: with its references and one cell per sampler and size (class 0, one seed, one epoch — about
#: two hours on 2 cores, where one full-width epoch takes ≈ 12 minutes); cuda: the full-width
#: model and the full grid; cpu-reduce: the cpu profile's class 0 with K-FAC-reduce, for random
#: and logit-importance (to set beside the cpu profile's K-FAC-expand cells).
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"out": "study-mnist-resnet18",
            "args": ["--width", "16", "--epochs", "2", "--sizes", "32,64,128,256,1024",
                     "--seeds", "3", "--remove", "0,3", "--device", "cpu", "--threads", "1",
                     "--samplers", CLAIM_SAMPLERS]},
    "cpu-full": {"out": "study-mnist-resnet18-full",
                 "args": ["--width", "64", "--epochs", "1", "--sizes", "64,256,1024",
                          "--seeds", "1", "--remove", "0", "--device", "cpu", "--threads", "2"]},
    "cpu-reduce": {"out": "study-mnist-resnet18-reduce",
                   "args": ["--width", "16", "--epochs", "2", "--sizes", "64,256,1024",
                            "--seeds", "3", "--remove", "0", "--device", "cpu", "--threads", "1",
                            "--samplers", "random,logit-importance", "--weight-sharing",
                            "reduce"]},
    "cpu-full-claim": {"out": "study-mnist-resnet18-full-claim",
                       "args": ["--width", "64", "--epochs", "1", "--sizes", "64,256",
                                "--seeds", "2", "--remove", "0", "--device", "cpu",
                                "--threads", "2", "--samplers", FULL_CLAIM_SAMPLERS,
                                "--references", "none", "--scale", FULL_SCALE,
                                "--eigh-dtype", "float32"]},
    "cuda": {"out": "study-mnist-resnet18-cuda",
             "args": ["--width", "64", "--epochs", "5", "--sizes", "64,128,256,512,1024,2048,4096",
                      "--seeds", "5", "--remove", "0,3", "--device", "cuda"]},
}


def command(profile: str, data_dir: str) -> list[str]:
    p = PROFILES[profile]
    samplers = [] if "--samplers" in p["args"] else ["--samplers", ALL_SAMPLERS]
    return [sys.executable, "-m", "repif", "class-removal", *COMMON, *samplers, *p["args"],
            "--data-dir", data_dir, "--out", str(RESULTS / p["out"])]


def _pct(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    """Three decimals, or a dash where there is no value (e.g. a seed spread of one seed)."""
    return "—" if v is None or math.isnan(v) else f"{v:.3f}"


def _num_params(results: dict[str, Any]) -> int:
    """The model's trainable parameters: as the finished run records them, or (a run still
    going) counted on the same architecture for MNIST's 1×28×28 inputs and 10 classes."""
    if "num_params" in results:
        return int(results["num_params"])
    from types import SimpleNamespace

    from repif import models

    mnist = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10)
    cfg = results["config"]
    return models.num_parameters(models.build(cfg["model"], mnist, width=cfg["width"]))


def summarise(profile: str) -> Path:
    """Rewrite ``<out>.md`` (and ``<out>/report.html`` with its plots) from
    ``<out>/results.json``: the table with both F1s, the references, the headline against random
    beside the published figures, update ÷ retrain, and F1 against total time (a plot)."""
    from repif import io
    from repif.studies.class_removal.config import StudyConfig
    from repif.studies.class_removal.report import F1_TIME_PNG, write_report
    from repif.studies.class_removal.study import Study, StudyError
    from repif.studies.class_removal.summary import (
        aggregate,
        conclusions,
        headline,
        references,
        update_cost,
    )

    out = RESULTS / PROFILES[profile]["out"]
    results = io.read_json(out / "results.json")
    cfg = results["config"]  # the last run's grid, as the command reports it (cells of a larger
    results["cells"] = [c for c in results["cells"]  # earlier grid stay in results.json)
                        if c["sample_size"] in cfg["sizes"] and c["seed"] < cfg["seeds"]
                        and c["sampler"] in cfg["samplers"]]
    study = Study(StudyConfig.from_dict(results["config"]), out, progress=False)

    def vectors(cls: int, spec: str, m: int) -> list:
        try:
            return study.vectors(cls, spec, m)
        except StudyError:  # a seed not run yet (or its estimate not kept): no spread
            return []

    rows = aggregate(results, vectors)
    refs = references(results)
    head = headline(rows)
    cost = update_cost(rows, refs)
    write_report(results, rows, refs, head, out)  # the HTML report and its plots, F1 vs time
    cfg = results["config"]
    points = {(c["removed_class"], c["sampler"], c["sample_size"]) for c in results["cells"]}
    # the same cells with the logit/feature pass left out of their time ("pass shared")
    shared = dict(results, cells=[dict(c, time_s=c["time_s"] - c.get("pool_pass_s", 0.0))
                                  for c in results["cells"]])
    rows_shared = aggregate(shared)
    time_shared = {(r["sampler"], r["sample_size"]): r["time_s"] for r in rows_shared}
    lines = [
        f"# Class removal on MNIST with ResNet-18 ({profile})", "",
        f"Reproduce: `python benchmarks/study_resnet18.py {profile} --data-dir DIR`, which runs "
        "`" + " ".join(["python", *command(profile, "DIR")[1:]]).replace(
            str(RESULTS), "benchmarks/results") + "`", "",
        f"{_num_params(results):,} parameters (width {cfg['width']}); removed classes "
        f"{sorted({c['removed_class'] for c in results['cells']})} of {cfg['remove']}; "
        f"{len(results['cells'])} cells over {len(points)} (class, sampler, m) points; "
        f"curvature {cfg['curvature']} ({cfg.get('fisher') or 'exact'} output Hessian), "
        f"damping {cfg['damping']}, solver {cfg['solver']}, η picked on the validation split. "
        "Mean ± std over removed classes and seeds. F1 = forget vs consistency with the original "
        "model; F1 lit. = forget vs accuracy on the other classes (the literature's). Time and "
        "memory: one update (sampling, with the logit/feature pass charged in full to the "
        "samplers that read it, the curvature fit, the solve and the step); 'pass shared' leaves "
        "that pass out, as when one pass serves many removals or queries. Memory is RSS growth "
        "(CPU) or allocated-memory growth (CUDA); every estimator used the default budget (a "
        "quarter of the free memory), which its chunks fill, so it says more about the budget "
        "than about need.", "",
        "| sampler | m | n | F1 | F1 lit. | forget | consistency | inverse-HVP rel. error | "
        "seed spread | time s | time s, pass shared | peak MB |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['sample_size']} | {r['n']} | {r['f1']:.3f} ± "
            f"{r['f1_std']:.3f} | {r['f1_literature']:.3f} | {r['forget']:.3f} | "
            f"{r['consistency']:.3f} | {r['ihvp_rel_error']:.3f} ± {r['ihvp_rel_error_std']:.3f}"
            f" | {_num(r.get('seed_spread'))} | {r['time_s']:.1f} | "
            f"{time_shared[r['sampler'], r['sample_size']]:.1f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} |")
    for kind, r in refs.items():
        name = {"full": f"reference: {cfg['curvature']} on the whole pool",
                "retrain": "reference: retrain"}
        lines.append(f"| {name.get(kind, kind)} | | | {r['f1']:.3f} | {r['f1_literature']:.3f} "
                     f"| {r['forget']:.3f} | {r['consistency']:.3f} | | | {r['time_s']:.1f} | | "
                     f"{r['peak_mem_bytes'] / 2**20:.0f} |")
    lines += ["", "## Against random, beside the published claim", ""]
    lines += [f"* {s}" for s in conclusions(head, cost)]
    head_shared = headline(rows_shared)
    if head_shared:
        said = conclusions(head_shared)  # time, memory, F1, faithfulness: F1 does not change
        lines += ["", "With the logit/feature pass shared (left out of every cell's time):", ""]
        lines += [f"* {s}" for s in (said[0], said[3])]
    if head:
        best_t = max((v["time_saved"] for v in head["match"].values()), default=float("nan"))
        best_m = max((v["memory_saved"] for v in head["match"].values()), default=float("nan"))
        best_g = max((v["mean_f1_gain"] for v in head["gain"].values()), default=float("nan"))
        lines += ["", "| | best smart sampler here | published |", "| --- | ---: | ---: |",
                  f"| time saved at random's best F1 | {_pct(best_t)} | "
                  f"{_pct(PUBLISHED['time_saved'])} |",
                  f"| memory saved at random's best F1 | {_pct(best_m)} | "
                  f"{_pct(PUBLISHED['memory_saved'])} |",
                  f"| F1 gain at equal m (random below its plateau) | "
                  f"{'—' if math.isnan(best_g) else f'{100 * best_g:+.1f} points'} | "
                  f"+{100 * PUBLISHED['f1_gain']:.1f} points |"]
    if (out / F1_TIME_PNG).exists():
        lines += ["", "F1 against the whole time of an update (each point labelled with m):", "",
                  f"![F1 against time]({out.name}/{F1_TIME_PNG})"]
    path = out.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", choices=sorted(PROFILES))
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", "data/mnist"))
    p.add_argument("--summarise", action="store_true", help="only rewrite the summary")
    args = p.parse_args()
    if not args.summarise:
        cmd = command(args.profile, args.data_dir)
        print(" ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    print(summarise(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
