"""Train (and cache) the ResNet-18 models the scale benchmark and the MNIST study use.

    python benchmarks/train_resnet18.py --data-dir DIR --widths 16,32,64 [--epochs 2]

Weights go to ``benchmarks/cache/`` (safetensors keyed by data, architecture, width, seed and
recipe; not committed); a second run with the same arguments loads them instead of training.
Test accuracy per width is appended to ``benchmarks/results/resnet18-training.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from repif import datasets, io
from repif.training import load_or_train

HERE = Path(__file__).parent
CACHE = HERE / "cache"
RESULTS = HERE / "results" / "resnet18-training.json"

#: Recipe: Adam from 1e-3 with cosine decay to 0, batches of 128; no weight decay (damping
#: conditions the curvature instead). A constant rate left BatchNorm's running statistics behind
#: the weights (width 16, 2 epochs: 96.7% test accuracy in eval mode, 98.6% with batch stats).
RECIPE = {"epochs": 2, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.0, "seed": 0,
          "schedule": "cosine"}


def recipe(epochs: int) -> dict:
    return {**RECIPE, "epochs": epochs}


def trained(data_dir: str, width: int, epochs: int, progress: bool = False) -> torch.nn.Module:
    """The cached (or freshly trained) ResNet-18 of ``width`` on full MNIST."""
    ds = datasets.load("mnist", data_dir=data_dir)
    r = recipe(epochs)
    return load_or_train(ds, "resnet18", width=width, seed=r["seed"], epochs=r["epochs"],
                         weight_decay=r["weight_decay"], lr=r["lr"], batch_size=r["batch_size"],
                         schedule=r["schedule"], cache_dir=CACHE, progress=progress)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x[s : s + 1000]).argmax(1) == y[s : s + 1000]).sum())
               for s in range(0, len(y), 1000))
    return hits / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--epochs", default="2", help="one figure, or one per width (2,2,1)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    widths = [int(w) for w in args.widths.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    epochs = epochs * len(widths) if len(epochs) == 1 else epochs
    ds = datasets.load("mnist", data_dir=args.data_dir)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for width, ep in zip(widths, epochs, strict=True):
        t0 = time.perf_counter()
        model = trained(args.data_dir, width, ep, progress=True)
        row = {"width": width, **recipe(ep), "n_train": len(ds.train[1]),
               "wall_s_incl_cache_load": time.perf_counter() - t0,
               "test_accuracy": accuracy(model, *ds.test), "threads": args.threads}
        print(row, flush=True)
        rows = [r for r in rows if (r["width"], r["epochs"]) != (width, ep)] + [row]
        io.write_json_atomic(RESULTS, rows)


if __name__ == "__main__":
    main()
