"""Solver benchmark: time, peak memory and accuracy of each inverse-HVP solver.

    python benchmarks/solvers.py --out benchmarks/results
    python benchmarks/solvers.py --problems digits-mlp --solvers lissa-batch64  # rows replaced

For the digits MLP and a Fashion-MNIST CNN (5,000 training images), curvature on the same
fixed random subset of CURVATURE_POINTS training points for every solver, GGN, damping 0.01 +
the training weight decay, float64: each solver is fitted once and solves RHS test-gradient
right-hand sides. Error is
‖v − v_ref‖/‖v_ref‖ against the dense direct solve. LiSSA's overhead ratio is its solve wall time
divided by (number of curvature-vector products × the time of one bare product).
Writes solvers.json and solvers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import repif
from repif import datasets, io, training
from repif.studies.resources import measure

DAMPING = 0.01
WEIGHT_DECAY = 1e-3
RHS = 5  # test gradients solved per solver
#: Fixed random curvature subset: large enough that no solver is trivial, small enough that the
#: dense reference (m·C × p factor, p × p Gram) takes seconds on 2 cores.
CURVATURE_POINTS = 256

SOLVERS = {
    "direct": {},
    "woodbury": {},
    "cg": {"tol": 1e-8, "max_iter": 5000},
    "lissa": {"depth": 5000, "tol": 1e-8},
    "lissa-batch64": {"depth": 2000, "solver_options": {"batch_size": 64}, "repeats": 2,
                      "tol": 0.0},
    "arnoldi": {"rank": 100},
    "identity": {},
}


def digits_mlp(cache: Path) -> tuple:
    digits = datasets.load("digits")
    mlp = training.load_or_train(digits, "mlp", seed=0, weight_decay=WEIGHT_DECAY,
                                 cache_dir=cache).double()
    return mlp, digits, CURVATURE_POINTS


def fashion_cnn(cache: Path) -> tuple:
    fashion = datasets.load("fashion-mnist", limit_train=5000, limit_test=500)
    cnn = training.load_or_train(fashion, "cnn", seed=0, epochs=10, lr=3e-3,
                                 weight_decay=WEIGHT_DECAY, cache_dir=cache).double()
    return cnn, fashion, CURVATURE_POINTS


#: Problem name → builder (model, data, curvature points), built only when selected.
PROBLEMS = {"digits-mlp": digits_mlp, "fashion-cnn": fashion_cnn}


def overhead_ratio(est: repif.InfluenceEstimator, g: torch.Tensor, steps: int = 200) -> dict:
    """LiSSA's wall time for ``steps`` fixed steps over (steps × one bare product), with bare
    products timed right before and right after (the mean of both), so load drift cancels."""
    solver, op = est.solver, est.solver.operator
    if solver.batch_size is not None:
        b = solver.batch_size
        op = op.restrict(torch.arange(b), torch.full((b,), 1.0 / b))
    v = g[0].clone()
    op.matvec(v)

    def bare() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            op.matvec(v)
        return (time.perf_counter() - t) / steps

    depth, tol = solver.depth, solver.tol
    solver.depth, solver.tol = steps, 0.0
    before = bare()
    solver.steps_taken.clear()
    t = time.perf_counter()
    solver.solve(g[:1])
    lissa = time.perf_counter() - t
    after = bare()
    solver.depth, solver.tol = depth, tol
    per_product = (before + after) / 2
    return {"overhead_steps": steps, "bare_product_s": per_product,
            "overhead_ratio": lissa / (sum(solver.steps_taken) * per_product)}


def run(cache: Path, problems: list[str], solvers: list[str]) -> list[dict]:
    rows = []
    for pname in problems:
        model, ds, m = PROBLEMS[pname](cache)
        x, y = ds.train[0].double(), ds.train[1]
        test = (ds.test[0][:RHS].double(), ds.test[1][:RHS])
        kw = dict(damping=DAMPING, weight_decay=WEIGHT_DECAY, curvature="ggn",
                  sampler="random", sample_size=m, seed=0)
        ref_est = repif.InfluenceEstimator(model, (x, y), solver="direct", **kw)
        g = ref_est.test_gradients(test)
        v_ref = ref_est.inverse_hvp(g)
        for sname in solvers:
            opts = SOLVERS[sname]
            solver = sname.split("-")[0]
            est = repif.InfluenceEstimator(model, (x, y), solver=solver, **kw, **opts)
            with measure() as fit_m:
                est.fit()
            with measure() as solve_m:
                v = est.inverse_hvp(g)
            err = float((v - v_ref).norm() / v_ref.norm())
            row = {"problem": pname, "solver": sname, "options": opts,
                   "num_params": est.num_params, "curvature_points": len(est.subset),
                   "fit_s": fit_m.time_s, "solve_s_per_vector": solve_m.time_s / RHS,
                   "time_per_ihvp_s": (fit_m.time_s + solve_m.time_s) / RHS,
                   "peak_mem_bytes": max(fit_m.peak_mem_bytes, solve_m.peak_mem_bytes),
                   "rel_error": err}
            if solver == "lissa":
                row.update(products=sum(est.solver.steps_taken), **overhead_ratio(est, g))
            print(json.dumps({k: v for k, v in row.items() if k != "options"}))
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| problem | solver | params | curvature pts | fit s | solve s / vector | "
             "peak MB | rel. error | LiSSA overhead |", "|" + "---|" * 9]
    for r in rows:
        oh = f"{r['overhead_ratio']:.2f}" if "overhead_ratio" in r else ""
        lines.append(f"| {r['problem']} | {r['solver']} | {r['num_params']} | "
                     f"{r['curvature_points']} | {r['fit_s']:.3f} | {r['solve_s_per_vector']:.4f}"
                     f" | {r['peak_mem_bytes'] / 2**20:.1f} | {r['rel_error']:.2e} | {oh} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".repif-cache")
    ap.add_argument("--problems", default=",".join(PROBLEMS),
                    help=f"comma-separated subset of {', '.join(PROBLEMS)}")
    ap.add_argument("--solvers", default=",".join(SOLVERS),
                    help=f"comma-separated subset of {', '.join(SOLVERS)}; rows of a partial "
                         "run replace their namesakes in an existing solvers.json")
    args = ap.parse_args()
    problems, solvers = args.problems.split(","), args.solvers.split(",")
    for name, known in ((problems, PROBLEMS), (solvers, SOLVERS)):
        bad = sorted(set(name) - set(known))
        if bad:
            ap.error(f"unknown {', '.join(bad)}; known: {', '.join(known)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fresh = run(Path(args.cache), problems, solvers)
    done = {(r["problem"], r["solver"]) for r in fresh}
    old = out / "solvers.json"
    prev = json.loads(old.read_text()) if old.exists() else {}
    kept = [r for r in prev.get("rows", []) if (r["problem"], r["solver"]) not in done]
    order = {(p, s): i for i, (p, s) in enumerate(
        (p, s) for p in PROBLEMS for s in SOLVERS)}
    rows = sorted(kept + fresh, key=lambda r: order.get((r["problem"], r["solver"]), len(order)))
    io.write_json_atomic(out / "solvers.json", {
        **{k: v for k, v in prev.items() if k == "incomplete"},
        "damping": DAMPING, "weight_decay": WEIGHT_DECAY, "rhs": RHS,
        "threads": torch.get_num_threads(), "environment": io.environment_metadata(),
        "rows": rows})
    note = f"\n{prev['incomplete']}\n" if "incomplete" in prev else ""
    (out / "solvers.md").write_text(markdown(rows) + note)
    print(markdown(rows))


if __name__ == "__main__":
    main()
