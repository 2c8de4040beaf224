"""Scale benchmark: ResNet-18 on full MNIST (60,000 training images) at several widths.

    python benchmarks/train_resnet18.py --data-dir DIR --widths 16,32,64 --epochs 2,2,1
    python benchmarks/scale.py --data-dir DIR --widths 16,32,64 [--device cuda] [--threads 2]

Each step runs in its own process, so its peak resident memory (``ru_maxrss``) is its own:

* ``fit``: ``fit()`` with ``solver="cg"``, ``sampler="logit-importance"``, m = 256: the
  logit/feature pass over all 60,000 training images (reported apart as ``pool_s``), the draw and
  gathering the subset (CG has no set-up); then (C + λI)⁻¹∇l for 10 test points (CG, at most
  ``--cg-iters`` steps, all 10 right-hand sides in one block), with the peak RSS read after the
  fit and again after the solves;
* ``influence``: scores of 10 test points against the first n training points (n = 15k, 30k,
  60k), streamed; timed with the ``identity`` solver so that the row measures the streaming pass
  alone (the solve of the 10 test gradients is the ``ihvp`` row);
* ``remove``: ``remove(class 0)`` with the fitted cg/logit-importance curvature drawn from the
  remaining points, with its forget rate and consistency on the test set.

Rows are appended to ``benchmarks/results/scale.json`` as they finish (atomically) and a run
resumes where it stopped; ``benchmarks/results/scale.md`` is rewritten from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "scale.json"
REPORT = HERE / "results" / "scale.md"
N_QUERIES = 10
SAMPLE_SIZE = 256
INFLUENCE_SIZES = (15_000, 30_000, 60_000)
STEPS = ("fit", "influence", "remove")
#: Damping for the ResNet GGN (mean-loss curvature of a network at ~99% training accuracy,
#: whose top eigenvalues are O(1)); the same at every width.
DAMPING = 1e-2


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_step(job: dict[str, Any]) -> dict[str, Any]:
    """One measured step in this (child) process."""
    import torch

    torch.set_num_threads(job["threads"])
    torch.set_flush_denormal(True)
    sys.path.insert(0, str(HERE))
    from train_resnet18 import trained

    import repif
    from repif import datasets
    from repif.metrics import removal_scores

    ds = datasets.load("mnist", data_dir=job["data_dir"])
    if job.get("weights", "trained") == "init":  # time and memory do not depend on the values
        model = repif.models.build("resnet18", ds, width=job["width"]).eval()
    else:
        model = trained(job["data_dir"], job["width"], job["epochs"])
    model = model.to(job["device"])
    x, y = ds.train
    xt, yt = ds.test
    test = (xt[:N_QUERIES], yt[:N_QUERIES])
    setup_rss = peak_rss_bytes()
    step = job["step"]
    kw: dict[str, Any] = dict(damping=DAMPING, device=job["device"], progress=False)
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    if step == "fit":
        est = repif.InfluenceEstimator(model, (x, y), solver="cg", sampler="logit-importance",
                                       sample_size=SAMPLE_SIZE, max_iter=job["cg_iters"], **kw)
        est.fit()
        sync()
        row["pool_s"] = est.timings["sample_s"]
        row["fit_s"] = time.perf_counter() - t0
        row["fit_peak_rss_bytes"] = peak_rss_bytes()
        t1 = time.perf_counter()
        v = est.inverse_hvp(est.test_gradients(test))
        sync()
        row["ihvp_s"] = time.perf_counter() - t1
        row["cg_iterations"] = est.solver.iterations[-N_QUERIES:]
        row["ihvp_norms"] = [float(n) for n in v.norm(dim=1)]
    elif step == "influence":
        est = repif.InfluenceEstimator(model, (x, y), solver="identity", **kw)
        scores = est.influence(test, train_indices=torch.arange(job["n"]))
        row["scores_shape"] = list(scores.shape)
        row["engine"] = "hooks" if est.cost.engine is not None else "func"
    elif step == "remove":
        est = repif.InfluenceEstimator(model, (x, y), solver="cg", sampler="logit-importance",
                                       sample_size=SAMPLE_SIZE, max_iter=job["cg_iters"], **kw)
        removed = torch.nonzero(y == 0).flatten()
        new = est.remove(removed, scale=1.0)
        sync()
        row["removed_points"] = int(removed.numel())
        with torch.no_grad():
            before = torch.cat([model(xt[s : s + 1000].to(job["device"])).argmax(1).cpu()
                                for s in range(0, len(yt), 1000)])
            after = torch.cat([new(xt[s : s + 1000].to(job["device"])).argmax(1).cpu()
                               for s in range(0, len(yt), 1000)])
        row.update(removal_scores(after, before, yt, 0).as_dict())
    sync()
    row["wall_s"] = time.perf_counter() - t0
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["setup_rss_bytes"] = setup_rss
    row["budget_bytes"] = est.budget.bytes
    row["num_params"] = est.num_params
    if job["device"] == "cuda":
        row["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return row


def key(row: dict[str, Any]) -> tuple:
    return row["device"], row["width"], row["step"], row.get("n"), row.get("weights", "trained")


def load_rows() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def save_rows(rows: list[dict[str, Any]]) -> None:
    from repif import io

    io.write_json_atomic(RESULTS, rows)
    REPORT.write_text(report(rows))


def exponent(rows: list[dict[str, Any]]) -> float | None:
    """Slope of log(time) against log(n) over the influence rows of one width (≥ 2 sizes)."""
    pts = [(math.log(r["n"]), math.log(r["wall_s"])) for r in rows]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def report(rows: list[dict[str, Any]]) -> str:
    out = ["# Scale benchmark: ResNet-18 on full MNIST", "",
           "Generated by `benchmarks/scale.py` from `scale.json`. Wall time of the step itself "
           "(after imports, data and model loading); peak RSS of the step's own process "
           "(imports, the 60,000 training images and the model included).", "",
           "| device | width | params | weights | step | n | wall s | peak RSS GB | notes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["device"], r["width"], STEPS.index(r["step"]),
                                         r.get("n") or 0)):
        notes = []
        if "ihvp_s" in r:
            notes.append(f"pool pass {r['pool_s']:.1f} s; fit {r['fit_s']:.1f} s, peak "
                         f"{r['fit_peak_rss_bytes'] / 2**30:.2f} GB; 10 inverse-HVPs "
                         f"{r['ihvp_s']:.1f} s ({max(r['cg_iterations'])} CG steps)")
        if "f1" in r:
            notes.append(f"forget {r['forget']:.3f}, consistency {r['consistency']:.3f}")
        if "engine" in r and not r.get("stopped"):
            notes.append(f"{r['engine']}, {r['wall_s'] / r['n'] * 1e3:.2f} ms/point")
        if r.get("note"):
            notes.append(r["note"])
        if "cuda_peak_bytes" in r:
            notes.append(f"CUDA peak {r['cuda_peak_bytes'] / 2**30:.2f} GB")
        out.append(f"| {r['device']} | {r['width']} | {r['num_params']:,} | "
                   f"{r.get('weights', 'trained')} | {r['step']} | "
                   f"{r.get('n') or ''} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                   f"{'; '.join(notes)} |")
    out += ["", "Influence time against n (fitted exponent of time ∝ n^k):", ""]
    for dev, width in sorted({(r["device"], r["width"]) for r in rows}):
        inf = [r for r in rows if (r["device"], r["width"], r["step"]) == (dev, width,
                                                                           "influence")]
        inf = list({r["n"]: r for r in inf if not r.get("stopped")}.values())  # one per size
        k = exponent(inf)
        sizes = ", ".join(f"{r['n']:,}" for r in sorted(inf, key=lambda r: r["n"]))
        out.append(f"* {dev}, width {width}: k = {k:.3f} (n = {sizes})" if k is not None
                   else f"* {dev}, width {width}: fewer than two sizes measured")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="directory with the four MNIST IDX files")
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--epochs", default="2,2,1", help="training epochs per width (see "
                    "train_resnet18.py): one figure or one per width")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--sizes", default=",".join(str(n) for n in INFLUENCE_SIZES))
    ap.add_argument("--cg-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default="trained", choices=("trained", "init"),
                    help="'init': untrained weights, for time/memory rows before the model is "
                         "trained (influence cost does not depend on the weight values)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_step(json.loads(args.child))), flush=True)
        return
    if not args.data_dir:
        ap.error("--data-dir is required (the MNIST IDX files; see docs/guides/data.md)")
    widths = [int(w) for w in args.widths.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    epochs = epochs * len(widths) if len(epochs) == 1 else epochs
    rows = load_rows()
    done = {key(r) for r in rows}
    for width, ep in zip(widths, epochs, strict=True):
        for step in args.steps.split(","):
            sizes = [int(n) for n in args.sizes.split(",")] if step == "influence" else [None]
            for n in sizes:
                job = {"width": width, "epochs": ep, "step": step, "n": n,
                       "data_dir": args.data_dir, "threads": args.threads,
                       "device": args.device, "cg_iters": args.cg_iters,
                       "weights": args.weights}
                if (args.device, width, step, n, args.weights) in done:
                    continue
                print(f"width {width} {step} {n or ''} …", flush=True)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)],
                                      capture_output=True, text=True, env=os.environ.copy())
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"step {step} (width {width}, n {n}) failed")
                row = {**{k: job[k] for k in ("device", "width", "step", "n", "threads",
                                              "epochs", "cg_iters", "weights")},
                       **json.loads(lines[-1][len("RESULT "):])}
                print(f"  {row['wall_s']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} "
                      "GB", flush=True)
                # merge with what other runs wrote meanwhile (two widths may run at once)
                rows = [r for r in load_rows() if key(r) != key(row)] + [row]
                save_rows(rows)


if __name__ == "__main__":
    main()
