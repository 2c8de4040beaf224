"""K-FAC / EK-FAC fitted on sampled subsets: accuracy, time, and the preconditioner.

    python benchmarks/ekfac.py                     # both problems, ≈ 10 min on 2 busy cores
    python benchmarks/ekfac.py --quick             # smoke run (digits, m = 64), into a temp dir
    python benchmarks/ekfac.py --kronfluence PY    # also run kronfluence's EK-FAC with python PY

Problems (float64, one torch thread, GGN, weight decay 1e-3 in the curvature):

* ``digits-mlp``: the library's digits MLP (4,810 parameters), pool = its 1,437 training points,
  damping λ = 0.01;
* ``fashion-cnn``: the small CNN with an 8-wide penultimate layer (3,394 parameters) on 1,000
  Fashion-MNIST training images (the peers benchmark's problem), λ = 0.1;
* ``digits-linear-scaled``: softmax regression (650 parameters) on the digits with each feature
  rescaled by a factor between 10^-1 and 10^1 — badly scaled inputs, the ill-conditioning a
  K-FAC preconditioner removes (its A factor whitens each layer's inputs), λ = 0.01.

Q test points are scored against N fixed training columns: score[t, j] = −∇l_tᵀ V ∇l_j with
V = (C + λI)⁻¹ for each method. For every sampler (random, logit-importance), m and seed:

* ``ekfac`` / ``kfac`` (solver "eigen", exact GGN factors, fitted on the subset with the
  sampler's weights) against ``subset`` — the exact GGN solve on the same subset (CG to a
  relative residual of 1e-10 on digits, the dense direct solve on the CNN) — and against
  ``full`` — the exact GGN solve on the whole pool: mean over the Q queries of the row-wise
  Pearson and Spearman correlations, and ‖V − V_ref‖/‖V_ref‖;
* fit time (sampling with its pool pass, the factors and eigendecompositions) and solve time
  per query;
* the iterations CG and LiSSA (whole subset per step, scale "auto") take until every one of
  ``rhs`` right-hand sides is within relative error 1e-3 of the exact subset solve, with and
  without ``preconditioner="ekfac"`` (capped: a count at the cap means "not reached"); on the
  CNN only CG at m ≤ 256 (its products are slow on the CPU).

Full-pool rows: EK-FAC with exact and with sampled-label factors, K-FAC, and (``--kronfluence``)
kronfluence's EK-FAC on the same model, pool, queries and columns, in its own process: factors
from labels sampled from the model (``use_empirical_fisher=False``), all its dtypes float64,
``damping_factor`` = λ + wd (absolute, added to the eigenvalues: repif's (Λ + wd + λ)⁻¹).
Writes ``ekfac.json`` and ``ekfac.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

import repif
from repif import datasets, io, models, training

WEIGHT_DECAY = 1e-3
TARGET = 1e-3  # relative error of the inverse-HVP for the iteration counts
SAMPLERS = ("random", "logit-importance")
PROBLEMS = {
    # exact: the solver of the exact references (CG to a relative residual of 1e-10, or the
    # dense direct solve where the model's products are slow); iteration counts (first seed
    # only) at ``iteration_sizes`` for ``iterated`` solvers, ``rhs`` right-hand sides, capped.
    "digits-mlp": dict(damping=0.01, sizes=(64, 256, 1024), seeds=(0, 1), queries=20,
                       columns=300, exact="cg", iteration_sizes=(64, 256, 1024),
                       iterated=("cg", "lissa"), rhs=4, cg_cap=500, lissa_cap=3000),
    # a CNN product over 1,000 points takes ≈ 2.3 s for 2 vectors here, so only CG is
    # counted, on the smaller subsets
    "fashion-cnn": dict(damping=0.1, sizes=(64, 256, 1000), seeds=(0,), queries=10,
                        columns=200, exact="direct", iteration_sizes=(64, 256),
                        iterated=("cg",), rhs=1, cg_cap=200, lissa_cap=0),
    # where the preconditioner is meant to pay: softmax regression on digits whose features are
    # rescaled by 10^-1 … 10^1 (badly scaled inputs; K-FAC's A factor whitens them)
    "digits-linear-scaled": dict(damping=0.01, sizes=(256, 1024), seeds=(0,), queries=20,
                                 columns=300, exact="cg", iteration_sizes=(256, 1024),
                                 iterated=("cg", "lissa"), rhs=4, cg_cap=500, lissa_cap=2000),
}


def exact_options(cfg: dict) -> dict:
    return dict(tol=1e-10, max_iter=5000) if cfg["exact"] == "cg" else {}


def problem(name: str, cache: Path):
    if name == "digits-mlp":
        ds = datasets.load("digits")
        model = training.load_or_train(ds, "mlp", seed=0, weight_decay=WEIGHT_DECAY,
                                       cache_dir=cache)
    elif name == "digits-linear-scaled":
        ds = datasets.load("digits")
        scale = torch.logspace(-1, 1, 64, dtype=torch.float64)
        scale = scale[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
        train = (ds.train[0].double().flatten(1) * scale, ds.train[1])
        test = (ds.test[0].double().flatten(1) * scale, ds.test[1])
        model = repif.train(models.build("linear", ds).double(), train, epochs=30,
                            weight_decay=WEIGHT_DECAY, seed=0, cache_dir=cache)
        return model.double().eval(), train, test
    else:
        ds = datasets.load("fashion-mnist", limit_train=1000, limit_test=200)
        model = training.load_or_train(ds, "cnn", seed=0, epochs=10, lr=3e-3,
                                       weight_decay=WEIGHT_DECAY, hidden=8, cache_dir=cache)
    train = (ds.train[0].double(), ds.train[1])
    return model.double().eval(), train, (ds.test[0].double(), ds.test[1])


# --------------------------------------------------------------------------- metrics
def correlations(scores: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean over query rows of Pearson and Spearman, and the overall Pearson."""
    a, b = scores.numpy(), ref.numpy()
    pear = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]
    spear = [np.corrcoef(rankdata(x), rankdata(y))[0, 1] for x, y in zip(a, b, strict=True)]
    return {"pearson": float(np.mean(pear)), "spearman": float(np.mean(spear)),
            "pearson_all": float(np.corrcoef(a.ravel(), b.ravel())[0, 1])}


