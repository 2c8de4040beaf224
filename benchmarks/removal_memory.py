"""One class removal of the ResNet-18 study under several memory budgets: time and peak memory.

    python benchmarks/removal_memory.py --data-dir DIR [--budgets 256MiB,1GiB,default]

Uses the model the ResNet-18 study (``benchmarks/study_resnet18.py cpu``) trained and cached, and
its settings (K-FAC, sampled output Hessian, BatchNorm frozen, damping 0.01, the η it picked for
class 0). Each budget runs in a fresh process: the logit/feature pass over the remaining
training points, a logit-importance draw of m = 1,024, the K-FAC fit and the update, measured as
the study measures a cell (wall time; RSS growth sampled every 2 ms). The cells of the study all
ran with the default budget (a quarter of the free memory), which its chunks fill; this shows
what the same update needs when given less.
Results: ``benchmarks/results/removal-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
STUDY = HERE / "results" / "study-mnist-resnet18"
OUT = HERE / "results" / "removal-memory"
SAMPLE_SIZE = 1024
REMOVED_CLASS = 0


def one(budget: str) -> dict:
    """Runs in the child process."""
    import torch

    torch.set_num_threads(1)
    from repif import io
    from repif.experiments.config import StudyConfig
    from repif.experiments.resources import measure
    from repif.experiments.study import Study
    from repif.memory import parse_bytes
    from repif.metrics import predict, removal_scores
    from repif.unlearning import remaining_indices

    results = io.read_json(STUDY / "results.json")
    cfg = StudyConfig.from_dict(results["config"])
    cfg.max_memory = None if budget == "default" else parse_bytes(budget)
    scale = next(r["scale"] for r in results["references"]
                 if r["removed_class"] == REMOVED_CLASS and r["kind"] == "full")
    study = Study(cfg, STUDY, progress=False)
    study._prepare()
    removed = torch.nonzero(study.train_y == REMOVED_CLASS).flatten()
    rest = remaining_indices(len(study.train_y), removed)
    with measure(study.device) as m:
        est = study._estimator(solver=cfg.solver, sampler="logit-importance",
                               sample_size=SAMPLE_SIZE, seed=0).fit(rest)
        updated = est.remove(removed, scale=scale, steps=cfg.steps)
    scores = removal_scores(predict(updated, study.test[0]), study.original_test,
                            study.test[1], REMOVED_CLASS)
    return {"budget": budget, "budget_bytes": est.budget.bytes, "time_s": m.time_s,
            "peak_mem_bytes": m.peak_mem_bytes, "scale": scale, **scores.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="unused: the study's config names it")
    ap.add_argument("--budgets", default="256MiB,1GiB,default")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child)))
        return
    rows = []
    for budget in args.budgets.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", budget], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    OUT.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    lines = ["# One ResNet-18 class removal under several memory budgets", "",
             "`python benchmarks/removal_memory.py --budgets " + args.budgets + "`", "",
             f"Class {REMOVED_CLASS} removed from the width-16 model of the ResNet-18 study "
             f"(K-FAC on a logit-importance subset of {SAMPLE_SIZE}, the study's η), one thread; "
             "time and peak RSS growth cover the pool pass, the draw, the fit and the update. "
             "The budget changes how the streamed passes are chunked, not the result.", "",
             "| budget | time s | peak RSS growth MB | forget | consistency | F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r["budget"] if r["budget"] != "default" else (
            f"default ({r['budget_bytes'] / 2**30:.1f} GiB)")
        lines.append(f"| {name} | {r['time_s']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
                     f"{r['forget']:.3f} | {r['consistency']:.3f} | {r['f1']:.3f} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
