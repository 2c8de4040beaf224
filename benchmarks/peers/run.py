"""Run every (library, method) of the peer benchmark, each in its own process; write
benchmarks/results/peers.json (medians) and peers.md.

    python benchmarks/peers/run.py --install          # venvs under /tmp/peer-venvs (once)
    OMP_NUM_THREADS=1 python benchmarks/peers/make_problem.py
    python benchmarks/peers/run.py --reps 3 [--problems ...] [--libraries ...] [--resume]

A method is repeated only if its first run succeeded in under --repeat-under seconds.
Every child runs with OMP_NUM_THREADS=1, MKL_NUM_THREADS=1 (and torch.set_num_threads(1)).
Repetitions alternate libraries/methods (rep r runs the whole list, rotated by r). Peak memory is
the child's own peak RSS from os.wait4 (ru_maxrss of that one process, not cumulative), which
includes the interpreter, torch and the library's imports. time_s is the method's own timed
section (after the problem is loaded); wall_s is the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
VENVS = Path(os.environ.get("PEER_VENVS", "/tmp/peer-venvs"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _process import wait_child  # noqa: E402
from arch import PROBLEM_DIR, PROBLEMS  # noqa: E402
from report import write  # noqa: E402

LIBRARIES = {  # library -> (script, python, pip requirements after torch==2.13.0)
    "repif": ("repif_peer.py", sys.executable, None),
    "captum": ("captum_peer.py", str(VENVS / "captum/bin/python"), [["captum"]]),
    "dattri": ("dattri_peer.py", str(VENVS / "dattri/bin/python"), [["dattri"]]),
    "pydvl": ("pydvl_peer.py", str(VENVS / "pydvl/bin/python"), [["pydvl[influence]"]]),
    "kronfluence": ("kronfluence_peer.py", str(VENVS / "kronfluence/bin/python"),
                    [["--no-deps", "kronfluence"],
                     ["accelerate", "einops", "einconv", "opt_einsum", "safetensors", "tqdm"]]),
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           PYTHONWARNINGS="ignore")


def install(libs) -> None:
    for lib in libs:
        reqs = LIBRARIES[lib][2]
        if reqs is None:
            continue
        d = VENVS / lib
        if not (d / "bin/python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
        pip = [str(d / "bin/pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0", "safetensors", "numpy", "scipy"], check=True)
        for r in reqs:
            subprocess.run(pip + r, check=True)
        subprocess.run([str(d / "bin/python"), "-c", "import torch; assert torch.__version__."
                        "startswith('2.13.0'), torch.__version__"], check=True)


def run_one(lib, problem, method, target: str, tmp: Path, timeout: float) -> dict:
    script, python, _ = LIBRARIES[lib]
    out = tmp / f"{lib}-{problem}-{method}.safetensors"
    out.unlink(missing_ok=True)
    log = open(tmp / f"{lib}-{problem}-{method}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, str(HERE / script), "--problem", problem, "--method",
                             method, "--out", str(out)], env=ENV, cwd=HERE, stdout=log,
                            stderr=subprocess.STDOUT)
    status, ru = wait_child(proc, timeout, poll=0.05, started=t0)
    proc.returncode = status if isinstance(status, int) else -9
    wall = time.perf_counter() - t0
    rec = {"wall_s": wall, "peak_mem_bytes": ru.ru_maxrss * 1024}
    if status != 0 or not out.exists():
        tail = (tmp / f"{lib}-{problem}-{method}.log").read_text()[-600:]
        rec["error"] = f"exit {status}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        return rec
    from safetensors import safe_open
    from safetensors.torch import load_file
    from scipy import stats

    with safe_open(str(out), "pt") as f:
        scores = f.get_tensor("scores").double()
        rec["time_s"] = float(f.metadata()["time_s"])
    finite = scores.isfinite().all(1)  # a query row with NaN/inf is left out and counted
    rec["nonfinite_rows"] = int((~finite).sum())
    scores = scores[finite].flatten().numpy()
    for ref in ("ggn", "hessian"):
        path = PROBLEM_DIR / problem / f"ref-{ref}.safetensors"
        if not path.exists():
            continue
        r = load_file(str(path))["scores"].double()[finite].flatten().numpy()
        rec[f"pearson_{ref}"] = float(stats.pearsonr(r, scores)[0])
        rec[f"spearman_{ref}"] = float(stats.spearmanr(r, scores)[0])
    if f"pearson_{target}" not in rec:  # no reference with that curvature for this problem
        target = "ggn"
    rec["reference"] = target
    rec["pearson"], rec["spearman"] = rec[f"pearson_{target}"], rec[f"spearman_{target}"]
    return rec


def methods_of(lib) -> dict[str, str]:
    """{method: the curvature it targets} as the library's script declares."""
    script, python, _ = LIBRARIES[lib]
    if not Path(python).exists() or not (HERE / script).exists():
        return {}
    r = subprocess.run([python, str(HERE / script), "--list"], env=ENV, cwd=HERE,
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--methods", default="", help="comma list lib:method to restrict to")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--repeat-under", type=float, default=120.0,
                    help="repeat a method only if its first run succeeded within this many "
                         "seconds (long runs vary little relative to their length)")
    ap.add_argument("--resume", action="store_true",
                    help="keep TMP/runs.jsonl and skip the runs it already holds")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/peer-runs"))
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where peers.json / peers.md go (default benchmarks/results)")
    ap.add_argument("--merge", action="store_true", help="keep rows of peers.json not rerun")
    ap.add_argument("--summarise", action="store_true",
                    help="only rebuild peers.json/peers.md from TMP/runs.jsonl")
    args = ap.parse_args()
    libs = args.libraries.split(",")
    if args.install:
        install(libs)
        return
    args.tmp.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        runs = [json.loads(line) for line in open(args.tmp / "runs.jsonl")]
        write([r for r in runs if r["problem"] in args.problems.split(",")], args.merge,
              args.results)
        return
    only = set(filter(None, args.methods.split(",")))
    jobs = [(lib, m, target) for lib in libs for m, target in methods_of(lib).items()
            if not only or f"{lib}:{m}" in only]
    raw = args.tmp / "runs.jsonl"
    runs = [json.loads(line) for line in open(raw)] if args.resume and raw.exists() else []
    if not args.resume:
        raw.unlink(missing_ok=True)
    for rep in range(args.reps):
        k = rep % max(len(jobs), 1)
        for problem in args.problems.split(","):
            for lib, m, target in jobs[k:] + jobs[:k]:
                mine = [r for r in runs if (r["problem"], r["library"], r["method"])
                        == (problem, lib, m)]
                if any(r["rep"] == rep for r in mine):
                    continue
                first = [r for r in mine if r["rep"] == 0]
                if rep > 0 and (not first or "error" in first[0]
                                or first[0]["wall_s"] > args.repeat_under):
                    continue
                rec = run_one(lib, problem, m, target, args.tmp, args.timeout)
                rec.update(problem=problem, library=lib, method=m, rep=rep)
                runs.append(rec)
                with open(raw, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    write(runs, args.merge, args.results)


if __name__ == "__main__":
    main()
