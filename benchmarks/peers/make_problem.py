"""Build the shared peer-benchmark problems once (system python, repif installed).

    OMP_NUM_THREADS=1 python benchmarks/peers/make_problem.py [--out /tmp/peer-problems]

Per problem writes ``DIR/problem.safetensors`` (model state as ``model.*``, float32 train set and
the first N_TEST test points), ``DIR/meta.json`` and the exact float64 references
``DIR/ref-ggn.safetensors`` and ``DIR/ref-hessian.safetensors``: repif's dense ``direct`` solve
over the full training pool, damping λ (per problem, below) + weight decay 1e-3 on the mean-loss
curvature, scores[t, j] = −∇l(z_t)ᵀ(C + λI)⁻¹∇l(z_j).

Damping: both models' Hessians are indefinite (their smallest eigenvalues, written to meta.json
as ``hessian_min_eig``, are about −0.14 on digits); with a smaller λ the Hessian system
H + (wd + λ)I is itself indefinite, its inverse is dominated by the eigenvalues nearest zero and
no float32 method can reproduce the float64 reference (Captum's exact method reached Pearson
0.94 at λ = 0.01). So λ is the smallest round value that keeps H + (wd + λ)I positive definite
with margin, the usual practice for influence functions on non-convex models; the script refuses
to write a reference if that fails. On the CNN it does fail for the Hessian (eigenvalues down
to about −1.39, found by pyDVL's Arnoldi), so build that problem with ``--curvatures ggn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import repif
from repif import datasets, training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import PROBLEM_DIR  # noqa: E402

#: λ per problem (see the module docstring); measured λ_min(H) + wd: see meta.json.
DAMPING = {"digits-mlp": 0.2, "fashion-cnn": 0.2}
WEIGHT_DECAY = 1e-3
N_TEST = 50


def build(name: str):
    if name == "digits-mlp":
        ds = datasets.load("digits")
        model = training.load_or_train(ds, "mlp", seed=0, weight_decay=WEIGHT_DECAY)
        return ds, model, "mlp", 64
    # 1,000 training images and an 8-wide penultimate layer (3.4k parameters) keep the dense
    # float64 reference (full-pool GGN and Hessian, p × p) to minutes on 2 shared cores.
    ds = datasets.load("fashion-mnist", limit_train=1000, limit_test=200)
    model = training.load_or_train(ds, "cnn", seed=0, epochs=10, lr=3e-3,
                                   weight_decay=WEIGHT_DECAY, hidden=8)
    return ds, model, "cnn", 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=PROBLEM_DIR)
    ap.add_argument("--problems", default="digits-mlp,fashion-cnn")
    ap.add_argument("--curvatures", default="ggn,hessian",
                    help="references to build; the CNN's dense float64 Hessian (3,394 "
                         "products over 1,000 images) takes hours on one core")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.problems.split(","):
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        ds, model, arch, hidden = build(name)
        model = model.float().eval()
        xtr, ytr = ds.train
        xte, yte = ds.test[0][:N_TEST], ds.test[1][:N_TEST]
        tensors = {f"model.{k}": v.detach().float().contiguous()
                   for k, v in model.state_dict().items()}
        tensors.update(x_train=xtr.float().contiguous(), y_train=ytr.long().contiguous(),
                       x_test=xte.float().contiguous(), y_test=yte.long().contiguous())
        save_file(tensors, str(d / "problem.safetensors"))
        with torch.no_grad():
            acc = (model(ds.test[0].float()).argmax(1) == ds.test[1]).float().mean().item()
        meta = {"name": name, "arch": arch, "hidden": hidden,
                "input_shape": list(ds.input_shape), "num_classes": int(ds.num_classes),
                "n_train": len(ytr), "n_test": N_TEST, "damping": DAMPING[name],
                "weight_decay": WEIGHT_DECAY, "test_accuracy": acc,
                "n_params": sum(p.numel() for p in model.parameters()),
                "repif_version": getattr(repif, "__version__", "?"), "torch": torch.__version__}
        m64 = model.double()
        train64 = (xtr.double(), ytr)
        for curv in args.curvatures.split(","):
            t0 = time.perf_counter()
            est = repif.InfluenceEstimator(m64, train64, curvature=curv, damping=meta["damping"],
                                           weight_decay=WEIGHT_DECAY, solver="identity").fit()
            c = est.solver.operator.dense()  # C + wd·I on the whole training set
            eig = torch.linalg.eigvalsh(c)
            meta[f"{curv}_min_eig"], meta[f"{curv}_max_eig"] = eig[0].item(), eig[-1].item()
            if eig[0] + meta["damping"] <= 0:
                raise SystemExit(f"{name}: {curv} + λI is indefinite (λ_min(C) = "
                                 f"{eig[0].item():.4g}); raise DAMPING[{name!r}]")
            c.diagonal().add_(meta["damping"])
            g_test = est.test_gradients((xte.double(), yte))
            scores = -torch.linalg.solve(c, g_test.T).T @ est.train_gradients().T
            save_file({"scores": scores.contiguous()}, str(d / f"ref-{curv}.safetensors"))
            print(f"{name}: {curv} reference {tuple(scores.shape)} in "
                  f"{time.perf_counter() - t0:.1f}s; eigenvalues of C + wd·I in "
                  f"[{eig[0].item():.4g}, {eig[-1].item():.4g}]", flush=True)
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
