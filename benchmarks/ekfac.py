"""K-FAC / EK-FAC fitted on sampled subsets: accuracy, time, and the preconditioner.

    python benchmarks/ekfac.py                     # both problems, ≈ 10 min on 2 busy cores
    python benchmarks/ekfac.py --quick             # smoke run (digits, m = 64), into a temp dir
    python benchmarks/ekfac.py --kronfluence PY    # also run kronfluence's EK-FAC with python PY
    python benchmarks/ekfac.py --problems resnet18-16 --data-dir DIR --kronfluence PY
                                                   # ResNet-18 on MNIST, ≈ 25 min; merged into
                                                   # the existing ekfac.json / ekfac.md

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
* ``ekfac-basis``: EK-FAC with its eigenbasis fitted on the whole pool and its eigenvalues
  on the subset (``kronecker_options={"basis_size": "pool"}``), scored the same way; and per
  seed at m = 256, every EK-FAC fit's Pearson against the exact full-pool solve beside
  kronfluence's full-pool EK-FAC's (the goal: at least as close, on every seed);
* fit time (sampling with its pool pass, the factors and eigendecompositions) and solve time
  per query;
* the iterations CG and LiSSA (whole subset per step, scale "auto") take until every one of
  ``rhs`` right-hand sides is within relative error 1e-3 of the exact subset solve, with and
  without ``preconditioner="ekfac"`` (capped: a count at the cap means "not reached"); on the
  CNN only CG at m ≤ 256 (its products are slow on the CPU).

Full-pool rows: EK-FAC with exact and with sampled-label factors (six label draws: how far
one draw moves the scores, kronfluence's being one), K-FAC, and (``--kronfluence``)
kronfluence's EK-FAC on the same model, pool, queries and columns, in its own process: factors
from labels sampled from the model (``use_empirical_fisher=False``), all its dtypes float64,
``damping_factor`` = λ + wd (absolute, added to the eigenvalues: repif's (Λ + wd + λ)⁻¹).

``resnet18-16`` (run only when named in ``--problems``; ``--data-dir``: the MNIST IDX files):
ResNet-18 of width 16 trained on full MNIST (``benchmarks/train_resnet18.py``: 701,178
parameters), float32, pool = the first 10,000 training images, λ = 0.01. Its BatchNorm layers are
frozen (``requires_grad=False``: every method — repif, kronfluence, the exact solve — then works on
the same 698,778 Conv2d/Linear parameters; ``kronecker_options={"other_layers": "frozen"}``), and
the factors use ``fisher="sampled"`` (one backward per point, labels drawn from the model, as
kronfluence does; the exact output Hessian takes 10 backward passes per point, ≈ 5× the fit time),
with ``max_memory`` = 1 GiB (the fit's chunks; larger chunks ran slower on this CPU).
No exact full-pool solve fits on a CPU at this size, so the references are fits of the same
estimator on the whole pool — repif's EK-FAC and kronfluence's EK-FAC (float32, its default
dtypes) — plus, time permitting, the exact GGN solve on the m = 256 subsets (CG, capped in time;
the relative residual reached is reported). Each row also records its peak RSS growth (the
process's resident memory polled during the fit, above its level before it). Rows and their
score matrices are written as they finish (scores to ``benchmarks/cache/``); ``--resume`` keeps
the rows of an interrupted run (and its skips for time) and measures the rest. CG iteration
counts are not measured here (see the section's notes).

Writes ``ekfac.json`` and ``ekfac.md`` to ``--out``, replacing only the problems run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

import repif
from repif import datasets, io, models, training

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _memory import PeakRSS  # noqa: E402

WEIGHT_DECAY = 1e-3
TARGET = 1e-3  # relative error of the inverse-HVP for the iteration counts
SAMPLERS = ("random", "logit-importance")
#: The Kronecker fits on each subset: (row name, curvature, kronecker_options). ``ekfac-basis``
#: takes its eigenbasis from the whole pool and only its eigenvalues from the subset.
SUBSET_FITS = (("ekfac", "ekfac", None), ("kfac", "kfac", None),
               ("ekfac-basis", "ekfac", {"basis_size": "pool"}))
PROBLEMS = {
    # exact: the solver of the exact references (CG to a relative residual of 1e-10, or the
    # dense direct solve where the model's products are slow); iteration counts (first seed
    # only) at ``iteration_sizes`` for ``iterated`` solvers, ``rhs`` right-hand sides, capped.
    "digits-mlp": dict(damping=0.01, sizes=(64, 256, 1024), seeds=(0, 1, 2), queries=20,
                       columns=300, exact="cg", iteration_sizes=(64, 256, 1024),
                       iterated=("cg", "lissa"), rhs=4, cg_cap=500, lissa_cap=3000),
    # a CNN product over 1,000 points takes ≈ 2.3 s for 2 vectors here, so only CG is
    # counted, on the smaller subsets
    "fashion-cnn": dict(damping=0.1, sizes=(64, 256, 1000), seeds=(0, 1, 2), queries=10,
                        columns=200, exact="direct", iteration_sizes=(64, 256),
                        iterated=("cg",), rhs=1, cg_cap=200, lissa_cap=0),
    # where the preconditioner is meant to pay: softmax regression on digits whose features are
    # rescaled by 10^-1 … 10^1 (badly scaled inputs; K-FAC's A factor whitens them)
    "digits-linear-scaled": dict(damping=0.01, sizes=(256, 1024), seeds=(0, 1, 2),
                                 queries=20,
                                 columns=300, exact="cg", iteration_sizes=(256, 1024),
                                 iterated=("cg", "lissa"), rhs=4, cg_cap=500, lissa_cap=2000),
}


#: The subset size of the issue's per-seed comparison with kronfluence's full-pool EK-FAC.
GOAL_M = 256
#: Label draws of the full-pool sampled-Fisher EK-FAC (the seed drives the draws).
LABEL_DRAWS = 6

#: The ResNet-18 problem: Kronecker fits on subsets of a 10,000-image pool, against full-pool fits
#: (repif's and kronfluence's) and, where time is left, the exact GGN solve on the m = 256 subsets.
RESNET = "resnet18-16"
REFERENCE_PROBLEMS = {
    RESNET: dict(damping=0.01, width=16, epochs=2, pool=10_000, sizes=(256, 1024, 4096),
                 seeds=(0,), queries=10, columns=500, fisher="sampled", dtype="float32",
                 # repif's memory budget (max_memory): the fit's chunks; larger chunks ran
                 # slower here (600 points: 16 s at 1–2 GiB, 42 s at the default quarter of RAM)
                 max_memory=2**30,
                 # subset fits are skipped when their estimated time (the slowest per-point
                 # fit time so far × m) would pass budget_s
                 # the exact subset solve: CG on these m, stopped after cg_time_s seconds each
                 # (residual reported), skipped when less than that is left of budget_s
                 exact_sizes=(256,), cg_time_s=150, cg_cap=100, budget_s=1500),
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

    def run(self, est: repif.InfluenceEstimator, score: bool = False,
            memory: bool = False) -> dict:
        """Fit, solve the Q query gradients; times and the solutions. With ``score``, also the
        time of ``influence`` (query gradients, solves, the N training gradients) per query,
        which is what kronfluence's pairwise-score time covers. With ``memory``, the fit's
        peak RSS growth."""
        mem = PeakRSS() if memory else None
        t = time.perf_counter()
        if mem is not None:
            with mem:
                est.fit()
        else:
            est.fit()
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        v = est.inverse_hvp(self.gq)
        solve_s = time.perf_counter() - t
        out = {"fit_s": fit_s, "solve_s_per_query": solve_s / len(self.gq), "v": v,
               "timings": dict(est.timings)}
        if mem is not None:
            out["fit_peak_rss_growth_bytes"] = mem.growth
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
    # full-pool Kronecker fits; the sampled-label fit once per label draw (kronfluence's
    # EK-FAC is one such draw: the spread says how far one draw moves the scores)
    fits = [("ekfac", {}, 0), *[("ekfac-sampled", {"fisher": "sampled"}, seed)
                                 for seed in range(LABEL_DRAWS)], ("kfac", {}, 0)]
    for method, kw, seed in fits:
        kind = method.split("-")[0]
        r = p.run(p.estimator("eigen", seed=seed, curvature=kind,
                              kronecker_options=kw or None), score=True)
        v = r.pop("v")
        rows.append({"problem": p.name, "method": method, "sampler": "full", "m": pool,
                     "seed": seed, **r, "vs_full": correlations(p.scores(v), s_full),
                     "rel_error_full": rel(v, v_full)})
        log(f"  full {method} (seed {seed}): fit {r['fit_s']:.2f} s, vs full "
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
                for method, kind, kw in SUBSET_FITS:
                    r = p.run(p.estimator("eigen", sampler, m, seed, curvature=kind,
                                          kronecker_options=kw), score=True)
                    v = r.pop("v")
                    s = p.scores(v)
                    rows.append({**key, "method": method, **r,
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


# --------------------------------------------------------------------------- ResNet-18
class ReferenceProblem(Problem):
    """ResNet-18 on MNIST (``REFERENCE_PROBLEMS``): float32, BatchNorm frozen, Kronecker fits
    with ``fisher`` from the config and ``other_layers="frozen"``."""

    def __init__(self, name: str, data_dir: str | None, quick: bool) -> None:
        if not data_dir:
            raise SystemExit(f"{name} needs --data-dir (the four MNIST IDX files)")
        self.name, self.cfg = name, dict(REFERENCE_PROBLEMS[name])
        if quick:
            self.cfg.update(pool=600, sizes=(64, 128), queries=3, columns=40,
                            exact_sizes=(64,), cg_time_s=20, cg_cap=5, budget_s=900)
        c = self.cfg
        sys.path.insert(0, str(HERE))
        from train_resnet18 import trained

        model = trained(data_dir, c["width"], c["epochs"]).eval()
        self.num_params_model = sum(q.numel() for q in model.parameters())
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.requires_grad_(False)
        ds = datasets.load("mnist", data_dir=data_dir)
        self.model = model
        self.train = (ds.train[0][: c["pool"]], ds.train[1][: c["pool"]])
        self.test = (ds.test[0][: c["queries"]], ds.test[1][: c["queries"]])
        gen = torch.Generator().manual_seed(0)
        self.columns = torch.randperm(c["pool"], generator=gen)[: c["columns"]]
        self.kron = {"other_layers": "frozen", "fisher": c["fisher"]}
        base = self.estimator("cg")
        self.gq = base.test_gradients(self.test)  # (Q, p)
        self.gt = base.train_gradients(self.columns)  # (N, p)
        self.num_params = base.num_params
        self.estimator("eigen", "random", 16, curvature="ekfac").fit()  # warm-up

    def estimator(self, solver: str, sampler: str = "random", m: int | None = None,
                  seed: int = 0, **kw) -> repif.InfluenceEstimator:
        if kw.get("curvature") in ("kfac", "ekfac") or kw.get("preconditioner"):
            kw.setdefault("kronecker_options", self.kron)
        kw.setdefault("max_memory", self.cfg["max_memory"])
        return super().estimator(solver, sampler, m, seed, **kw)


def row_key(r: dict) -> str:
    return f"{r['method']}|{r['sampler']}|{r['m']}|{r['seed']}"


def exact_subset(p: ReferenceProblem, sampler: str, m: int, seed: int, time_s: float,
                 cap: int) -> tuple[dict, torch.Tensor]:
    """The exact GGN solve on the subset: CG on all Q queries at once, stopped after ``time_s``
    seconds of iterations (or ``cap`` of them), and the relative residual ‖(C + λI)x − g‖/‖g‖
    it reached (one more curvature product)."""
    start: list[float] = []

    def monitor(it: int, x: torch.Tensor) -> bool:
        return time.perf_counter() - start[0] > time_s

    est = p.estimator("cg", sampler, m, seed, tol=1e-6, max_iter=cap, monitor=monitor)
    t = time.perf_counter()
    est.fit()
    fit_s = time.perf_counter() - t
    start.append(time.perf_counter())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CG at max_iter
        v = est.inverse_hvp(p.gq)
    solve_s = time.perf_counter() - start[0]
    steps = int(max(est.solver.iterations[-len(p.gq):]))
    with torch.no_grad():
        r = est.solver.operator.matmat(v) + p.cfg["damping"] * v - p.gq
    res = (r.norm(dim=1) / p.gq.norm(dim=1)).tolist()
    return ({"fit_s": fit_s, "solve_s_per_query": solve_s / len(p.gq), "cg_steps": steps,
             "s_per_step": solve_s / max(steps, 1), "rel_residual_max": max(res),
             "rel_residual_mean": float(np.mean(res)), "time_cap_s": time_s},
            p.scores(v))


def annotate(res: dict, scores: dict[str, torch.Tensor]) -> None:
    """Correlations of every row's scores against the references that exist (recomputed at
    every save, so rows measured before a reference get theirs when it arrives), and the goal."""
    rows = res["rows"]
    pool = res["pool"]
    full_key = f"ekfac|full|{pool}|0"
    kf_key = f"kronfluence-ekfac|full (in order)|{pool}|0"
    refs = {"vs_full_ekfac": full_key, "vs_kronfluence": kf_key}
    for r in rows:
        k = row_key(r)
        if k not in scores:
            continue
        for name, ref in refs.items():
            if ref in scores and ref != k:
                r[name] = correlations(scores[k], scores[ref])
        sub = f"subset-exact|{r['sampler']}|{r['m']}|{r['seed']}"
        if r["method"] != "subset-exact" and sub in scores:
            r["vs_subset"] = correlations(scores[k], scores[sub])
    res["goal"] = goal(res)


def goal(res: dict, margin: float = 0.01) -> dict | None:
    """The issue's goal: at equal accuracy, ≤ 1/4 of the factor-fitting examples and ≤ 1/2 of
    kronfluence's fit time. Equal accuracy: the subset fit's scores agree with kronfluence's
    full-pool scores (Pearson and Spearman) to within ``margin`` of how well repif's own
    full-pool fit agrees with them (the two full-pool fits differ only in label sampling and
    implementation)."""
    by = {row_key(r): r for r in res["rows"]}
    pool = res["pool"]
    kf = by.get(f"kronfluence-ekfac|full (in order)|{pool}|0")
    full = by.get(f"ekfac|full|{pool}|0")
    if not kf or not full or "vs_kronfluence" not in full:
        return None
    floor = full["vs_kronfluence"]["pearson"]
    floor_s = full["vs_kronfluence"]["spearman"]

    def equal(r: dict) -> bool:
        v = r["vs_kronfluence"]
        return v["pearson"] >= floor - margin and v["spearman"] >= floor_s - margin

    cands = []
    for r in res["rows"]:
        if r["method"] != "ekfac" or r["sampler"] == "full" or "vs_kronfluence" not in r:
            continue
        cands.append({
            "sampler": r["sampler"], "m": r["m"], "seed": r["seed"],
            "examples_ratio": r["m"] / pool, "time_ratio": r["fit_s"] / kf["fit_s"],
            "pearson_vs_kronfluence": r["vs_kronfluence"]["pearson"],
            "pearson_vs_full_ekfac": r.get("vs_full_ekfac", {}).get("pearson"),
            "spearman_vs_kronfluence": r["vs_kronfluence"]["spearman"],
            "equal_accuracy": equal(r)})
        cands[-1]["met"] = bool(cands[-1]["equal_accuracy"] and r["m"] <= pool / 4
                                and r["fit_s"] <= kf["fit_s"] / 2)
    return {"margin": margin, "full_pool_pearson_vs_kronfluence": floor,
            "full_pool_spearman_vs_kronfluence": floor_s,
            "kronfluence_pearson_vs_full_ekfac": kf.get("vs_full_ekfac", {}).get("pearson"),
            "kronfluence_fit_s": kf["fit_s"], "repif_full_fit_s": full["fit_s"],
            "candidates": cands, "met": any(c["met"] for c in cands)}


def run_reference(p: ReferenceProblem, kron_python: str | None, log, save, store: Path,
                  previous: dict | None) -> dict:
    """Full-pool fits (repif, kronfluence), the subset fits, then (time permitting) the exact
    subset solves; ``save`` is called after every row. ``previous``: an interrupted run's
    result for the same config, whose rows (with stored scores) are kept."""
    c = p.cfg
    pool = len(p.train[1])
    res = {"kind": "reference", "num_params": p.num_params,
           "num_params_model": p.num_params_model, "pool": pool, "config": c, "rows": [],
           "environment": io.environment_metadata(), "wall_s": 0.0,
           "notes": {"bn": "BatchNorm frozen (requires_grad=False) for every method",
                     "fisher": c["fisher"], "dtype": c["dtype"]}}
    scores: dict[str, torch.Tensor] = {}
    if previous and previous.get("config") == json.loads(json.dumps(c)) and store.exists():
        old = torch.load(store)
        res["rows"] = [r for r in previous["rows"] if row_key(r) in old]
        scores = {row_key(r): old[row_key(r)] for r in res["rows"]}
        res["wall_s"] = previous.get("wall_s", 0.0)
        res["notes"].update(previous.get("notes", {}))
        log(f"{p.name}: resuming with {len(res['rows'])} rows")
    wall0 = res["wall_s"]
    t0 = time.perf_counter()

    def elapsed() -> float:
        return wall0 + time.perf_counter() - t0

    def record(row: dict, s: torch.Tensor) -> None:
        row.pop("v", None)
        res["rows"] = [r for r in res["rows"] if row_key(r) != row_key(row)] + [row]
        scores[row_key(row)] = s
        tmp = store.with_suffix(".tmp")
        torch.save(scores, tmp)
        os.replace(tmp, store)
        annotate(res, scores)
        res["wall_s"] = elapsed()
        save(res)

    log(f"{p.name}: {p.num_params:,} parameters ({p.num_params_model:,} with BatchNorm), "
        f"pool {pool}")

    def kron_fit(sampler: str, m: int | None, seed: int) -> None:
        row = {"problem": p.name, "method": "ekfac", "sampler": sampler, "m": m or pool,
               "seed": seed}
        note = f"ekfac {sampler} m={m} seed={seed}"
        if row_key(row) in scores or note in res["notes"]:  # measured, or skipped for time
            return
        fits = [r for r in res["rows"] if r["method"] == "ekfac"]
        rate = max((r["fit_s"] / r["m"] for r in fits), default=0.0)
        if m is not None and elapsed() + rate * m > c["budget_s"]:
            res["notes"][note] = (
                f"skipped: {elapsed():.0f} s of the {c['budget_s']} s budget spent, the fit "
                f"would take ≈ {rate * m:.0f} s")
            save(res)
            log(f"  ekfac {sampler} m={m}: skipped (budget)")
            return
        # the scoring time does not depend on the subset: measured on the first fits only
        score = m is None or m == c["sizes"][0]
        r = p.run(p.estimator("eigen", "random" if m is None else sampler, m, seed,
                              curvature="ekfac"), score=score, memory=True)
        row.update(r)
        record(row, p.scores(r["v"]))
        log(f"  ekfac {sampler} m={m or pool}: fit {r['fit_s']:.1f} s, peak +"
            f"{r['fit_peak_rss_growth_bytes'] / 2**20:.0f} MB; vs full "
            f"{row.get('vs_full_ekfac', {}).get('pearson', float('nan')):.3f}, vs kronfluence "
            f"{row.get('vs_kronfluence', {}).get('pearson', float('nan')):.3f} "
            f"({elapsed():.0f} s)")

    kron_fit("full", None, 0)
    kf_row = {"problem": p.name, "method": "kronfluence-ekfac", "sampler": "full (in order)",
              "m": pool, "seed": 0}
    if kron_python and row_key(kf_row) not in scores:
        kf = kronfluence_scores(p, kron_python, log, dtype=c["dtype"])
        if "error" in kf:
            res["notes"]["kronfluence_error"] = kf["error"]
        else:
            kf_row.update(fit_s=kf["fit_s"], score_s_per_query=kf["score_s"] / len(p.gq),
                          fit_peak_rss_growth_bytes=kf["fit_peak_rss_growth_bytes"],
                          version=kf["version"])
            record(kf_row, kf["scores"].to(p.gq.dtype))
            log(f"  kronfluence ekfac: fit {kf['fit_s']:.1f} s, vs repif full "
                f"{kf_row['vs_full_ekfac']['pearson']:.3f} ({elapsed():.0f} s)")
    for m in c["sizes"]:
        for sampler in SAMPLERS:
            for seed in c["seeds"]:
                kron_fit(sampler, m, seed)
    for m in c["exact_sizes"]:
        for sampler in SAMPLERS:
            seed = c["seeds"][0]
            row = {"problem": p.name, "method": "subset-exact", "sampler": sampler, "m": m,
                   "seed": seed}
            note = f"subset-exact {sampler} m={m}"
            if row_key(row) in scores or note in res["notes"]:  # measured, or skipped for time
                continue
            # the fit, c["cg_time_s"] of steps, one more product for the residual
            if elapsed() + 1.3 * c["cg_time_s"] > c["budget_s"]:
                res["notes"][note] = (
                    f"skipped: {elapsed():.0f} s of the {c['budget_s']} s budget spent")
                save(res)
                log(f"  subset-exact {sampler} m={m}: skipped (budget)")
                continue
            r, s = exact_subset(p, sampler, m, seed, c["cg_time_s"], c["cg_cap"])
            row.update(r)
            record(row, s)
            vs = by_key(res, "ekfac", sampler, m, seed).get("vs_subset", {})
            log(f"  subset-exact {sampler} m={m}: {r['cg_steps']} CG steps "
                f"({r['s_per_step']:.1f} s each), residual ≤ {r['rel_residual_max']:.2e}; "
                f"ekfac vs it {vs.get('pearson', float('nan')):.3f} ({elapsed():.0f} s)")
    return res


def by_key(res: dict, method: str, sampler: str, m: int, seed: int) -> dict:
    return next((r for r in res["rows"] if (r["method"], r["sampler"], r["m"], r["seed"])
                 == (method, sampler, m, seed)), {})


# --------------------------------------------------------------------------- kronfluence
def kronfluence_scores(p: Problem, python: str, log, dtype: str = "float64") -> dict:
    """kronfluence's EK-FAC on ``p``'s whole pool in its own process: its scores (repif's sign),
    fit and score times, the fit's peak RSS growth; ``{"error": ...}`` if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "problem.pt"
        torch.save({"model": p.model, "train": p.train, "test": p.test, "columns": p.columns,
                    "damping": p.cfg["damping"] + WEIGHT_DECAY, "dtype": dtype}, src)
        out = Path(tmp) / "scores.pt"
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([python, __file__, "--kronfluence-worker", str(src), str(out)],
                              capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            log(f"  kronfluence failed: {proc.stderr[-2000:]}")
            return {"error": proc.stderr[-2000:]}
        return torch.load(out)


def kronfluence_row(p: Problem, python: str, s_full: torch.Tensor, log) -> dict:
    res = kronfluence_scores(p, python, log)
    if "error" in res:
        return {"problem": p.name, "method": "kronfluence-ekfac", "error": res["error"]}
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
        """float64 throughout for the float64 problems; kronfluence's defaults otherwise."""
        if prob.get("dtype", "float64") != "float64":
            return cls(**kw)
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
        with PeakRSS() as mem:
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
                "fit_peak_rss_growth_bytes": mem.growth,
                "version": getattr(kronfluence, "__version__", "?")}, out)


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = []
    for name, res in results["problems"].items():
        if res.get("kind") == "reference":
            lines += markdown_reference(name, res)
            continue
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
        lines += per_seed_against_kronfluence(res)
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


