"""Per-sample gradients and influence scores against one batched forward+backward.

    python benchmarks/scores.py --data-dir DIR [--models mlp,resnet18-16,resnet18-64]
        [--n 10000] [--n-wide 2000] [--threads 1]

For each model, on the first n MNIST training images, in one process and one run:

* ``pass``: one ordinary batched forward+backward of the mean loss over the n points (batches of
  ``PASS_BATCH``) — the floor every per-sample method is measured against;
* ``hooks``: per-sample gradients of all n points with the hook engine (streamed in
  budget-sized chunks, each (b, p) block formed and dropped);
* ``func``: the same with ``torch.func.vmap(grad)`` on the first ``FUNC_POINTS`` points,
  reported per point and as the ratio it would have over n;
* ``influence-k``: ``influence`` of k = 1, 10, 100 test points against the n points (identity
  solver, so the row measures the score pass: test gradients plus the streamed contraction),
  with the hook engine's default per-layer choice of route for convolutions and, just before
  it in the same run, with every convolution materialised (the route before convolutions were
  contracted; ``conv_scores="materialise"``), so the two compare under the same load.

With ``--projection`` (rows of kind "projection"): ``scores="projected"`` against exact
scores, on the first ``--projection-n`` training points and 100 test queries, curvature on a
random subset of ``PROJECTION_SUBSET`` points (exact: the Woodbury solve of that subset's GGN):
Pearson correlation with the exact scores per query (mean and min) and time of the 100
queries (projected curvature, query and training projections, scores), of the stored training
projections alone and of scoring stored projections, against one forward+backward over the
same training points; each basis and projected dimension in ``PROJECTION_CELLS``.

Ratios are time / pass time. ``resnet18-64`` uses ``--n-wide`` points (the ratios do not depend
on n; 10,000 points at 11.2M parameters take hours on 2 CPU cores). Models come from the cache
of ``train_resnet18.py`` (ResNet-18) or are trained here (MLP, 2 epochs).
Results: ``benchmarks/results/scores.json`` and ``scores.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "scores.json"
REPORT = HERE / "results" / "scores.md"
#: Batch of the reference forward+backward pass: large enough to run the matrix products
#: efficiently, small enough to fit every width in memory.
PASS_BATCH = 256
#: Points the (slow) torch.func engine is timed on; its cost is linear in the points.
FUNC_POINTS = 64
QUERY_COUNTS = (1, 10, 100)
#: (basis, projected dimension per layer side) measured by ``--projection``.
PROJECTION_CELLS = (("eigen", 8), ("eigen", 16), ("eigen", 32), ("eigen", 64), ("eigen", 128),
                    ("random", 16), ("random", 64))
#: Curvature subset of the projection rows (random, exact subset GGN by Woodbury).
PROJECTION_SUBSET = 32
#: Queries of the projection rows.
PROJECTION_QUERIES = 100


def build(name: str, data_dir: str) -> torch.nn.Module:
    sys.path.insert(0, str(HERE))
    from train_resnet18 import trained

    from repif import datasets
    from repif.training import load_or_train

    if name == "mlp":
        ds = datasets.load("mnist", data_dir=data_dir)
        return load_or_train(ds, "mlp", epochs=2, lr=1e-3, batch_size=128,
                             cache_dir=HERE / "cache")
    width = int(name.split("-")[1])
    return trained(data_dir, width, 2 if width < 64 else 1)


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, data_dir: str, n: int) -> dict[str, Any]:
    import repif
    from repif import datasets
    from repif.gradients.hooks import conv_route
    from repif.gradients.streaming import per_sample_gradients, split_batch, stream_gradients

    ds = datasets.load("mnist", data_dir=data_dir)
    model = build(name, data_dir).eval()
    x, y = ds.train[0][:n], ds.train[1][:n]
    est = repif.InfluenceEstimator(model, (x, y), solver="identity", damping=0.0)
    assert est.cost.engine is not None, "the hook engine should be eligible here"

    def one_pass() -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for s in range(0, n, PASS_BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[s : s + PASS_BATCH]),
                                                     y[s : s + PASS_BATCH], reduction="sum")
            torch.autograd.grad(loss, params)

    def hooks() -> None:
        for _ in stream_gradients(est.fm, est.source, torch.arange(n), est.budget, est.cost):
            pass

    def func() -> None:
        inputs, targets = split_batch(est.fm, est.source.gather(torch.arange(FUNC_POINTS)))
        for s in range(0, FUNC_POINTS, 16):
            per_sample_gradients(est.fm, inputs[s : s + 16], targets[s : s + 16])

    one_pass()  # warm-up: first calls pay for allocator growth and kernel selection
    row: dict[str, Any] = {"model": name, "n": n, "num_params": est.num_params,
                           "budget_bytes": est.budget.bytes}
    row["pass_s"] = timed(one_pass)
    row["hooks_s"] = timed(hooks)
    row["func_per_point_s"] = timed(func) / FUNC_POINTS
    engine = est.cost.engine
    convs = conv_positions(model, x[:1])
    for k in QUERY_COUNTS:
        test = (ds.test[0][:k], ds.test[1][:k])
        if convs:
            engine.conv_scores = "materialise"
            row[f"influence_{k}_materialised_s"] = timed(lambda test=test: est.influence(test))
            engine.conv_scores = "auto"
            row[f"contracted_convs_{k}"] = sum(conv_route(m, pos, k) == "contract"
                                               for m, pos in convs.items())
        row[f"influence_{k}_s"] = timed(lambda test=test: est.influence(test))
    row["conv_layers"] = len(convs)
    row["hooks_ratio"] = row["hooks_s"] / row["pass_s"]
    row["func_ratio"] = row["func_per_point_s"] * n / row["pass_s"]
    for k in QUERY_COUNTS:
        for key in (f"influence_{k}", f"influence_{k}_materialised"):
            if f"{key}_s" in row:
                row[f"{key}_ratio"] = row[f"{key}_s"] / row["pass_s"]
    return row


def projection_model(name: str, data_dir: str) -> torch.nn.Module:
    """The MNIST MLP (2 epochs) or a ResNet-18 of width w ("resnet18-w") trained 1 epoch on
    the first 5,000 MNIST images (cached): a model whose exact scores fit in memory."""
    import repif
    from repif import datasets, models

    if name == "mlp":
        return build(name, data_dir)
    ds = datasets.load("mnist", data_dir=data_dir)
    width = int(name.split("-")[1])
    model = models.build("resnet18", ds, width=width)
    return repif.train(model, (ds.train[0][:5000], ds.train[1][:5000]), epochs=1, seed=0,
                       batch_size=128, lr=1e-3, cache_dir=HERE / "cache")


def measure_projection(name: str, data_dir: str, n: int) -> dict[str, Any]:
    import repif
    from repif import datasets

    ds = datasets.load("mnist", data_dir=data_dir)
    model = projection_model(name, data_dir).eval()
    x, y = ds.train[0][:n], ds.train[1][:n]
    test = (ds.test[0][:PROJECTION_QUERIES], ds.test[1][:PROJECTION_QUERIES])
    kw = {"damping": 1e-2, "sample_size": PROJECTION_SUBSET, "sampler": "random",
          "solver": "woodbury"}

    def one_pass() -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for s in range(0, n, PASS_BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[s : s + PASS_BATCH]),
                                                     y[s : s + PASS_BATCH], reduction="sum")
            torch.autograd.grad(loss, params)

    one_pass()
    exact_est = repif.InfluenceEstimator(model, (x, y), **kw)
    row: dict[str, Any] = {"kind": "projection", "model": name, "n": n,
                           "queries": PROJECTION_QUERIES, "subset": PROJECTION_SUBSET,
                           "num_params": exact_est.num_params, "dims": []}
    t0 = time.perf_counter()
    exact = exact_est.fit().influence(test)
    row["exact_s"] = time.perf_counter() - t0
    row["pass_s"] = timed(one_pass)
    for basis, d in PROJECTION_CELLS:
        est = repif.InfluenceEstimator(model, (x, y), scores="projected", projection_dim=d,
                                       projection_basis=basis, **kw)
        pass_s = min(timed(one_pass), timed(one_pass))  # side by side: the load drifts
        t0 = time.perf_counter()
        got = est.influence(test)
        total = time.perf_counter() - t0
        stored_s = timed(lambda est=est: est.projected_gradients())
        stored = est.projected_gradients()
        reuse_s = timed(lambda est=est, stored=stored: est.influence(test, projected=stored))
        pearson = [float(torch.corrcoef(torch.stack([got[i], exact[i]]))[0, 1])
                   for i in range(got.shape[0])]
        cell = {"basis": basis, "dim": d, "size": est.projection.size, "pass_s": pass_s,
                "pearson_mean": sum(pearson) / len(pearson),
                "pearson_min": min(pearson), "influence_s": total, "train_projection_s": stored_s,
                "stored_influence_s": reuse_s}
        for key in ("influence", "train_projection", "stored_influence"):
            cell[f"{key}_ratio"] = cell[f"{key}_s"] / pass_s
        print(json.dumps({"model": name, **cell}), flush=True)
        row["dims"].append(cell)
    row["pass_after_s"] = timed(one_pass)  # the load can drift during a run: bracket it
    return row


def conv_positions(model: torch.nn.Module, x: torch.Tensor) -> dict[torch.nn.Module, int]:
    """Output positions per point of each nn.Conv2d, from one forward."""
    out: dict[torch.nn.Module, int] = {}
    handles = [m.register_forward_hook(lambda m, _i, o: out.__setitem__(m, o[0, 0].numel()))
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["# Per-sample gradients and scores against one forward+backward pass", "",
             "Generated by `benchmarks/scores.py`. Times in seconds; ratios are to the batched "
             "forward+backward pass over the same n points in the same process. Goals: "
             "per-sample gradients ≤ 1.5×, influence for ≤ 100 queries ≤ 2×.", "",
             "| model | params | n | pass s | hooks s (×) | vmap (×, extrapolated) | "
             "influence 1 (×) | influence 10 (×) | influence 100 (×) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    projected = [r for r in rows if r.get("kind") == "projection"]
    rows = [r for r in rows if r.get("kind") != "projection"]
    for r in rows:
        inf = " | ".join(f"{r[f'influence_{k}_s']:.1f} ({r[f'influence_{k}_ratio']:.2f}×)"
                         for k in QUERY_COUNTS)
        lines.append(f"| {r['model']} | {r['num_params']:,} | {r['n']:,} | {r['pass_s']:.1f} | "
                     f"{r['hooks_s']:.1f} ({r['hooks_ratio']:.2f}×) | {r['func_ratio']:.2f}× | "
                     f"{inf} |")
    routed = [r for r in rows if "influence_1_materialised_s" in r]
    if routed:
        lines += ["", "Convolutions contracted with the queries (default) against every "
                  "convolution materialised (the earlier route), measured back to back in the "
                  "same run; ratios to that run's pass. With 0 layers contracted both columns "
                  "run the same code, so their gap is the run's noise. Ratios do not depend on n "
                  "except through the k query gradients, a fixed cost spread over the n points.",
                  "",
                  "| model | n | queries | conv layers contracted | materialised s (×) | "
                  "default s (×) |", "| --- | --- | --- | --- | --- | --- |"]
        for r in routed:
            for k in QUERY_COUNTS:
                lines.append(
                    f"| {r['model']} | {r['n']:,} | {k} | {r[f'contracted_convs_{k}']} of "
                    f"{r['conv_layers']} | {r[f'influence_{k}_materialised_s']:.1f} "
                    f"({r[f'influence_{k}_materialised_ratio']:.2f}×) | "
                    f"{r[f'influence_{k}_s']:.1f} ({r[f'influence_{k}_ratio']:.2f}×) |")
    if projected:
        lines += projection_report(projected)
    return "\n".join(lines) + "\n"


def projection_report(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Projected scores (`scores=\"projected\"`) against exact", "",
             f"{PROJECTION_QUERIES} test queries against n training points; curvature: the GGN "
             f"of {PROJECTION_SUBSET} random training points, damping 1e-2 (exact: its Woodbury "
             "solve; projected: the same subset's GGN in the projected space). Pearson: per "
             "query, with the exact scores of that query over the n points, mean and min over "
             "the queries. Times: `influence` of the queries from scratch (projected curvature, "
             "query and training projections, the scores); the training projections alone (what "
             "is stored); scoring the queries against stored projections. Ratios are to one "
             "forward+backward over the n points, best of two measured just before each row "
             "(the machine is shared; its load drifts). The 100-query time includes fixed costs "
             "that do not grow with n (the eigenbasis, the projected curvature of the subset, "
             "the queries' projections); the projections column is the part that does. Goal: "
             "100 queries ≤ 2× at Pearson ≥ 0.95.", "",
             "| model | params | n | pass s | exact s | basis | dim | D | Pearson mean | min "
             "| 100 queries s (×) | projections s (×) | from stored s (×) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for c in r["dims"]:
            lines.append(
                f"| {r['model']} | {r['num_params']:,} | {r['n']:,} | {c['pass_s']:.2f} | "
                f"{r['exact_s']:.1f} | {c['basis']} | {c['dim']} | "
                f"{c['size']:,} | "
                f"{c['pearson_mean']:.4f} | {c['pearson_min']:.4f} | {c['influence_s']:.2f} "
                f"({c['influence_ratio']:.2f}×) | {c['train_projection_s']:.2f} "
                f"({c['train_projection_ratio']:.2f}×) | {c['stored_influence_s']:.2f} "
                f"({c['stored_influence_ratio']:.2f}×) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", default="mlp,resnet18-16,resnet18-64")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-wide", type=int, default=2_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--projection", action="store_true",
                    help="measure scores='projected' against exact scores (rows of kind "
                         "'projection'; models e.g. mlp,resnet18-8)")
    ap.add_argument("--projection-n", type=int, default=2_000)
    ap.add_argument("--replace", action="store_true",
                    help="measure the listed models again, replacing their rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from repif import io

    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    kind = "projection" if args.projection else None
    for name in args.models.split(","):
        if any(r["model"] == name and r.get("kind") == kind for r in rows) and not args.replace:
            continue
        if args.projection:
            row = measure_projection(name, args.data_dir, args.projection_n)
        else:
            n = args.n_wide if name.endswith("-64") else args.n
            row = measure(name, args.data_dir, n)
        row["threads"] = args.threads
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if not (r["model"] == name and r.get("kind") == kind)] + [row]
        io.write_json_atomic(RESULTS, rows)
        REPORT.write_text(report(rows))


if __name__ == "__main__":
    main()