def rel(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v - ref).norm() / ref.norm())


class Problem:
    def __init__(self, name: str, cache: Path, quick: bool) -> None:
        self.name, self.cfg = name, dict(PROBLEMS[name])
        if quick:
            self.cfg.update(sizes=(64,), seeds=(0,), queries=5, columns=50, cg_cap=200,
                            lissa_cap=300)
        self.model, self.train, test = problem(name, cache)
        c = self.cfg
        q = torch.arange(c["queries"])
        self.test = (test[0][q], test[1][q])
        gen = torch.Generator().manual_seed(0)
        self.columns = torch.randperm(len(self.train[1]), generator=gen)[: c["columns"]]
        base = self.estimator("cg")
        self.gq = base.test_gradients(self.test)  # (Q, p)
        self.gt = base.train_gradients(self.columns)  # (N, p)
        self.num_params = base.num_params
        for kind in ("ekfac", "kfac"):  # warm up (lazy initialisations) before timing
            self.estimator("eigen", "random", 16, curvature=kind).fit()

    def estimator(self, solver: str, sampler: str = "random", m: int | None = None,
                  seed: int = 0, **kw) -> repif.InfluenceEstimator:
        return repif.InfluenceEstimator(
            self.model, self.train, damping=self.cfg["damping"], weight_decay=WEIGHT_DECAY,
            solver=solver, sampler=sampler, sample_size=m, seed=seed, **kw)

    def scores(self, v: torch.Tensor) -> torch.Tensor:
        return -(v @ self.gt.T)

    def run(self, est: repif.InfluenceEstimator, score: bool = False) -> dict:
        """Fit, solve the Q query gradients; times and the solutions. With ``score``, also the
        time of ``influence`` (query gradients, solves, the N training gradients) per query,
        which is what kronfluence's pairwise-score time covers."""
        t = time.perf_counter()
        est.fit()
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        v = est.inverse_hvp(self.gq)
        solve_s = time.perf_counter() - t
        out = {"fit_s": fit_s, "solve_s_per_query": solve_s / len(self.gq), "v": v,
               "timings": dict(est.timings)}
        if score:
            t = time.perf_counter()
            est.influence(self.test, train_indices=self.columns)
            out["score_s_per_query"] = (time.perf_counter() - t) / len(self.gq)
        return out


