"""dattri: IFAttributorExplicit, CG, LiSSA, Arnoldi, DataInf.

Convention mapping: the loss handed to dattri is the *mean* cross-entropy of a batch, and the
training set is given to `cache`/`attribute` as ONE batch: dattri sums per-batch inverse-HVPs
Σ_b (H_b + rI)⁻¹v, so only a single batch gives (H + rI)⁻¹v with H repif's mean-loss Hessian;
`regularization` = λ + wd. dattri uses the exact Hessian (compare against the Hessian reference).
It returns an (n_train, n_test) matrix of g_trainᵀ H⁻¹ g_test (positive = helpful): repif's score
is its negated transpose. DataInf's `regularization` is its own per-layer damping of the
empirical Fisher (set to λ + wd; not the same operator).
"""

from __future__ import annotations

import torch
from common import main
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Test queries per attribute() batch: dattri vmaps its inverse-HVP over a batch's queries, each
#: through the whole one-batch training set, so 50 at once needed > 17 GB (killed) on digits.
TEST_BATCH = 5


def attributor(kind, **opts):
    def method(model, train, test, meta):
        from dattri.algorithm import influence_function as F
        from dattri.task import AttributionTask

        ndim = len(meta["input_shape"])
        ce = nn.CrossEntropyLoss()

        def loss(params, data_target_pair):
            x, y = data_target_pair
            if x.dim() == ndim:  # one sample (under vmap)
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            return ce(torch.func.functional_call(model, params, (x,)), y.long())

        task = AttributionTask(loss_func=loss, model=model,
                               checkpoints=model.state_dict())
        reg = meta["damping"] + meta["weight_decay"]
        cls = {"explicit": F.IFAttributorExplicit, "cg": F.IFAttributorCG,
               "lissa": F.IFAttributorLiSSA, "arnoldi": F.IFAttributorArnoldi,
               "datainf": F.IFAttributorDataInf}[kind]
        if kind == "lissa":
            att = cls(task=task, damping=reg, **opts)
        else:
            att = cls(task=task, regularization=reg, **opts)
        n = len(train[1])
        full = DataLoader(TensorDataset(*train), batch_size=n)
        att.cache(full)
        scores = att.attribute(DataLoader(TensorDataset(*train), batch_size=256),
                               DataLoader(TensorDataset(*test), batch_size=TEST_BATCH))
        return -scores.T
    return method


METHODS = {
    "explicit": attributor("explicit"),
    "cg": attributor("cg", max_iter=100, tol=1e-6),
    "lissa": attributor("lissa", batch_size=64, recursion_depth=1000, scaling=50.0),
    "arnoldi": attributor("arnoldi", proj_dim=100, max_iter=200),
    "datainf": attributor("datainf"),
}

#: Every dattri IF method but DataInf (an empirical-Fisher approximation) targets the Hessian.
TARGETS = {m: "ggn" if m == "datainf" else "hessian" for m in METHODS}

if __name__ == "__main__":
    main(METHODS, "dattri", TARGETS)
