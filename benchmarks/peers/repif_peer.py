"""repif's solvers, with and without its samplers (system python, float32 like every peer).

Conventions are repif's own: C = mean-loss GGN (or Hessian) + weight_decay·I, damping λ added,
scores = −∇l(z_t)ᵀ(C + λI)⁻¹∇l(z_j). Methods named ``hessian-*`` use the exact Hessian (the
curvature Captum, dattri and most of pyDVL use); the others the GGN (kronfluence's target).
"""

from __future__ import annotations

from common import main

import repif


def run(solver, curvature="ggn", sampler="random", sample_size=None, shrinkage=0.0, **opts):
    def method(model, train, test, meta):
        est = repif.InfluenceEstimator(
            model, train, curvature=curvature, damping=meta["damping"],
            weight_decay=meta["weight_decay"], solver=solver, sampler=sampler,
            sample_size=sample_size, shrinkage=shrinkage, seed=0, **opts).fit()
        return est.influence(test)
    return method


CG = {"tol": 1e-6, "max_iter": 2000}

METHODS = {
    "direct": run("direct"),
    "cg": run("cg", **CG),
    # a relative residual of 1e-3 (pyDVL's "cg-loose" is the same): enough for Pearson ≥ 0.99
    "cg-loose": run("cg", tol=1e-3, max_iter=2000),
    "lissa": run("lissa", depth=1000, batch_size=64, tol=1e-6),
    "arnoldi": run("arnoldi", rank=100),
    "identity": run("identity"),
    "hessian-direct": run("direct", curvature="hessian"),
    "hessian-cg": run("cg", curvature="hessian", **CG),
    "woodbury-logit-importance-128": run("woodbury", sampler="logit-importance",
                                         sample_size=128, shrinkage="auto"),
    "woodbury-logit-importance-256": run("woodbury", sampler="logit-importance",
                                         sample_size=256, shrinkage="auto"),
    "woodbury-random-256": run("woodbury", sampler="random", sample_size=256,
                               shrinkage="auto"),
    "cg-logit-importance-256": run("cg", sampler="logit-importance", sample_size=256,
                                   shrinkage="auto", **CG),
}

TARGETS = {m: "hessian" if m.startswith("hessian-") else "ggn" for m in METHODS}

if __name__ == "__main__":
    main(METHODS, "repif", TARGETS)
