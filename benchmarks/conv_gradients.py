"""Per-sample convolution weight gradients: unfolded patches, shifted slices and the grouped
convolution kernel, per layer.

    python benchmarks/conv_gradients.py [--width 16] [--batch 64] [--size 28] [--threads 1]

For every ``nn.Conv2d`` of a ResNet-18 of ``width`` on 1×size×size inputs, the layer's input
and (random) output gradient for ``batch`` points are captured once; then every route of
:meth:`repif.layers.Conv2dRule.per_sample` run back to back, best of ``REPEATS``, and their
answers are compared. Then the whole hook engine (every layer's per-sample gradients, streamed
as the estimator does) with each route for every convolution and with the per-layer rule
(``conv_gradient_mode="auto"``), against one batched forward+backward of the same points.
The rule's thresholds (:data:`repif.layers.conv.SLICES_MIN_POSITIONS`,
:data:`repif.layers.conv.GROUPED_MIN_CHANNELS`) come from the per-layer table.
Results: ``benchmarks/results/conv-gradients.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "conv-gradients.json"
REPORT = HERE / "results" / "conv-gradients.md"
sys.path.insert(0, str(HERE))
from _timing import REPEATS, best  # noqa: E402
from _timing import once as _once  # noqa: E402

#: The per-sample convolution routes compared (repif.layers.conv.CONV_GRADIENT_ROUTES).
ROUTES = ("unfold", "slices", "grouped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from repif.gradients.hooks import layer_engine
    from repif.layers import LayerBlock
    from repif.layers import conv as lg
    from repif.models import ResNet18
    from repif.task import FunctionalModel

    torch.manual_seed(0)
    model = ResNet18((1, args.size, args.size), 10, width=args.width).eval()
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_hook(
        lambda m, i, o: captured.__setitem__(m, (i[0].detach(), torch.randn_like(o))))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    layers = []
    for name, m in model.named_modules():
        if m not in captured:
            continue
        a, g = captured[m]
        times, answers = {}, {}
        for route in ROUTES:
            lg.conv_gradient_mode = route
            block = LayerBlock(m, ("weight",), (0,), (m.weight.numel(),))
            rule = lg.Conv2dRule()
            times[route] = best(lambda b=block, a=a, g=g, r=rule: r.per_sample(b, a, g))
            answers[route] = rule.per_sample(block, a, g)["weight"]
        lg.conv_gradient_mode = "auto"
        ref = answers["unfold"]
        diff = max(float((answers[r] - ref).norm() / ref.norm()) for r in ROUTES)
        row = {"layer": name, "in": m.in_channels, "out": m.out_channels,
               "kernel": list(m.kernel_size), "stride": m.stride[0],
               "positions": g[0, 0].numel(), **{f"{r}_s": times[r] for r in ROUTES},
               "speedup": times["unfold"] / times["slices"],
               "rel_diff": diff, "auto": lg.conv_gradient_route(m, g[0, 0].numel())}
        print(json.dumps(row), flush=True)
        layers.append(row)

    fm = FunctionalModel(model)
    engine = layer_engine(fm, x[:2], y[:2])
    assert engine is not None

    def one_pass() -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        torch.autograd.grad(loss, params)

    def per_layer() -> None:
        for _ in engine.layer_gradients(x, y):
            pass

    one_pass()
    whole: dict[str, float] = {"pass_s": best(one_pass)}
    for _ in range(REPEATS):  # interleaved, best of each: the machine's load drifts
        for mode in (*ROUTES, "auto"):
            lg.conv_gradient_mode = mode
            t = _once(per_layer)
            whole[f"{mode}_s"] = min(whole.get(f"{mode}_s", t), t)
    lg.conv_gradient_mode = "auto"
    whole["pass_after_s"] = best(one_pass)
    result = {"width": args.width, "batch": args.batch, "size": args.size,
              "threads": args.threads, "layers": layers, "engine": whole,
              "slices_min_positions": lg.SLICES_MIN_POSITIONS,
              "grouped_min_channels": lg.GROUPED_MIN_CHANNELS}
    print(json.dumps(whole), flush=True)
    from repif import io

    io.write_json_atomic(args.out, result)
    if Path(args.out) == RESULTS:
        REPORT.write_text(report(result))


def report(r: dict[str, Any]) -> str:
    w = r["engine"]
    lines = ["# Per-sample convolution gradients: unfolded patches, shifted slices, grouped", "",
             f"Generated by `benchmarks/conv_gradients.py`: ResNet-18 width {r['width']}, "
             f"{r['batch']} points of 1×{r['size']}×{r['size']}, {r['threads']} thread(s), best "
             f"of {REPEATS}. Per layer, every route on the same captured input and output "
             "gradient, back to back (rel. diff: the largest relative difference from the "
             "unfold route's answer). The rule (\"auto\"): grouped for kernels above 1×1 with "
             f"≥ {r.get('grouped_min_channels', '?')} input channels per group and at least as "
             "many output positions; else slices for 1×1 kernels and from "
             f"{r['slices_min_positions']} output positions up; else unfold.", "",
             "| layer | in → out | kernel, stride | positions | "
             + " | ".join(f"{x} s" for x in ROUTES if f"{x}_s" in r["layers"][0])
             + " | rel. diff | auto |",
             "| --- | --- | --- | --- | " + "--- | " * sum(f"{x}_s" in r["layers"][0]
                                                          for x in ROUTES) + "--- | --- |"]
    for x in r["layers"]:
        times = " | ".join(f"{x[f'{k}_s']:.4f}" for k in ROUTES if f"{k}_s" in x)
        lines.append(f"| {x['layer']} | {x['in']} → {x['out']} | {x['kernel'][0]}×"
                     f"{x['kernel'][1]}, {x['stride']} | {x['positions']} | {times} | "
                     f"{x['rel_diff']:.1e} | {x['auto']} |")
    lines += ["", "Whole hook engine (every layer's per-sample gradients of the batch, as "
              "streamed for scores; the modes interleaved, best of each), ratio to one "
              "batched forward+backward of the same points "
              f"(pass {w['pass_s']:.3f} s before, {w['pass_after_s']:.3f} s after):", "",
              "| convolutions by | s | × pass |", "| --- | --- | --- |"]
    for mode in (*ROUTES, "auto"):
        if f"{mode}_s" not in w:
            continue
        lines.append(f"| {mode} | {w[f'{mode}_s']:.3f} | {w[f'{mode}_s'] / w['pass_s']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
