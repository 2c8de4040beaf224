"""The ``repif`` command line: ``repif demo``, ``repif class-removal`` and ``repif evaluate``."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from repif import distributed
from repif.curvature.kinds import check_basis_size
from repif.memory import parse_bytes
from repif.studies.class_removal.config import StudyConfig

#: The demo: digits MLP, one removed class, every sampler (and importance sampling with the
#: shrinkage fill), sizes 16…256, 3 seeds — under three minutes on 2 CPU cores.
DEMO_SAMPLERS = ("random", "stratified", "feature-kmeans", "feature-herding", "logit-stratified",
                 "logit-importance", "logit-importance+shrink")
DEMO = dict(dataset="digits", model="mlp", remove=[0], sizes=[16, 64, 256], seeds=3)


#: CPU threads for torch. The study's work is many small products (per-sample vmaps, subset
#: curvature products) where thread hand-offs cost more than they save: on a loaded 2-core
#: machine one digits cell took 0.45 s with 1 thread and 19 s with 2.
DEFAULT_THREADS = 1


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _scale(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale: a number or auto, not {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repif", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="output directory")
    common.add_argument("--quiet", action="store_true", help="no progress bars or table")
    common.add_argument("--device", default="cpu", help="cpu or cuda")
    common.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch CPU threads (default 1; see docs/cli.md)")
    demo = sub.add_parser("demo", parents=[common], help="class removal on the digits data")
    demo.add_argument("--seeds", type=int, default=DEMO["seeds"])
    cr = sub.add_parser("class-removal", parents=[common], help="the class-removal study")
    d = StudyConfig()  # the defaults live once, on the configuration
    cr.add_argument("--dataset", default=d.dataset)
    cr.add_argument("--data-dir", default=d.data_dir)
    cr.add_argument("--model", default=d.model)
    cr.add_argument("--width", type=int, default=d.width,
                    help="model size: ResNet-18's base width (default 64), or the hidden width "
                    "of mlp/cnn/resnet (their defaults 64/32/16)")
    cr.add_argument("--remove", type=_ints, default=d.remove, help="classes, e.g. 0,3")
    cr.add_argument("--samplers", type=_names, default=d.samplers,
                    help="sampler names; append +shrink for the diagonal shrinkage fill, +candN "
                         "to pick from N·m uniform candidates (two-phase), e.g. "
                         "logit-importance+cand8")
    cr.add_argument("--sizes", type=_ints, default=d.sizes)
    cr.add_argument("--seeds", type=int, default=d.seeds, help="number of seeds (0…N−1)")
    cr.add_argument("--solver", default=d.solver)
    cr.add_argument("--curvature", default=d.curvature)
    cr.add_argument("--damping", type=float, default=d.damping)
    cr.add_argument("--scale", type=_scale, default=d.scale,
                    help="step scale η, or 'auto' to pick it on a validation split")
    cr.add_argument("--steps", type=int, default=d.steps)
    cr.add_argument("--epochs", type=int, default=d.epochs)
    cr.add_argument("--lr", type=float, default=d.lr)
    cr.add_argument("--weight-decay", type=float, default=d.weight_decay)
    cr.add_argument("--limit-train", type=int, default=d.limit_train)
    cr.add_argument("--limit-test", type=int, default=d.limit_test)
    cr.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    cr.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    cr.add_argument("--max-memory", type=_memory, default=d.max_memory,
                    help="memory per streamed chunk, e.g. 2GiB (default: a quarter of the free "
                         "RAM, at most 1 GiB, or of the GPU memory); changes speed and peak "
                         "memory, not results")
    cr.add_argument("--fisher", default=d.fisher, choices=("exact", "sampled"),
                    help="kfac/ekfac: the output Hessian exactly (C backward passes per point, "
                         "default) or one sampled label per point")
    cr.add_argument("--other-layers", default=d.other_layers,
                    choices=("error", "identity", "frozen"),
                    help="kfac/ekfac: parameters outside Linear/Conv2d layers (e.g. BatchNorm): "
                         "an error (default), identity curvature, or left unchanged")
    cr.add_argument("--weight-sharing", default=d.weight_sharing, choices=("expand", "reduce"),
                    help="kfac/ekfac: a convolution's positions enter the factors as separate "
                         "examples (expand, default) or summed first (reduce: K-FAC-reduce, "
                         "far cheaper on large feature maps)")
    cr.add_argument("--eigh-dtype", default=d.eigh_dtype, choices=("float64", "float32"),
                    help="kfac/ekfac: precision of the factors' eigendecompositions (float32: "
                         "1.6–2.3× faster on large factors, solve error ~2e-4; default float64)")
    cr.add_argument("--basis-size", default=d.basis_size, type=_basis_size, metavar="N|pool",
                    help="ekfac: the eigenbasis from N uniform points of the retained pool (or "
                         "all of it: pool), the eigenvalues from the subset (default: both from "
                         "the subset)")
    cr.add_argument("--references", default=d.references, choices=("all", "none"),
                    help="all (default): the full-pool update (η, inverse-HVP error) and the "
                         "retrained model; none: cells only, with --scale η given (e.g. an "
                         "earlier run's reference scale) and no inverse-HVP error")
    from repif.studies.evaluation.cli import add_parser as add_evaluate

    add_evaluate(sub, common)
    return p


def _basis_size(text: str) -> int | str:
    """``--basis-size``: a positive number of points, or "pool" (checked as the option is)."""
    try:
        value = text if text == "pool" else int(text)
        return check_basis_size(value)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of points or 'pool', got {text!r}") from None


def _config(args: argparse.Namespace) -> StudyConfig:
    if args.command == "demo":
        return StudyConfig(samplers=list(DEMO_SAMPLERS), device=args.device,
                           **{**DEMO, "seeds": args.seeds})
    return StudyConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, width=args.width,
        remove=args.remove, samplers=args.samplers, sizes=args.sizes, seeds=args.seeds,
        solver=args.solver, curvature=args.curvature, damping=args.damping, scale=args.scale,
        steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        limit_train=args.limit_train, limit_test=args.limit_test, dtype=args.dtype,
        device=args.device, batch_size=args.batch_size, fisher=args.fisher,
        other_layers=args.other_layers, weight_sharing=args.weight_sharing,
        eigh_dtype=args.eigh_dtype, basis_size=args.basis_size, references=args.references,
        max_memory=args.max_memory,
    )


def run(args: argparse.Namespace) -> int:
    from repif.studies.class_removal.report import write_report
    from repif.studies.class_removal.study import Study
    from repif.studies.class_removal.summary import (
        aggregate,
        conclusions,
        format_table,
        headline,
        references,
        update_cost,
    )

    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        from repif.studies.evaluation.cli import run as run_evaluate

        return run_evaluate(args, Path(args.out or "repif-out/evaluate"))
    config = _config(args)
    out = Path(args.out or ("repif-out/demo" if args.command == "demo" else "repif-out/study"))
    out = distributed.output_dir(out)  # under torchrun only rank 0 writes to --out
    study = Study(config, out, progress=not args.quiet and distributed.is_main())
    with study.locked():  # the report too: no other run may write between results and report
        results = study.run()
        rows = aggregate(results, study.vectors)
        refs = references(results)
        head = headline(rows)
        report = write_report(results, rows, refs, head, out)
    if not args.quiet and distributed.is_main():
        print(format_table(rows, refs))
        print()
        for line in conclusions(head, update_cost(rows, refs)):
            print(line)
        print(f"\nresults: {out / 'results.json'}\nreport:  {report}")
    return 0


#: Exit codes: 0 success; 1 the environment failed (disk full, read-only, no GPU, output in use,
#: out of memory); 2 bad input (arguments, data, a hand-edited results file); 130 interrupted.
EXIT_ENVIRONMENT, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130

#: What to do about an OSError, by errno.
_OS_FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some space within your disk quota",
    errno.EROFS: "the file system is read-only: pass a writable --out",
    errno.EACCES: "make it writable or pass another --out",
    errno.EPERM: "make it writable or pass another --out",
    errno.EIO: "check the disk",
}


def _raised_by_repif(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is repif's own code: a ValueError
    raised there is an input check (they all name the value and the fix); one raised inside
    another library is not ours to explain."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


_PACKAGE_DIR = Path(__file__).resolve().parent


def classify(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure, None for anything else (a bug,
    which keeps its traceback)."""
    from repif.errors import RepifError, TooLargeError
    from repif.studies.class_removal.study import StudyError

    if isinstance(err, StudyError):
        return err.exit_code, str(err)
    if isinstance(err, (TooLargeError, MemoryError)) or isinstance(
        err, getattr(torch, "OutOfMemoryError", ())
    ):
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return EXIT_ENVIRONMENT, f"out of memory: {first}"
    if isinstance(err, FileNotFoundError) and (isinstance(err, RepifError) or err.filename is None):
        return EXIT_BAD_INPUT, str(err)  # a missing dataset: the message says how to get it
    if isinstance(err, OSError):
        what = err.strerror or str(err)
        where = f": {err.filename}" if err.filename else ""
        fix = _OS_FIXES.get(err.errno, "fix that")
        return EXIT_ENVIRONMENT, (f"{what}{where}; {fix}, then re-run the same command: "
                                  "finished cells are saved and the run resumes")
    if isinstance(err, RepifError):
        return EXIT_BAD_INPUT, str(err)
    if isinstance(err, (ValueError, ArithmeticError)) and not isinstance(
        err, (ZeroDivisionError, OverflowError)
    ) and _raised_by_repif(err):
        return EXIT_BAD_INPUT, str(err)  # repif's own input and result checks
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="repif: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("repif: interrupted; finished cells are saved, re-run the command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        verdict = classify(err)
        if verdict is None:
            raise  # a bug in repif: keep the traceback
        code, message = verdict
        print(f"repif: error: {' '.join(message.split())}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
