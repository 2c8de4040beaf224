"""Eigendecompositions of Kronecker factors in float32 against float64.

    python benchmarks/eigh_precision.py [--threads 1]

1. ``torch.linalg.eigh`` alone on synthetic PSD factors of 576, 1,152 and 2,304 rows (the A
   factors of 3×3 convolutions with 64, 128 and 256 input channels; eigenvalues spread over
   8 decades, as trained networks' are): time in each precision and the relative error of a solve
   damped by 1e-3 of the largest eigenvalue.
2. End to end: ``fit_kronecker`` (EK-FAC, sampled Fisher) of a ResNet-18 of width 16 on 256
   MNIST-sized random inputs, with ``eigh_dtype`` "float64" and "float32": fit time, and the
   relative error and cosine of ``inverse`` (λ = 1e-3) on 8 random vectors.

Results: ``benchmarks/results/eigh-precision.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "eigh-precision.json"
SIZES = (576, 1152, 2304)
DAMPING_FRACTION = 1e-3


def synthetic(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4 * n, generator=g, dtype=torch.float64)
    x *= torch.logspace(0, -4, n, dtype=torch.float64)[:, None]
    a = x @ x.T / (4 * n)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64)
    out, solves = {}, {}
    for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
        t0 = time.perf_counter()
        v, q = torch.linalg.eigh(a.to(dt))
        out[name] = time.perf_counter() - t0
        v, q = v.double().clamp_min(0), q.double()
        lam = DAMPING_FRACTION * float(v.max())
        solves[name] = q @ ((q.T @ b) / (v + lam)[:, None])
    err = float((solves["float32"] - solves["float64"]).norm() / solves["float64"].norm())
    return {"rows": n, "float64_s": out["float64"], "float32_s": out["float32"],
            "speedup": out["float64"] / out["float32"], "solve_rel_error": err}


def end_to_end() -> dict:
    from repif.curvature.kfac import fit_kronecker
    from repif.models import ResNet18
    from repif.task import FunctionalModel

    torch.manual_seed(0)
    model = ResNet18((1, 28, 28), 10, width=16).eval()
    for m in model.modules():  # BatchNorm frozen, as the studies treat it
        if isinstance(m, torch.nn.BatchNorm2d):
            m.requires_grad_(False)
    fm = FunctionalModel(model)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    w = torch.full((256,), 1 / 256)
    fits, times = {}, {}
    for name in ("float64", "float32"):
        t0 = time.perf_counter()
        fits[name] = fit_kronecker(fm, x, y, w, kind="ekfac", fisher="sampled",
                                   eigh_dtype=name)
        times[name] = time.perf_counter() - t0
    v = torch.randn(8, fm.space.size, generator=torch.Generator().manual_seed(1))
    a, b = fits["float64"].inverse(v, 1e-3), fits["float32"].inverse(v, 1e-3)
    return {"model": "resnet18 width 16", "parameters": fm.space.size, "points": 256,
            "fit_float64_s": times["float64"], "fit_float32_s": times["float32"],
            "speedup": times["float64"] / times["float32"],
            "inverse_rel_error": float((b - a).norm() / a.norm()),
            "inverse_cosine": float(torch.nn.functional.cosine_similarity(a, b).mean())}


def report(res: dict) -> str:
    lines = ["# Kronecker factors: eigendecompositions in float32 against float64", "",
             f"`python benchmarks/eigh_precision.py --threads {res['threads']}` (commit "
             f"{res['commit']}; one run on a shared machine: compare the ratios).", "",
             "| factor rows | float64 (s) | float32 (s) | speed-up | solve rel. error |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in res["synthetic"]:
        lines.append(f"| {r['rows']:,} | {r['float64_s']:.2f} | {r['float32_s']:.2f} | "
                     f"{r['speedup']:.2f}× | {r['solve_rel_error']:.1e} |")
    e = res["end_to_end"]
    lines += ["", f"End to end, EK-FAC of a {e['model']} ({e['parameters']:,} parameters, "
              f"{e['points']} points): fit {e['fit_float64_s']:.1f} s in float64, "
              f"{e['fit_float32_s']:.1f} s in float32 ({e['speedup']:.2f}×); the inverse at "
              f"λ = 1e-3 differs by {e['inverse_rel_error']:.1e} (cosine "
              f"{e['inverse_cosine']:.6f}).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip() or "?"
    res = {"threads": args.threads, "commit": commit,
           "synthetic": [synthetic(n) for n in SIZES], "end_to_end": end_to_end()}
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
