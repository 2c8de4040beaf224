"""One process of tests/test_distributed.py (run as a script, one per rank, or alone).

``python _distributed_worker.py SCENARIO OUT``: with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set it joins a gloo process group (repif.distributed.init_from_env, inside
repif.distributed.run_launched, as ``python -m repif`` does); without them it runs alone.

* ``compare``: the digits MLP in float64, every sharded computation (pool pass, subsets,
  inverse-HVPs in lockstep and split by rows, influence, self-influence, Woodbury, direct,
  LiSSA on mini-batches, remove() and its F1), saved to OUT/rank<r>.pt.
* ``raise`` / ``kill``: rank 1 raises (or kills itself) while rank 0 computes influence
  scores; rank 0 must stop with an error naming the failure instead of waiting.
* ``api-raise``: the same failure in a user's own script (the group made by
  ``init_from_env``, no ``run_launched`` around it).
* ``other-data`` / ``other-labels`` / ``other-seed`` / ``other-test``: rank 1 is given other
  training inputs, other labels, another seed or other test points; every rank must refuse.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import repif
from repif import datasets, distributed, models
from repif.metrics import predict, removal_scores


def _setup():
    torch.set_num_threads(1)
    ds = datasets.load("digits")
    model = models.build("mlp", ds, width=32)
    model = repif.train(model, ds.train, epochs=3, weight_decay=1e-3, seed=0).double()
    return ds, model


def _estimator(model, ds, **kw):
    opts = dict(curvature="ggn", damping=0.01, weight_decay=1e-3, solver="cg",
                sampler="logit-importance", sample_size=64, seed=0)
    opts.update(kw)
    return repif.InfluenceEstimator(model, ds.train, **opts)


def compare(out: Path) -> None:
    ds, model = _setup()
    (x_test, y_test) = ds.test
    n = len(ds.train[1])
    res: dict[str, torch.Tensor] = {}
    est = _estimator(model, ds, batch_size=100)  # pool chunks at the same boundaries
    logits, feats = est.logits_and_features(torch.arange(n))
    res["logits"], res["features"] = logits, feats
    est.fit()
    res["subset_importance"] = est.subset.indices
    res["weights_importance"] = est.subset.weights
    km = _estimator(model, ds, sampler="feature-kmeans").draw()
    res["subset_kmeans"], res["weights_kmeans"] = km.subset.indices, km.subset.weights
    g = est.train_gradients(torch.arange(5))
    res["train_gradients"] = g
    res["ihvp_1"] = est.inverse_hvp(g[0])  # one right-hand side: lockstep, sharded products
    res["ihvp_5"] = est.inverse_hvp(g)  # five: split across the ranks
    res["influence"] = est.influence((x_test[:12], y_test[:12]))
    res["influence_1"] = est.influence((x_test[:1], y_test[:1]))
    res["self_influence"] = est.self_influence(torch.arange(40))
    shrunk = _estimator(model, ds, shrinkage="auto")  # the GGN diagonal, all-reduced
    res["ihvp_shrink"] = shrunk.inverse_hvp(g[:1])
    wood = _estimator(model, ds, solver="woodbury", shrinkage="auto")  # the factor, gathered
    res["ihvp_woodbury"] = wood.inverse_hvp(g[:3])
    direct = _estimator(model, ds, solver="direct", sampler="random", sample_size=32)
    res["ihvp_direct"] = direct.inverse_hvp(g[:2])  # the dense Gram sum, all-reduced
    lissa = _estimator(model, ds, solver="lissa", solver_options={"batch_size": 16}, depth=40,
                       tol=0.0)
    res["ihvp_lissa"] = lissa.inverse_hvp(g[:3])  # mini-batches: lockstep
    res["self_influence_lissa"] = lissa.self_influence(torch.arange(6))
    removed = torch.nonzero(ds.train[1] == 3).flatten()
    new = est.remove(removed, scale=5.0, steps=2)
    res["removed_params"] = torch.cat([p.detach().flatten() for p in new.parameters()])
    scores = removal_scores(predict(new, x_test), predict(model, x_test), y_test, 3)
    res["removal_f1"] = torch.tensor(scores.f1, dtype=torch.float64)
    torch.save(res, out / f"rank{distributed.rank()}.pt")


def fail(out: Path, how: str) -> None:
    ds, model = _setup()
    est = _estimator(model, ds).fit()
    if distributed.rank() == 1:
        (out / "rank1.started").write_text("failing now")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("injected failure on rank 1")
    est.influence(ds.test)  # rank 0 waits for rank 1 in its first collective
    (out / "rank0.finished").write_text("should not get here")


def differ(out: Path, what: str) -> None:
    ds, model = _setup()
    (x, y), (x_test, y_test) = ds.train, ds.test
    other = distributed.rank() == 1
    if other and what == "other-data":
        x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if other and what == "other-labels":
        y = y.clone()
        y[100] = (y[100] + 1) % 10
    seed = 1 if other and what == "other-seed" else 0
    if other and what == "other-test":
        x_test = x_test.flip(0)
    est = repif.InfluenceEstimator(model, (x, y), solver="cg", sample_size=64, seed=seed,
                                   damping=0.01)
    est.influence((x_test[:4], y_test[:4]))
    (out / f"rank{distributed.rank()}.finished").write_text("should not get here")


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    if scenario == "compare":
        compare(out)
    elif scenario.startswith("other-"):
        differ(out, scenario)
    else:
        fail(out, scenario)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "api-raise":  # a user's script: the group and nothing around it
        distributed.init_from_env()
        fail(Path(sys.argv[2]), "raise")
        sys.exit(0)
    sys.exit(distributed.run_launched(main))
