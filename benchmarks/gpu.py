"""One prepared command for a GPU: the CUDA tests and the GPU timings, in under 10 minutes.

    python benchmarks/gpu.py [--data-dir MNIST_DIR] [--budget 540]     # on a machine with CUDA
    python benchmarks/gpu.py --dry-run [--out DIR]                     # CPU, seconds (CI)

Steps, each in its own process with a share of ``--budget`` seconds (a step that runs out is
recorded as timed out and the next one starts):

1. ``cuda-tests``: ``pytest tests/test_cuda.py`` (CPU and GPU answers agree);
2. ``scores``: ResNet-18 (width 64, 3×32×32 synthetic images, initial weights: timings do not
   need a trained model) — one forward+backward over n points, per-sample gradients by the
   hook engine, exact ``influence`` of 1/10/100 queries (identity solver: the score pass) and
   ``scores="projected"`` for 100 queries (default dimension) with its Pearson correlation
   against exact scores on the same subset curvature (Woodbury on 32 points);
3. ``class-removal``: ``repif class-removal`` on the embedded digits with a small CNN,
   random against logit-importance, ``--device cuda``;
4. ``scale``: ``benchmarks/scale.py --device cuda --weights init`` (fit and influence steps,
   width 64) when ``--data-dir`` names the MNIST IDX files (it reads full MNIST); else skipped.

Results: ``benchmarks/results/gpu.json`` and ``gpu.md`` (with ``--dry-run``: under ``--out``,
default a temporary folder, so a CI run never overwrites measured results). ``--dry-run`` runs
every step on the CPU with tiny sizes: it checks the command end to end, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: Sizes of the ``scores`` step: (width, image side, n training points, subset) for the GPU
#: and for the dry run.
SCORES_GPU = {"width": 64, "side": 32, "n": 10_000, "subset": 32}
SCORES_DRY = {"width": 2, "side": 8, "n": 32, "subset": 4}
QUERIES = (1, 10, 100)
#: Share of the budget each step may take (the rest is left to the steps after it).
SHARES = {"cuda-tests": 0.15, "scores": 0.45, "class-removal": 0.2, "scale": 0.2}


def scores_step(device: str, dry: bool) -> dict[str, Any]:
    """The ``scores`` step, in this process (run as ``gpu.py --child scores``)."""
    import torch

    import repif
    from repif.gradients.streaming import stream_gradients
    from repif.models import ResNet18

    cfg = SCORES_DRY if dry else SCORES_GPU
    queries = (1, 2) if dry else QUERIES
    if dry:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    side, n = cfg["side"], cfg["n"]
    model = ResNet18((3, side, side), 10, width=cfg["width"]).to(device).eval()
    x = torch.randn(n + max(queries), 3, side, side, device=device)
    with torch.no_grad():  # labels the model can fit: its own predictions, 10% flipped
        y = torch.cat([model(x[s : s + 512]).argmax(1) for s in range(0, len(x), 512)])
    flip = torch.rand(len(y), device=device) < 0.1
    y = torch.where(flip, torch.randint(0, 10, y.shape, device=device), y)
    train, test_all = (x[:n], y[:n]), (x[n:], y[n:])

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Any) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def one_pass() -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for s in range(0, n, 256):
            loss = torch.nn.functional.cross_entropy(model(x[s : s + 256]), y[s : s + 256],
                                                     reduction="sum")
            torch.autograd.grad(loss, params)

    one_pass()
    row: dict[str, Any] = {"device": device, **cfg, "pass_s": timed(one_pass)}
    est = repif.InfluenceEstimator(model, train, solver="identity", damping=0.0)
    row["num_params"] = est.num_params
    row["hooks_s"] = timed(lambda: [None for _ in stream_gradients(
        est.fm, est.source, torch.arange(n), est.budget, est.cost)])
    for k in queries:
        test = (test_all[0][:k], test_all[1][:k])
        row[f"influence_{k}_s"] = timed(lambda test=test: est.influence(test))
    k = max(queries)
    test = (test_all[0][:k], test_all[1][:k])
    kw = {"damping": 1e-2, "sample_size": cfg["subset"], "solver": "woodbury"}
    exact_est = repif.InfluenceEstimator(model, train, **kw)
    exact = exact_est.influence(test)
    proj_est = repif.InfluenceEstimator(model, train, scores="projected", **kw)
    row[f"projected_{k}_s"] = timed(lambda: proj_est.influence(test))
    got = proj_est.influence(test, projected=proj_est.projected_gradients())
    pearson = [float(torch.corrcoef(torch.stack([got[i], exact[i]]))[0, 1]) for i in range(k)]
    row["projected_pearson_mean"] = sum(pearson) / len(pearson)
    row["projected_pearson_min"] = min(pearson)
    row["projected_size"] = proj_est.projection.size
    if device.startswith("cuda"):
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    for key in [key for key in row if key.endswith("_s") and key != "pass_s"]:
        row[key.replace("_s", "_ratio")] = row[key] / row["pass_s"]
    return row


def run_step(name: str, cmd: list[str], timeout: float, out: Path, dry: bool
             ) -> dict[str, Any]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if dry:  # tiny problems: one thread each, no hand-offs
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                else (e.stdout or ""))[-3000:]
    step = {"step": name, "status": status, "wall_s": time.perf_counter() - t0,
            "command": " ".join(cmd), "output_tail": tail}
    result_file = out / f"gpu-{name}.json"
    if result_file.exists():
        step["result"] = json.loads(result_file.read_text())
    return step


def report(summary: dict[str, Any]) -> str:
    where = "dry run on the CPU" if summary["dry_run"] else "on " + summary["device_name"]
    lines = ["# GPU run", "", f"Generated by `benchmarks/gpu.py` ({where}); total "
             f"{summary['wall_s']:.0f} s of a {summary['budget_s']:.0f} s budget.", "",
             "| step | status | wall s |", "| --- | --- | --- |"]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['wall_s']:.1f} |")
    scores = next((s.get("result") for s in summary["steps"] if s["step"] == "scores"), None)
    if scores:
        lines += ["", f"Scores ({scores['device']}; ResNet-18 width {scores['width']}, "
                  f"{scores['num_params']:,} parameters, n = {scores['n']:,} points of "
                  f"3×{scores['side']}×{scores['side']}): ratios to one forward+backward over "
                  f"the n points ({scores['pass_s']:.2f} s).", "", "| measure | s | × pass |",
                  "| --- | --- | --- |"]
        for key in sorted(k for k in scores if k.endswith("_s") and k != "pass_s"):
            lines.append(f"| {key[:-2]} | {scores[key]:.2f} | "
                         f"{scores[key.replace('_s', '_ratio')]:.2f}× |")
        lines += ["", f"Projected scores (D = {scores['projected_size']:,}): Pearson with exact "
                  f"mean {scores['projected_pearson_mean']:.4f}, min "
                  f"{scores['projected_pearson_min']:.4f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; "
                    "with --dry-run a temporary folder)")
    ap.add_argument("--data-dir", default=None, help="MNIST IDX files, for the scale step")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps")
    ap.add_argument("--steps", default=",".join(SHARES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "scores":
        out = Path(args.out)
        row = scores_step(args.device, args.dry_run)
        (out / "gpu-scores.json").write_text(json.dumps(row, indent=2))
        print(json.dumps(row))
        return

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the command on the CPU")
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="gpu-dry-")) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    py = sys.executable
    dry = ["--dry-run"] if args.dry_run else []
    removal = out / "gpu-class-removal"
    commands = {
        "cuda-tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        "scores": [py, str(HERE / "gpu.py"), "--child", "scores", "--device", device,
                   "--out", str(out), *dry],
        "class-removal": [py, "-m", "repif", "class-removal", "--dataset", "digits", "--model",
                          "cnn", "--remove", "0", "--samplers", "random,logit-importance",
                          "--device", device, "--quiet", "--out", str(removal),
                          *(["--sizes", "8", "--seeds", "1", "--epochs", "1", "--threads", "1",
                             "--limit-train", "200", "--limit-test", "50"] if args.dry_run
                            else ["--sizes", "16,64,256", "--seeds", "3", "--epochs", "30"])],
    }
    if args.data_dir:
        commands["scale"] = [py, str(HERE / "scale.py"), "--data-dir", args.data_dir,
                             "--device", device, "--weights", "init", "--widths", "64",
                             "--steps", "fit,influence", "--sizes", "60000"]
    started = time.perf_counter()
    steps = []
    for name in args.steps.split(","):
        if name not in commands:
            steps.append({"step": name, "status": "skipped (no --data-dir)" if name == "scale"
                          else "skipped (unknown step)", "wall_s": 0.0})
            continue
        left = args.budget - (time.perf_counter() - started)
        timeout = max(10.0, min(left, SHARES.get(name, 0.2) * args.budget * 1.5))
        step = run_step(name, commands[name], timeout, out, args.dry_run)
        if name == "class-removal" and (removal / "results.json").exists():
            cells = json.loads((removal / "results.json").read_text()).get("cells", [])
            step["result"] = {"cells": len(cells), "f1": [c.get("f1") for c in cells]}
        print(f"{name}: {step['status']} ({step['wall_s']:.1f} s)", flush=True)
        steps.append(step)
    summary = {"dry_run": args.dry_run, "budget_s": args.budget,
               "wall_s": time.perf_counter() - started, "steps": steps,
               "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else "cpu", "torch": torch.__version__}
    (out / "gpu.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu.md").write_text(report(summary))
    print(f"results in {out}")
    if any(not s["status"].startswith(("ok", "skipped")) for s in steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