def per_seed_against_kronfluence(res: dict, m: int = GOAL_M) -> list[str]:
    """The issue's goal, per seed: each EK-FAC fit on an m-point subset against the exact
    full-pool solve (Pearson), beside kronfluence's full-pool EK-FAC on the same queries."""
    kf = [r for r in res["rows"] if r["method"] == "kronfluence-ekfac" and "vs_full" in r]
    fits = [r for r in res["rows"] if r["method"].startswith("ekfac") and r["m"] == m
            and r["sampler"] != "full" and "vs_full" in r]
    if not kf or not fits:
        return []
    bar = kf[0]["vs_full"]["pearson"]
    draws = [r["vs_full"]["pearson"] for r in res["rows"]
             if r["method"] == "ekfac-sampled" and r["sampler"] == "full" and "vs_full" in r]
    spread = (f" One label draw moves that figure: repif's whole-pool EK-FAC with sampled labels "
              f"(kronfluence's Fisher) scores {min(draws):.3f}–{max(draws):.3f} over "
              f"{len(draws)} draws (mean {np.mean(draws):.3f})." if len(draws) > 1 else "")
    lines = ["", f"EK-FAC from m = {m} points against kronfluence's EK-FAC on the whole pool "
             f"(Pearson vs the exact full-pool solve: kronfluence {bar:.3f}, one label "
             f"draw).{spread} Per seed:", "",
             "| method | sampler | seeds: Pearson vs full | at least kronfluence's on every "
             "seed |", "|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in fits:
        groups.setdefault((r["method"], r["sampler"]), []).append(r)
    for (method, sampler), rs in groups.items():
        vals = [r["vs_full"]["pearson"] for r in sorted(rs, key=lambda r: r["seed"])]
        lines.append(f"| {method} | {sampler} | {', '.join(f'{v:.3f}' for v in vals)} | "
                     f"{'yes' if min(vals) >= bar else 'no'} |")
    return [*lines, ""]


def markdown_reference(name: str, res: dict) -> list[str]:
    """The section of a ``REFERENCE_PROBLEMS`` problem (full-pool fits as references)."""
    cfg, pool = res["config"], res["pool"]
    mb = 2**20

    def pair(r, key):
        return f"{r[key]['pearson']:.3f} / {r[key]['spearman']:.3f}" if key in r else "—"

    def ms(r, key):
        return f"{1e3 * r[key]:.1f}" if key in r else "—"

    def rss(r):
        return (f"{r['fit_peak_rss_growth_bytes'] / mb:.0f}"
                if "fit_peak_rss_growth_bytes" in r else "—")

    lines = [f"## {name} ({res['num_params']:,} Conv2d/Linear parameters of "
             f"{res['num_params_model']:,}: BatchNorm frozen; pool = the first {pool:,} MNIST "
             f"training images; λ = {cfg['damping']}, wd = {WEIGHT_DECAY}; {cfg['queries']} "
             f"queries × {cfg['columns']} training columns; {cfg['dtype']}, "
             f"fisher=\"{cfg['fisher']}\")", "",
             f"`python benchmarks/ekfac.py --problems {name} --data-dir DIR --kronfluence PY` — "
             f"{res['wall_s'] / 60:.1f} min on 1 thread (a shared 2-core machine with other "
             "jobs running: times are indicative).", "",
             "ResNet-18 of width 16 trained on full MNIST (`benchmarks/train_resnet18.py`). No "
             "exact full-pool solve fits on a CPU here, so the references are the same "
             "estimator fitted on the whole pool: `full EK-FAC` = repif's EK-FAC on all "
             f"{pool:,} points, `kronfluence` = kronfluence's EK-FAC on them (its default "
             "dtypes, labels sampled from the model, damping_factor = λ + wd absolute; "
             "Conv2d/Linear tracked), `subset` = the exact GGN solve on the same subset (CG, "
             "time-capped: see below). Every repif fit uses `fisher=\"sampled\"` (one backward "
             "per point; the exact output Hessian costs 10). Mean row-wise Pearson / Spearman "
             "of the scores. repif's memory budget: max_memory = "
             f"{cfg['max_memory'] / 2**30:g} GiB. Fit: sampling with its pool pass, the "
             "factors, eigenbases and "
             "eigenvalue corrections. Peak: the fit's peak RSS growth over the process's "
             "resident memory before it (the 500 × p training gradients of the scoring are "
             "held already).", "",
             "| method | sampler | m | vs full EK-FAC P / S | vs kronfluence P / S | "
             "vs subset P / S | fit s | solve ms / query | score ms / query | fit peak MB |",
             "|" + "---|" * 10]
    order = {"ekfac": 0, "kronfluence-ekfac": 1, "subset-exact": 2}
    rows = sorted(res["rows"], key=lambda r: (not r["sampler"].startswith("full"), r["m"],
                                             SAMPLERS.index(r["sampler"])
                                             if r["sampler"] in SAMPLERS else -1,
                                             order.get(r["method"], 3), r["seed"]))
    for r in rows:
        method = {"ekfac": "repif ekfac", "kronfluence-ekfac": "kronfluence ekfac"}.get(
            r["method"], r["method"])
        lines.append(f"| {method} | {r['sampler']} | {r['m']} | {pair(r, 'vs_full_ekfac')} | "
                     f"{pair(r, 'vs_kronfluence')} | {pair(r, 'vs_subset')} | "
                     f"{r['fit_s']:.1f} | {ms(r, 'solve_s_per_query')} | "
                     f"{ms(r, 'score_s_per_query')} | {rss(r)} |")
    exact = [r for r in rows if r["method"] == "subset-exact"]
    lines += ["", f"Exact subset solves (CG on the {cfg['queries']} queries at once, stopped after "
              f"{cfg['cg_time_s']} s of steps; the relative residual ‖(C + λI)x − g‖/‖g‖ "
              "reached, max / mean over the queries):", ""]
    if exact:
        lines += ["| sampler | m | CG steps | s per step | rel. residual max / mean |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['m']} | {r['cg_steps']} | {r['s_per_step']:.1f} | "
                  f"{r['rel_residual_max']:.2e} / {r['rel_residual_mean']:.2e} |"
                  for r in exact]
    if any(r["rel_residual_max"] > 0.1 for r in exact):
        lines += ["", "CG is far from converged there (a relative residual near or above 1): the "
                  "`subset-exact` rows and the `vs subset` column compare against an unconverged "
                  "solve and say nothing about accuracy; the exact subset solve is out of reach "
                  "of this CPU at this size.", ""]
    skipped = {k: v for k, v in res.get("notes", {}).items() if k.startswith("subset-exact")}
    lines += [f"* {k}: {v}" for k, v in skipped.items()] or ([] if exact else ["* not run"])
    if exact:
        step = float(np.mean([r["s_per_step"] for r in exact]))
        lines += ["", f"CG iteration counts to {TARGET:g} with and without the EK-FAC "
                  f"preconditioner were not measured on this problem: one CG step over "
                  f"m = {exact[0]['m']} points costs ≈ {step:.0f} s here, and the counts need "
                  "tens of steps per solver and sampler."]
    if res.get("notes", {}).get("history"):
        lines += ["", f"History: {res['notes']['history']}."]
    g = res.get("goal")
    lines += ["", "**Goal** (at equal accuracy, ≤ 1/4 of the factor-fitting examples and ≤ 1/2 "
              "of kronfluence's fit time). Equal accuracy: Pearson and Spearman of repif's "
              "subset-fit scores against kronfluence's full-pool scores both within "
              f"{g['margin'] if g else 0.01} of repif's own full-pool fit's agreement with "
              "them (the two full-pool fits differ only in label sampling and "
              "implementation).", ""]
    if not g:
        lines.append("Not evaluated: the kronfluence or full-pool row is missing.")
        return lines + [""]
    lines += [f"repif full pool vs kronfluence: Pearson "
              f"{g['full_pool_pearson_vs_kronfluence']:.3f}, Spearman "
              f"{g['full_pool_spearman_vs_kronfluence']:.3f}; kronfluence fit "
              f"{g['kronfluence_fit_s']:.0f} s, repif full-pool fit "
              f"{g['repif_full_fit_s']:.0f} s.", "",
              "| sampler | m | examples / pool | fit time / kronfluence's | P / S vs "
              "kronfluence | P vs full EK-FAC | equal accuracy | goal met |", "|" + "---|" * 8]
    for cnd in sorted(g["candidates"], key=lambda c: (SAMPLERS.index(c["sampler"]), c["m"])):
        pf = cnd["pearson_vs_full_ekfac"]
        lines.append(f"| {cnd['sampler']} | {cnd['m']} | {cnd['examples_ratio']:.3f} | "
                     f"{cnd['time_ratio']:.2f} | {cnd['pearson_vs_kronfluence']:.3f} / "
                     f"{cnd['spearman_vs_kronfluence']:.3f} | "
                     f"{'—' if pf is None else f'{pf:.3f}'} | "
                     f"{'yes' if cnd['equal_accuracy'] else 'no'} | "
                     f"{'yes' if cnd['met'] else 'no'} |")
    lines += ["", f"Goal {'met' if g['met'] else 'not met'} on this problem."]
    return lines + [""]


def write(out: Path, results: dict) -> None:
    """ekfac.json and ekfac.md from ``results`` (all problems measured so far)."""
    io.write_json_atomic(out / "ekfac.json", results)
    small = [n for n, r in results["problems"].items() if r.get("kind") != "reference"]
    kron = any(r["method"] == "kronfluence-ekfac" for n in small
               for r in results["problems"][n]["rows"])
    head = ""
    timed = [f"{n} {results['problems'][n]['wall_s'] / 60:.1f} min" for n in small
             if "wall_s" in results["problems"][n]]
    if timed:
        head = (f"`python benchmarks/ekfac.py{' --kronfluence PY' if kron else ''}` (one "
                f"problem: `--problems NAME`; it replaces that problem's results) — "
                f"{', '.join(timed)} on {results['threads']} thread(s).\n\n")
    tmp = out / "ekfac.md.tmp"
    tmp.write_text("# K-FAC / EK-FAC on sampled subsets\n\n" + head + markdown(results))
    os.replace(tmp, out / "ekfac.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".repif-cache")
    ap.add_argument("--problems", default=",".join(PROBLEMS),
                    help=f"comma-separated, of {', '.join([*PROBLEMS, *REFERENCE_PROBLEMS])}"
                         " (default: the first three)")
    ap.add_argument("--data-dir", help="the MNIST IDX files (for resnet18-16)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an interrupted resnet18-16 run with the same config")
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
    torch.set_flush_denormal(True)
    out = Path(tempfile.mkdtemp()) if args.quick else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.problems.split(",") if n]
    unknown = [n for n in names if n not in PROBLEMS and n not in REFERENCE_PROBLEMS]
    if unknown:
        ap.error(f"unknown problems {unknown}; known: "
                 f"{', '.join([*PROBLEMS, *REFERENCE_PROBLEMS])}")
    if args.quick:
        names = names[:1]

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = {"target": TARGET, "weight_decay": WEIGHT_DECAY, "samplers": list(SAMPLERS),
               "threads": torch.get_num_threads(), "environment": io.environment_metadata(),
               "problems": {}}
    previous: dict = {}
    if (out / "ekfac.json").exists():  # merge: the problems not run now keep their results
        previous = json.loads((out / "ekfac.json").read_text())
        results = {**previous, "problems": dict(previous.get("problems", {}))}
        if any(n in PROBLEMS for n in names):  # their run's environment
            results.pop("wall_s", None)  # one total for all problems (before per-problem times)
            results.update(environment=io.environment_metadata(),
                           threads=torch.get_num_threads())
    for name in names:
        t = time.perf_counter()
        if name in REFERENCE_PROBLEMS:
            prev = previous.get("problems", {}).get(name) if args.resume else None
            store = (out if args.quick else HERE / "cache") / f"ekfac-{name}-scores.pt"
            store.parent.mkdir(parents=True, exist_ok=True)

            def save(res: dict, name: str = name) -> None:
                results["problems"][name] = res
                write(out, results)

            res = run_reference(ReferenceProblem(name, args.data_dir, args.quick),
                                args.kronfluence, log, save, store, prev)
        else:
            res = run_problem(Problem(name, Path(args.cache), args.quick), args.kronfluence,
                              log)
            res["wall_s"] = time.perf_counter() - t
        results["problems"][name] = res
        write(out, results)
    log(f"wrote {out / 'ekfac.json'} and {out / 'ekfac.md'}")


if __name__ == "__main__":
    main()
