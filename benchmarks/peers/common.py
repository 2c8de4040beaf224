"""Command line shared by every peer script (no repif dependency)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import load_problem, save_scores  # noqa: E402,F401


def main(methods: dict, library: str, targets: dict[str, str] | None = None) -> None:
    """``methods[name](model, train, test, meta) -> (n_test, n_train) scores`` in repif's
    convention; the time covers everything the method does after the problem is loaded.

    ``targets[name]`` is the curvature the method approximates, "hessian" or "ggn" (default):
    its scores are judged against the exact reference with that curvature."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--problem")
    ap.add_argument("--method")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.list:
        print(json.dumps({m: (targets or {}).get(m, "ggn") for m in methods}))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, train, test, meta = load_problem(args.problem)
    t0 = time.perf_counter()
    scores = methods[args.method](model, train, test, meta)
    seconds = time.perf_counter() - t0
    scores = torch.as_tensor(scores).detach().reshape(len(test[1]), len(train[1]))
    save_scores(args.out, scores, seconds, library=library, method=args.method)
    print(json.dumps({"library": library, "method": args.method, "time_s": seconds}))
