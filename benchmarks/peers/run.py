"""Run every (library, method) of the peer benchmark, each in its own process; write
benchmarks/results/peers.json (medians) and peers.md.

    python benchmarks/peers/run.py --install          # venvs under /tmp/peer-venvs (once)
    OMP_NUM_THREADS=1 python benchmarks/peers/make_problem.py
    python benchmarks/peers/run.py --reps 3 [--problems ...] [--libraries ...]

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
VENVS = Path(os.environ.get("PEER_VENVS", "/tmp/peer-venvs"))
sys.path.insert(0, str(HERE))
from arch import PROBLEM_DIR, PROBLEMS  # noqa: E402

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


def run_one(lib, problem, method, tmp: Path, timeout: float) -> dict:
    script, python, _ = LIBRARIES[lib]
    out = tmp / f"{lib}-{problem}-{method}.safetensors"
    out.unlink(missing_ok=True)
    log = open(tmp / f"{lib}-{problem}-{method}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, str(HERE / script), "--problem", problem, "--method",
                             method, "--out", str(out)], env=ENV, cwd=HERE, stdout=log,
                            stderr=subprocess.STDOUT)
    status = None
    while status is None:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            _, st, ru = os.wait4(proc.pid, 0)
            status = "timeout"
            break
        time.sleep(0.05)
    proc.returncode = status if isinstance(status, int) else -9
    wall = time.perf_counter() - t0
    rec = {"wall_s": wall, "peak_mem_bytes": ru.ru_maxrss * 1024}
    if status != 0 or not out.exists():
        tail = (tmp / f"{lib}-{problem}-{method}.log").read_text()[-600:]
        rec["error"] = f"exit {status}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        return rec
    from safetensors import safe_open
    from scipy import stats

    with safe_open(str(out), "pt") as f:
        scores = f.get_tensor("scores").double().flatten().numpy()
        rec["time_s"] = float(f.metadata()["time_s"])
    for ref in ("ggn", "hessian"):
        from safetensors.torch import load_file
        r = load_file(str(PROBLEM_DIR / problem / f"ref-{ref}.safetensors"))["scores"]
        r = r.double().flatten().numpy()
        suffix = "" if ref == "ggn" else "_hessian_ref"
        rec["pearson" + suffix] = float(stats.pearsonr(r, scores)[0])
        rec["spearman" + suffix] = float(stats.spearmanr(r, scores)[0])
    return rec


def methods_of(lib) -> list[str]:
    script, python, _ = LIBRARIES[lib]
    if not Path(python).exists():
        return []
    r = subprocess.run([python, str(HERE / script), "--list"], env=ENV, cwd=HERE,
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else []


def summarise(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["problem"], r["library"], r["method"]), []).append(r)
    out = []
    for (problem, lib, method), rs in rows.items():
        ok = [r for r in rs if "error" not in r]
        row = {"problem": problem, "library": lib, "method": method, "reps": len(ok)}
        if not ok:
            row.update(time_s=None, peak_mem_bytes=None, pearson=None, spearman=None,
                       error=rs[-1]["error"])
        else:
            for k in ("time_s", "peak_mem_bytes", "pearson", "spearman", "pearson_hessian_ref",
                      "spearman_hessian_ref", "wall_s"):
                row[k] = statistics.median(r[k] for r in ok)
            row["peak_mem_bytes"] = int(row["peak_mem_bytes"])
            if len(ok) < len(rs):
                row["failed_reps"] = len(rs) - len(ok)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| problem | library | method | time (s) | peak RSS (MB) | Pearson | Spearman | "
             "Pearson vs Hessian ref |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error") and r["time_s"] is None:
            lines.append(f"| {r['problem']} | {r['library']} | {r['method']} | — | — | — | — | "
                         f"error: {r['error'][:120].replace('|', '/')} |")
            continue
        lines.append(f"| {r['problem']} | {r['library']} | {r['method']} | {r['time_s']:.2f} | "
                     f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['pearson']:.4f} | "
                     f"{r['spearman']:.4f} | {r['pearson_hessian_ref']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--methods", default="", help="comma list lib:method to restrict to")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/peer-runs"))
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
        write([r for r in runs if r["problem"] in args.problems.split(",")], args.merge)
        return
    only = set(filter(None, args.methods.split(",")))
    jobs = [(lib, m) for lib in libs for m in methods_of(lib) if not only or f"{lib}:{m}" in only]
    runs = []
    raw = args.tmp / "runs.jsonl"
    for rep in range(args.reps):
        k = rep % max(len(jobs), 1)
        for problem in args.problems.split(","):
            for lib, m in jobs[k:] + jobs[:k]:
                rec = run_one(lib, problem, m, args.tmp, args.timeout)
                rec.update(problem=problem, library=lib, method=m, rep=rep)
                runs.append(rec)
                with open(raw, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    write(runs, args.merge)


#: (library, reason) rows recorded when a library was not run at all.
NOT_RUN = {
    "pydvl": "installed (pydvl[influence] beside torch 2.13.0 CPU) but no script written: "
             "out of the session's time budget",
    "kronfluence": "installed with --no-deps plus accelerate, einops, einconv, opt_einsum, "
                   "safetensors, tqdm, but no script written: out of the session's time budget",
}


def write(runs: list[dict], merge: bool) -> None:
    rows = summarise(runs)
    for lib, why in NOT_RUN.items():
        if not Path(HERE / LIBRARIES[lib][0]).exists():
            for problem in PROBLEMS:
                rows.append({"problem": problem, "library": lib, "method": "all", "reps": 0,
                             "time_s": None, "peak_mem_bytes": None, "pearson": None,
                             "spearman": None, "error": why})
    path = RESULTS / "peers.json"
    if merge and path.exists():
        new = {(r["problem"], r["library"], r["method"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())
                if (r["problem"], r["library"], r["method"]) not in new] + rows
    order = {p: i for i, p in enumerate(PROBLEMS)}
    lib_order = {lib: i for i, lib in enumerate(LIBRARIES)}
    rows.sort(key=lambda r: (order.get(r["problem"], 9), lib_order.get(r["library"], 9),
                             r["method"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "peers.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
