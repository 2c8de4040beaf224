"""benchmarks/peers/scale.py: its pure pieces (model, inputs, agreement, goal), in well under a
second; the benchmark itself runs in minutes to an hour and has its own ``--quick`` mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _scale():
    spec = importlib.util.spec_from_file_location(
        "peers_scale", ROOT / "benchmarks" / "peers" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resnet9_shape_and_size():
    s = _scale()
    model = s.freeze_batchnorm(s.resnet9(16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 142_576  # the Conv2d/Linear parameters the docstring states
    x = s.to_rgb32(torch.randn(4, 1, 28, 28))
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2]) and float(x[0, 0, 0, 0]) == float(x.amin())
    assert model(x).shape == (4, 10)


def test_agreement_and_goal():
    s = _scale()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50))
    assert abs(s.correlations(a, a)["pearson"] - 1) < 1e-12
    assert abs(s.correlations(-a, a)["spearman"] + 1) < 1e-12

    def row(name, total, peak, p=None):
        r = {"name": name, "total_s": total, "peak_rss_growth_bytes": peak,
             "max_rss_bytes": peak}
        if p is not None:
            r["vs_kronfluence_ekfac"] = {"pearson": p, "spearman": p}
        return r

    res = {"rows": [row("kronfluence-ekfac", 100.0, 1000), row("repif-ekfac-full", 80.0, 900,
                                                              0.99),
                    row("repif-ekfac-li-256", 40.0, 800, 0.985),
                    row("repif-identity", 10.0, 500, 0.5)]}
    g = s.goal(res)
    met = {c["name"]: c["met"] for c in g["candidates"]}
    assert met == {"repif-ekfac-full": False, "repif-ekfac-li-256": True,
                   "repif-identity": False}
    assert g["met"]
