"""Captum (captum.influence): NaiveInfluenceFunction (exact Hessian, all eigenpairs),
ArnoldiInfluenceFunction (low rank) and TracInCP (one checkpoint: gradient dot products).

Convention mapping: Captum's influence classes differentiate the *summed* training loss (the
per-example loss is reduction='none', Hessians are summed over batches), so its Hessian is n·H and
its `hessian_reg` is set to n·(λ + wd) — the same relative damping as repif's (H + (λ+wd)I) on the
mean loss. Captum reports g_testᵀ H⁻¹ g_train (positive = helpful), so repif's score is its
negative; the overall factor n only rescales scores (correlations are scale-free).
TracInCP returns g_testᵀ g_train (lr factor 1), also negated.
"""

from __future__ import annotations

import os
import tempfile

import torch
from common import main
from torch import nn
from torch.utils.data import TensorDataset


def _setup(model):
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    torch.save(model.state_dict(), path)
    return path


def _load(model, path):
    model.load_state_dict(torch.load(path))
    return 1.0


def influence_cls(kind, **opts):
    def method(model, train, test, meta):
        from captum.influence import TracInCP
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
        from captum.influence._core.influence_function import NaiveInfluenceFunction

        n = len(train[1])
        ckpt = _setup(model)
        ds = TensorDataset(*train)
        loss = nn.CrossEntropyLoss(reduction="none")
        reg = n * (meta["damping"] + meta["weight_decay"])
        try:
            if kind == "naive":
                p = sum(q.numel() for q in model.parameters())
                inf = NaiveInfluenceFunction(model, ds, ckpt, _load, loss_fn=loss,
                                             batch_size=256, projection_dim=p,
                                             hessian_reg=reg, hessian_inverse_tol=1e-12, **opts)
            elif kind == "arnoldi":
                inf = ArnoldiInfluenceFunction(model, ds, ckpt, _load, loss_fn=loss,
                                               batch_size=256, hessian_reg=reg,
                                               hessian_inverse_tol=1e-12, **opts)
            else:
                inf = TracInCP(model, ds, [ckpt], _load, loss_fn=nn.CrossEntropyLoss(
                    reduction="sum"), batch_size=256, sample_wise_grads_per_batch=True)
            scores = inf.influence(test, show_progress=False)
        finally:
            os.unlink(ckpt)
        return -scores
    return method


METHODS = {
    "naive-exact": influence_cls("naive"),
    "arnoldi": influence_cls("arnoldi", arnoldi_dim=200, projection_dim=100),
    "tracincp": influence_cls("tracin"),
}

#: The exact and Arnoldi methods approximate the Hessian; TracInCP uses no curvature.
TARGETS = {"naive-exact": "hessian", "arnoldi": "hessian", "tracincp": "ggn"}

if __name__ == "__main__":
    main(METHODS, "captum", TARGETS)