def iterations(p: Problem, solver: str, sampler: str, m: int | None, seed: int,
               v_ref: torch.Tensor, pre: str | None) -> dict:
    """Iterations until every right-hand side is within TARGET of ``v_ref`` (CG or LiSSA over
    the whole subset per step), with or without the EK-FAC preconditioner."""
    k = v_ref.shape[0]
    hit = [None] * k
    ref_norm = v_ref.norm(dim=1)

    def monitor(it: int, x: torch.Tensor) -> bool:
        err = (x - v_ref).norm(dim=1) / ref_norm
        for i in range(k):
            if hit[i] is None and float(err[i]) <= TARGET:
                hit[i] = it
        return all(h is not None for h in hit)

    cap = p.cfg["cg_cap"] if solver == "cg" else p.cfg["lissa_cap"]
    opts = dict(tol=1e-14, max_iter=cap) if solver == "cg" else dict(tol=0.0, depth=cap)
    est = p.estimator(solver, sampler, m, seed, preconditioner=pre, monitor=monitor, **opts)
    t = time.perf_counter()
    est.fit()
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CG at max_iter
        est.inverse_hvp(p.gq[:k])
    solve_s = time.perf_counter() - t
    reached = all(h is not None for h in hit)
    return {"iterations": max(h for h in hit) if reached else cap, "reached": reached,
            "fit_s": fit_s, "solve_s": solve_s,
            "scale": getattr(est.solver, "scale", None)}


# --------------------------------------------------------------------------- the grid
def run_problem(p: Problem, kron_python: str | None, log) -> dict:
    c = p.cfg
    rows: list[dict] = []
    t0 = time.perf_counter()
    full = p.run(p.estimator(c["exact"], **exact_options(c)))
    v_full = full.pop("v")
    s_full = p.scores(v_full)
    pool = len(p.train[1])
    log(f"{p.name}: {p.num_params} parameters, pool {pool}, full-pool exact solve "
        f"{full['fit_s'] + full['solve_s_per_query'] * len(p.gq):.1f} s")
    ref_rows = {"problem": p.name, "method": "full-exact", "sampler": "full", "m": pool,
                "seed": 0, **{k: v for k, v in full.items() if k != "timings"}}
    rows.append(ref_rows)
    # full-pool Kronecker fits
    for method, kw in [("ekfac", {}), ("ekfac-sampled", {"fisher": "sampled"}),
                       ("kfac", {})]:
        kind = method.split("-")[0]
        r = p.run(p.estimator("eigen", curvature=kind, kronecker_options=kw or None),
                  score=True)
        v = r.pop("v")
        rows.append({"problem": p.name, "method": method, "sampler": "full", "m": pool,
                     "seed": 0, **r, "vs_full": correlations(p.scores(v), s_full),
                     "rel_error_full": rel(v, v_full)})
        log(f"  full {method}: fit {r['fit_s']:.2f} s, vs full "
            f"{rows[-1]['vs_full']['pearson']:.3f}")
    if kron_python:
        rows.append(kronfluence_row(p, kron_python, s_full, log))
    for sampler in SAMPLERS:
        for m in c["sizes"]:
            for seed in c["seeds"]:
                exact = p.run(p.estimator(c["exact"], sampler, m, seed, **exact_options(c)))
                v_sub = exact.pop("v")
                s_sub = p.scores(v_sub)
                key = {"problem": p.name, "sampler": sampler, "m": m, "seed": seed}
                rows.append({**key, "method": "subset-exact", **exact,
                             "vs_full": correlations(s_sub, s_full),
                             "rel_error_full": rel(v_sub, v_full)})
                for kind in ("ekfac", "kfac"):
                    r = p.run(p.estimator("eigen", sampler, m, seed, curvature=kind),
                              score=True)
                    v = r.pop("v")
                    s = p.scores(v)
                    rows.append({**key, "method": kind, **r,
                                 "vs_subset": correlations(s, s_sub),
                                 "vs_full": correlations(s, s_full),
                                 "rel_error_subset": rel(v, v_sub),
                                 "rel_error_full": rel(v, v_full)})
                k = c["rhs"]
                counted = m in c["iteration_sizes"] and seed == c["seeds"][0]
                for solver in c["iterated"] if counted else ():
                    for pre in (None, "ekfac"):
                        it = iterations(p, solver, sampler, m, seed, v_sub[:k], pre)
                        rows.append({**key, "method": f"{solver}-iterations",
                                     "preconditioner": pre, **it})
                last = [r for r in rows if r.get("m") == m and r.get("sampler") == sampler
                        and r.get("seed") == seed]
                summary = {r["method"] + ("+" + r["preconditioner"] if r.get("preconditioner")
                                          else ""): r for r in last}
                its = ", ".join(
                    f"{s} {summary[s + '-iterations']['iterations']} → "
                    f"{summary[s + '-iterations+ekfac']['iterations']}"
                    for s in ("cg", "lissa") if s + "-iterations" in summary)
                log(f"  {sampler} m={m} seed={seed}: ekfac vs subset "
                    f"{summary['ekfac']['vs_subset']['pearson']:.3f} / full "
                    f"{summary['ekfac']['vs_full']['pearson']:.3f}, subset-exact vs full "
                    f"{summary['subset-exact']['vs_full']['pearson']:.3f}; {its} "
                    f"({time.perf_counter() - t0:.0f} s)")
    return {"num_params": p.num_params, "pool": pool, "config": c, "rows": rows}


