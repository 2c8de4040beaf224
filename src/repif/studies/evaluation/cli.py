"""``repif evaluate``: LDS or LOO of attribution methods against retrained models."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from repif import distributed


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.001,0.01, got {text!r}"
                                         ) from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _hidden(text: str) -> int | list[int]:
    widths = _ints(text)
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"hidden widths must be positive integers like 128 or "
                                         f"128,64, got {text!r}")
    return widths[0] if len(widths) == 1 else widths


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 like 0.01, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a seed, a whole number ≥ 0 like 0 or 7, got "
                                         f"{text!r}")
    return value


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` subcommand to ``sub`` (argparse subparsers)."""
    ev = sub.add_parser(
        "evaluate", parents=[common],
        help="LDS / leave-one-out of attribution methods against retrained models",
        description="Train the ground truth (LDS: --subsets random subsets of --fraction of the "
        "training set, --gt-seeds seeds each; LOO: one retrain per left-out point), then score "
        "every method: [curvature:]solver for the whole training set, "
        "[curvature:]solver@sampler[+shrink] for each --sizes × --seeds, grad-dot.")
    ev.add_argument("--dataset", default="digits")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--limit-train", type=int, default=None)
    ev.add_argument("--limit-test", type=int, default=None)
    ev.add_argument("--first", action="store_true",
                    help="take the first --limit-train/--limit-test points (dattri's MNIST "
                    "setting) instead of a stratified random subset")
    ev.add_argument("--model", default="mlp", help="linear, mlp, cnn, resnet, resnet18")
    ev.add_argument("--width", "--hidden", dest="hidden", type=_hidden, default=None,
                    help="model width as in class-removal; for an MLP its hidden width(s), e.g. "
                         "128,64 for two hidden layers (--hidden is the same option)")
    ev.add_argument("--epochs", type=int, default=30)
    ev.add_argument("--lr", type=_positive, default=None)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--weight-decay", type=float, default=1e-3)
    ev.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ev.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    ev.add_argument("--train-seed", type=_seed, default=0, help="seed of the attributed model")
    ev.add_argument("--metric", default="lds", choices=("lds", "loo"))
    ev.add_argument("--target", default="loss", choices=("loss", "margin"))
    ev.add_argument("--subsets", type=int, default=50, help="LDS subsets S")
    ev.add_argument("--fraction", type=float, default=0.5, help="LDS subset fraction α")
    ev.add_argument("--gt-seeds", type=int, default=1, help="retraining seeds per subset K")
    ev.add_argument("--subset-seed", type=_seed, default=0)
    ev.add_argument("--no-noise", action="store_true",
                    help="skip the extra retraining seed that measures the ground truth's noise")
    ev.add_argument("--loo-points", type=int, default=None,
                    help="LOO: this many training points drawn at random (default all)")
    ev.add_argument("--loo-indices", type=_ints, default=None, help="LOO: these training points")
    ev.add_argument("--test-points", type=_ints, default=None,
                    help="test indices to evaluate (default all)")
    ev.add_argument("--methods", type=_names, default=["ggn:direct", "grad-dot"],
                    help="e.g. ggn:direct,hessian:direct,ggn:woodbury@logit-importance,grad-dot")
    ev.add_argument("--sizes", type=_ints, default=[64], help="curvature sample sizes m")
    ev.add_argument("--seeds", type=int, default=1, help="curvature-sample seeds (0…N−1)")
    ev.add_argument("--dampings", type=_floats, default=[0.01],
                    help="damping grid; each row reports its best (as dattri picks it)")
    ev.add_argument("--dtype", default="float64", choices=("float32", "float64"))


def run(args: argparse.Namespace, out: Path) -> int:
    """Run ``repif evaluate`` into ``out``; prints the table unless ``--quiet``."""
    from repif.studies.evaluation import (
        Evaluation,
        EvaluationConfig,
        format_table,
        table,
        write_report,
    )

    if args.loo_points is not None and args.loo_indices is not None:
        raise ValueError("pass --loo-points (a count) or --loo-indices (a list), not both")
    config = EvaluationConfig(
        dataset=args.dataset, data_dir=args.data_dir, limit_train=args.limit_train,
        limit_test=args.limit_test, first=args.first, model=args.model, hidden=args.hidden,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        weight_decay=args.weight_decay, optimizer=args.optimizer, momentum=args.momentum,
        train_seed=args.train_seed, metric=args.metric, target=args.target,
        subsets=args.subsets, fraction=args.fraction, gt_seeds=args.gt_seeds,
        subset_seed=args.subset_seed, noise=not args.no_noise,
        loo_points=args.loo_indices if args.loo_indices is not None else args.loo_points,
        test_points=args.test_points, methods=args.methods, sizes=args.sizes,
        seeds=args.seeds, dampings=args.dampings, dtype=args.dtype, device=args.device)
    out = distributed.output_dir(out)  # under torchrun only rank 0 writes to --out
    evaluation = Evaluation(config, out, progress=not args.quiet and distributed.is_main())
    with evaluation.locked():
        results = evaluation.run()
        report = write_report(results, out)
    if not args.quiet and distributed.is_main():
        print(format_table(table(results), results))
        print(f"\nresults: {out / 'results.json'}\nreport:  {report}")
    return 0
