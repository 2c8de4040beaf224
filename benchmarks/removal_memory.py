"""One class removal of the ResNet-18 study under several memory budgets: time and peak memory.

    python benchmarks/removal_memory.py --data-dir DIR [--budgets 256MiB,1GiB,default]
    python benchmarks/removal_memory.py --samplers random,logit-stratified+cand8 \
        --sizes 64,1024 --budgets 256MiB,default --name removal-memory-samplers

Uses the model the ResNet-18 study (``benchmarks/study_resnet18.py cpu``) trained and cached, and
its settings (K-FAC, sampled output Hessian, BatchNorm frozen, damping 0.01, the η it picked for
class 0). Each (sampler, m, budget) runs in a fresh process: the sampler's statistics (the
logit/feature pass over the remaining training points, or over its candidates), its draw of m
(default a logit-importance draw of m = 1,024), the K-FAC fit and the update, measured as
the study measures a cell (wall time; RSS growth sampled every 2 ms). The cells of the study all
ran with the default budget (a quarter of the free memory), which its chunks fill; this shows
what the same update needs when given less, and whether a smaller subset saves memory once the
chunks no longer fill the budget (a sampler grid).
Results: ``benchmarks/results/<name>.{json,md}`` (default name ``removal-memory``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
STUDY = HERE / "results" / "study-mnist-resnet18"
SAMPLE_SIZE = 1024
REMOVED_CLASS = 0


def one(budget: str, sampler: str = "logit-importance", sample_size: int = SAMPLE_SIZE) -> dict:
    """Runs in the child process: one update with ``sampler`` (a study spec, e.g.
    ``logit-stratified+cand8``) at ``sample_size`` under ``budget``."""
    import torch

    torch.set_num_threads(1)
    from repif import io
    from repif.memory import parse_bytes
    from repif.metrics import predict, removal_scores
    from repif.studies.class_removal.config import StudyConfig, parse_sampler
    from repif.studies.class_removal.study import Study
    from repif.studies.resources import measure
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
        name, shrinkage, candidates = parse_sampler(sampler)
        est = study._estimator(solver=cfg.solver, sampler=name, sample_size=sample_size,
                               shrinkage=shrinkage, candidates=candidates, seed=0).fit(rest)
        updated = est.remove(removed, scale=scale, steps=cfg.steps)
    scores = removal_scores(predict(updated, study.test[0]), study.original_test,
                            study.test[1], REMOVED_CLASS)
    return {"sampler": sampler, "sample_size": sample_size, "budget": budget,
            "budget_bytes": est.budget.bytes, "time_s": m.time_s,
            "peak_mem_bytes": m.peak_mem_bytes, "scale": scale, **scores.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="unused: the study's config names it")
    ap.add_argument("--budgets", default="256MiB,1GiB,default")
    ap.add_argument("--samplers", default="logit-importance",
                    help="comma-separated study sampler specs (e.g. random,logit-stratified+cand8)")
    ap.add_argument("--sizes", default=str(SAMPLE_SIZE), help="comma-separated subset sizes m")
    ap.add_argument("--name", default="removal-memory", help="results file stem")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        budget, sampler, size = args.child.split("|")
        print(json.dumps(one(budget, sampler, int(size))))
        return
    out = HERE / "results" / args.name
    rows = []
    for sampler in args.samplers.split(","):
        for size in args.sizes.split(","):
            for budget in args.budgets.split(","):
                child = "|".join([budget, sampler, size])
                res = subprocess.run([sys.executable, __file__, "--child", child], check=True,
                                     capture_output=True, text=True).stdout
                rows.append(json.loads(res.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
                out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n",
                                                    encoding="utf-8")  # partial results kept
    command = " ".join(["python benchmarks/removal_memory.py", "--budgets", args.budgets,
                        "--samplers", args.samplers, "--sizes", args.sizes, "--name", args.name])
    lines = ["# One ResNet-18 class removal under several memory budgets", "",
             f"`{command}`", "",
             f"Class {REMOVED_CLASS} removed from the width-16 model of the ResNet-18 study "
             "(K-FAC on the named sampler's subset of m points, the study's η), one thread; "
             "time and peak RSS growth cover the sampler's statistics (the pool pass, or its "
             "candidates' pass), the draw, the fit and the update. The budget changes how the "
             "streamed passes are chunked, not the result.", "",
             "| sampler | m | budget | time s | peak RSS growth MB | forget | consistency | F1 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r["budget"] if r["budget"] != "default" else (
            f"default ({r['budget_bytes'] / 2**30:.1f} GiB)")
        lines.append(f"| {r.get('sampler', 'logit-importance')} | "
                     f"{r.get('sample_size', SAMPLE_SIZE)} | {name} | {r['time_s']:.1f} | "
                     f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['forget']:.3f} | "
                     f"{r['consistency']:.3f} | {r['f1']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