# --------------------------------------------------------------------------- kronfluence
def kronfluence_row(p: Problem, python: str, s_full: torch.Tensor, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "problem.pt"
        torch.save({"model": p.model, "train": p.train, "test": p.test, "columns": p.columns,
                    "damping": p.cfg["damping"] + WEIGHT_DECAY}, src)
        out = Path(tmp) / "scores.pt"
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([python, __file__, "--kronfluence-worker", str(src), str(out)],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            log(f"  kronfluence failed: {proc.stderr[-2000:]}")
            return {"problem": p.name, "method": "kronfluence-ekfac", "error":
                    proc.stderr[-2000:]}
        res = torch.load(out)
    row = {"problem": p.name, "method": "kronfluence-ekfac", "sampler": "full (in order)",
           "m": len(p.train[1]), "seed": 0, "fit_s": res["fit_s"],
           "score_s_per_query": res["score_s"] / len(p.gq),
           "vs_full": correlations(res["scores"], s_full), "version": res["version"]}
    log(f"  kronfluence ekfac: fit {row['fit_s']:.2f} s, vs full {row['vs_full']['pearson']:.3f}")
    return row


def kronfluence_worker(src: str, out: str) -> None:
    """Runs in kronfluence's environment: EK-FAC factors on the whole pool, pairwise scores of
    the queries against the columns, repif's sign (negative = proponent)."""
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prob = torch.load(src, weights_only=False)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's predictive
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    def f64(cls, **kw):
        names = {f.name for f in dataclasses.fields(cls)}
        kw.update({n: torch.float64 for n in names if n.endswith("dtype")
                   and n != "amp_dtype"})
        return cls(**kw)

    task = Classification()
    model = prepare_model(prob["model"], task)
    x, y = prob["train"]
    cols = prob["columns"]
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("ekfac", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        an.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        t = time.perf_counter()
        an.fit_all_factors("factors", TensorDataset(x, y), per_device_batch_size=256,
                           factor_args=f64(FactorArguments, strategy="ekfac",
                                           use_empirical_fisher=False))
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        an.compute_pairwise_scores(
            "scores", "factors", query_dataset=TensorDataset(*prob["test"]),
            train_dataset=TensorDataset(x[cols], y[cols]),
            per_device_query_batch_size=len(prob["test"][1]), per_device_train_batch_size=256,
            score_args=f64(ScoreArguments, damping_factor=prob["damping"]))
        score_s = time.perf_counter() - t
        scores = an.load_pairwise_scores("scores")["all_modules"]
    import kronfluence

    torch.save({"scores": -scores.double(), "fit_s": fit_s, "score_s": score_s,
                "version": getattr(kronfluence, "__version__", "?")}, out)


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = []
    for name, res in results["problems"].items():
        cfg = res["config"]
        lines += [f"## {name} ({res['num_params']:,} parameters, pool {res['pool']:,}, "
                  f"λ = {cfg['damping']}, wd = {WEIGHT_DECAY}; {cfg['queries']} queries × "
                  f"{cfg['columns']} training columns)", "",
                  "Scores against the exact solves: mean row-wise Pearson / Spearman, and "
                  "‖V − V_full‖/‖V_full‖. `subset` = the exact GGN solve on the same subset, "
                  "`full` = on the whole pool. Fit: sampling (with its pool pass) and the "
                  "factors or solver preparation. Solve: (C + λI)⁻¹ of the query gradients. "
                  "Score: `influence` of the queries against the training columns (gradients, "
                  "solves, products; kronfluence's pairwise-score time). Means over seeds; "
                  "times on a shared, loaded machine.", "",
                  "| method | sampler | m | vs subset P / S | vs full P / S | rel. err. full | "
                  "fit s | solve ms / query | score ms / query |", "|" + "---|" * 9]
        groups: dict[tuple, list[dict]] = {}
        for r in res["rows"]:
            if "error" in r or r["method"].endswith("iterations"):
                continue
            groups.setdefault((r["method"], r["sampler"], r["m"]), []).append(r)
        for (method, sampler, m), rs in groups.items():
            def mean(path, rs=rs):
                vals = [r[path[0]][path[1]] if len(path) == 2 else r[path[0]] for r in rs
                        if path[0] in r]
                return float(np.mean(vals)) if vals else None

            def pair(key):
                a, b = mean((key, "pearson")), mean((key, "spearman"))
                return "—" if a is None else f"{a:.3f} / {b:.3f}"

            def ms(key):
                v = mean((key,))
                return "—" if v is None else f"{1e3 * v:.2f}"

            err = mean(("rel_error_full",))
            lines.append(
                f"| {method} | {sampler} | {m} | {pair('vs_subset')} | {pair('vs_full')} | "
                f"{'—' if err is None else f'{err:.3f}'} | {mean(('fit_s',)):.2f} | "
                f"{ms('solve_s_per_query')} | {ms('score_s_per_query')} |")
        lines += ["", f"Iterations until every right-hand side is within {TARGET:g} of the "
                  "exact subset solve (max over the right-hand sides; mean over seeds; "
                  "`>N`: not reached by the cap). LiSSA: whole subset per step, scale auto.", "",
                  "| sampler | m | CG | CG + EK-FAC | LiSSA | LiSSA + EK-FAC | CG s | CG+EK-FAC s"
                  " (fit + solve) |", "|" + "---|" * 8]
        its: dict[tuple, dict] = {}
        for r in res["rows"]:
            if r["method"].endswith("iterations"):
                key = (r["sampler"], r["m"])
                name_ = r["method"].split("-")[0] + ("+" if r["preconditioner"] else "")
                its.setdefault(key, {}).setdefault(name_, []).append(r)

        def cell(rs):
            if not rs:
                return "not run"
            n = float(np.mean([r["iterations"] for r in rs]))
            return f"{n:.0f}" if all(r["reached"] for r in rs) else f">{n:.0f}"

        for (sampler, m), d in its.items():
            d = {k: d.get(k, []) for k in ("cg", "cg+", "lissa", "lissa+")}
            cg_s = np.mean([r["fit_s"] + r["solve_s"] for r in d["cg"]] or [np.nan])
            pcg_s = np.mean([r["fit_s"] + r["solve_s"] for r in d["cg+"]] or [np.nan])
            lines.append(f"| {sampler} | {m} | {cell(d['cg'])} | {cell(d['cg+'])} | "
                         f"{cell(d['lissa'])} | {cell(d['lissa+'])} | {cg_s:.2f} | "
                         f"{pcg_s:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".repif-cache")
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kronfluence", default=None, metavar="PYTHON",
                    help="python of an environment with kronfluence (and torch 2.13.0)")
    ap.add_argument("--kronfluence-worker", nargs=2, metavar=("SRC", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kronfluence_worker:
        kronfluence_worker(*args.kronfluence_worker)
        return
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp()) if args.quick else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.problems.split(",") if n]
    if args.quick:
        names = names[:1]
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = {"target": TARGET, "weight_decay": WEIGHT_DECAY, "samplers": list(SAMPLERS),
               "threads": torch.get_num_threads(), "environment": io.environment_metadata(),
               "problems": {}}
    for name in names:
        results["problems"][name] = run_problem(Problem(name, Path(args.cache), args.quick),
                                                args.kronfluence, log)
    results["wall_s"] = time.perf_counter() - start
    io.write_json_atomic(out / "ekfac.json", results)
    (out / "ekfac.md").write_text(
        f"# K-FAC / EK-FAC on sampled subsets\n\n`python benchmarks/ekfac.py"
        f"{' --kronfluence PY' if args.kronfluence else ''}` — {results['wall_s'] / 60:.1f} min "
        f"on {torch.get_num_threads()} thread(s).\n\n" + markdown(results))
    log(f"wrote {out / 'ekfac.json'} and {out / 'ekfac.md'} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
