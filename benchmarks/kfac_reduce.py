"""What the K-FAC factor pass costs on ResNet-18, expand against reduce, beside one forward and
one forward+backward over the same images.

    python benchmarks/kfac_reduce.py --data-dir DIR [--widths 16,64] [--points 256] [--threads 2]

For each width: a model at PyTorch's initialisation with BatchNorm frozen (eval mode; the
factors' cost does not depend on the weights), ``--points`` MNIST training images (random inputs
when no data directory is given), K-FAC with a sampled output Hessian (one backward per point,
as in the class-removal study), float32. Each timing is the best of ``--repeats`` runs in this
process. Agreement: the cosine and relative difference between the two conventions'
(K + λI)⁻¹ g for g the summed gradient of the first 64 images (λ = 0.01). Results:
``benchmarks/results/kfac-reduce.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repif import datasets, io, models
from repif.curvature import kfac
from repif.task import ClassificationTask, FunctionalModel

HERE = Path(__file__).parent
OUT = HERE / "results" / "kfac-reduce"
DAMPING = 0.01
GRADIENT_POINTS = 64  # the right-hand side: summed gradient of this many images


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _images(data_dir: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir:
        ds = datasets.load("mnist", data_dir)
        x, y = ds.train
        return x[:n].float(), y[:n]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def measure(width: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    model = models.ResNet18((1, 28, 28), 10, width=width).eval()
    fm = FunctionalModel(model, ClassificationTask(weight_decay=5e-4))
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n)

    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def fit(sharing: str):
        return kfac.fit_kronecker(fm, x, y, w, kind="kfac", fisher="sampled",
                                  other_layers="frozen", weight_sharing=sharing)

    layers, _ = kfac.kronecker_layers(fm, "frozen")

    def factor_pass(sharing: str):
        return kfac.kronecker_statistics(fm, x, y, w, layers, fisher="sampled",
                                         weight_sharing=sharing)

    row = {"width": width, "params": models.num_parameters(model), "points": n}
    row["forward_s"], _ = _best(forward, repeats)
    row["forward_backward_s"], _ = _best(forward_backward, repeats)
    fits = {}
    for sharing in kfac.WEIGHT_SHARING:
        row[f"{sharing}_pass_s"], _ = _best(lambda s=sharing: factor_pass(s), repeats)
        row[f"{sharing}_s"], fits[sharing] = _best(lambda s=sharing: fit(s), 1)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:GRADIENT_POINTS]), y[:GRADIENT_POINTS], reduction="sum").backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])[None]
    v = {s: f.inverse(g, DAMPING)[0] for s, f in fits.items()}
    row["cosine"] = float(F.cosine_similarity(v["expand"], v["reduce"], dim=0))
    row["rel_difference"] = float((v["reduce"] - v["expand"]).norm() / v["expand"].norm())
    return row


def write(rows: list[dict], args: argparse.Namespace) -> Path:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    io.write_json_atomic(OUT.with_suffix(".json"), {
        "rows": rows, "threads": args.threads, "data": "mnist" if args.data_dir else "random",
        "environment": io.environment_metadata()})
    lines = [
        "# K-FAC factor pass on ResNet-18: expand against reduce", "",
        f"Reproduce: `python benchmarks/kfac_reduce.py --data-dir DIR --widths "
        f"{args.widths} --points {args.points} --threads {args.threads}`", "",
        f"{args.points} {'MNIST' if args.data_dir else 'random'} images, BatchNorm frozen, "
        f"sampled output Hessian, float32, {args.threads} thread(s), best of {args.repeats} (the "
        "fits: one run), weights at initialisation. Times in seconds. 'pass': the factor pass "
        "alone (A and G); 'fit': the pass plus the eigendecompositions, a fixed cost per fit "
        "(float64 `eigh` of d × d factors, d up to 4,609 at full width). The ratios divide a "
        "pass by one forward+backward over the same images. "
        f"Agreement: (K + λI)⁻¹g under both conventions, λ = {DAMPING}, g the summed gradient "
        f"of {GRADIENT_POINTS} images.", "",
        "| width | parameters | forward | forward+backward | pass: expand | pass: reduce | "
        "expand ÷ f+b | reduce ÷ f+b | fit: expand | fit: reduce | cosine | rel. difference |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        fb, ex, re = r["forward_backward_s"], r["expand_pass_s"], r["reduce_pass_s"]
        lines.append(
            f"| {r['width']} | {r['params']:,} | {r['forward_s']:.2f} | {fb:.2f} | {ex:.2f} | "
            f"{re:.2f} | {ex / fb:.1f}× | {re / fb:.1f}× | {r['expand_s']:.1f} | "
            f"{r['reduce_s']:.1f} | {r['cosine']:.3f} | {r['rel_difference']:.3f} |")
    path = OUT.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--widths", default="16,64")
    p.add_argument("--points", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = _images(args.data_dir, args.points)
    rows = []
    for width in (int(v) for v in args.widths.split(",")):
        rows.append(measure(width, x, y, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    print(write(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
