"""What recording the pool statistics during training costs in faithfulness.

    python benchmarks/recorded_statistics.py --data-dir data/mnist       # MNIST, MLP
    python benchmarks/recorded_statistics.py --dataset digits              # the embedded data

A model is trained with ``record_statistics=True`` (its last epoch's logits and features, at
weights that still move during that epoch). Class 0 is removed; for each seed and size m the
logit-importance subset of the remaining points is drawn twice — from the recorded statistics
and from a fresh pass at the final weights — and compared: the overlap of the two subsets, each
inverse-HVP's relative error against the whole-pool solve (GGN, CG), and the removal F1 of the
update with the step η picked on a validation split for the whole-pool direction. Also the time
of the fresh pass, which recording saves. Writes recorded-statistics.json and .md under --out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import repif
from repif import datasets, io
from repif.metrics import predict, removal_scores
from repif.unlearning import remaining_indices, removal_gradient

#: GGN damping and the training L2 (both in the curvature).
DAMPING, WEIGHT_DECAY = 0.01, 1e-3
#: Step sizes tried on the validation split (as the study's scale grid does).
SCALES = (0.5, 1, 2, 5, 10, 20, 50, 100)
REMOVED = 0
SAMPLER = "logit-importance"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = datasets.load(args.dataset, args.data_dir)
    x, y = ds.train
    gen = torch.Generator().manual_seed(0)
    val = torch.zeros(len(y), dtype=torch.bool)
    val[torch.randperm(len(y), generator=gen)[: len(y) // 10]] = True
    train, valid = (x[~val], y[~val]), (x[val], y[val])
    model = repif.train(repif.models.build("mlp", ds), train, epochs=args.epochs,
                        weight_decay=WEIGHT_DECAY, seed=0, record_statistics=True).double()
    recorded = model.repif_statistics
    kw = dict(curvature="ggn", damping=DAMPING, weight_decay=WEIGHT_DECAY, solver="cg")
    t0 = time.perf_counter()
    fresh = repif.InfluenceEstimator(model, train, **kw).pool_statistics()
    pass_s = time.perf_counter() - t0
    removed = torch.nonzero(train[1] == REMOVED).flatten()
    rest = remaining_indices(len(train[1]), removed)
    full = repif.InfluenceEstimator(model, train, tol=1e-10, max_iter=5000, **kw).fit(rest)
    g = removal_gradient(full.fitter, removed)
    v_full = full.inverse_hvp(g)
    original_val, original_test = predict(model, valid[0]), predict(model, ds.test[0])

    def test_f1(v: torch.Tensor) -> float:  # η picked on validation for the full direction
        new = copy.deepcopy(full.model)
        full.fm.space.set(new, full.fm.theta + eta_full * v)
        return removal_scores(predict(new, ds.test[0]), original_test, ds.test[1], REMOVED).f1

    eta_full = max(SCALES, key=lambda e: f1_at(e, v_full, full, valid, original_val))
    rows = []
    for m in [int(s) for s in args.sizes.split(",")]:
        for seed in range(args.seeds):
            out = {}
            for origin, stats in (("recorded", recorded), ("fresh", fresh)):
                est = repif.InfluenceEstimator(model, train, sampler=SAMPLER, sample_size=m,
                                               seed=seed, pool_statistics=stats, **kw).fit(rest)
                v = est.inverse_hvp(g)
                out[origin] = (est.subset.indices, float((v - v_full).norm() / v_full.norm()),
                               test_f1(v))
            overlap = len(set(out["recorded"][0].tolist()) & set(out["fresh"][0].tolist())) / m
            rows.append({"m": m, "seed": seed, "overlap": overlap,
                         "error_recorded": out["recorded"][1], "error_fresh": out["fresh"][1],
                         "f1_recorded": out["recorded"][2], "f1_fresh": out["fresh"][2]})
            print(rows[-1])
    result = {"dataset": ds.name, "n_train": len(train[1]), "epochs": args.epochs,
              "sampler": SAMPLER, "damping": DAMPING, "eta": eta_full,
              "fresh_pass_s": pass_s, "full_pool_f1": test_f1(v_full), "rows": rows,
              "environment": io.environment_metadata()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"recorded-statistics-{ds.name}"
    io.write_json_atomic(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown(result, args))
    print(markdown(result, args))


def f1_at(eta: float, v: torch.Tensor, est, data, original) -> float:
    new = copy.deepcopy(est.model)
    est.fm.space.set(new, est.fm.theta + eta * v)
    return removal_scores(predict(new, data[0]), original, data[1], REMOVED).f1


def markdown(r: dict, args: argparse.Namespace) -> str:
    def ms(rows, key):
        vals = [row[key] for row in rows]
        return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"

    lines = [f"# Recorded against fresh pool statistics ({r['dataset']}, MLP)", "",
             f"`python benchmarks/recorded_statistics.py --dataset {args.dataset}"
             + (f" --data-dir {args.data_dir}" if args.data_dir else "")
             + f" --epochs {args.epochs} --seeds {args.seeds} --sizes {args.sizes}`", "",
             f"{r['n_train']:,} training points, {r['epochs']} epochs, class {REMOVED} removed, "
             f"{r['sampler']}, GGN + CG (damping {r['damping']}), η = {r['eta']} picked on a "
             f"validation split for the whole-pool direction (whole-pool test F1 "
             f"{r['full_pool_f1']:.3f}). The fresh pass that recording saves took "
             f"{r['fresh_pass_s']:.2f} s. Mean ± std over seeds.", "",
             "| m | subset overlap | error, recorded | error, fresh | F1, recorded | F1, fresh |",
             "|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({row["m"] for row in r["rows"]}):
        rows = [row for row in r["rows"] if row["m"] == m]
        lines.append(f"| {m} | {ms(rows, 'overlap')} | {ms(rows, 'error_recorded')} | "
                     f"{ms(rows, 'error_fresh')} | {ms(rows, 'f1_recorded')} | "
                     f"{ms(rows, 'f1_fresh')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
