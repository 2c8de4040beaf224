"""Kronecker factors eigendecomposed in float32 (``eigh_dtype``) against the float64 default:
the same curvature up to float32 round-off of the bases, and the option checked by name."""

from __future__ import annotations

import pytest
import torch

import repif
from repif import datasets, models
from repif.curvature.kfac import fit_kronecker
from repif.task import FunctionalModel

#: float32 eigenvectors carry ~1e-7 relative round-off; a solve damped well above the smallest
#: eigenvalues amplifies it by at most the damped condition number (here < 1e3).
TOL = 1e-3


@pytest.fixture(scope="module")
def digits_mlp():
    ds = datasets.load("digits")
    model = models.build("mlp", ds).double().eval()
    return model, ds.train[0][:200].double(), ds.train[1][:200]


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_float32_eigh_gives_the_same_curvature(digits_mlp, kind):
    model, x, y = digits_mlp
    fm = FunctionalModel(model)
    w = torch.full((200,), 1 / 200, dtype=torch.float64)
    ref = fit_kronecker(fm, x, y, w, kind=kind)
    low = fit_kronecker(fm, x, y, w, kind=kind, eigh_dtype="float32")
    v = torch.randn(4, fm.space.size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    a, b = ref.inverse(v, 1e-2), low.inverse(v, 1e-2)
    assert float((a - b).norm() / a.norm()) < TOL
    assert b.dtype == torch.float64  # the bases come back in the model's dtype


def test_eigh_dtype_is_checked_and_reaches_the_fit(digits_mlp):
    model, x, y = digits_mlp
    with pytest.raises(ValueError, match="eigh_dtype must be one of"):
        repif.InfluenceEstimator(model, (x, y), curvature="kfac", solver="eigen",
                                 kronecker_options={"eigh_dtype": "float16"})
    est = repif.InfluenceEstimator(model, (x, y), curvature="kfac", solver="eigen",
                                   damping=1e-2, kronecker_options={"eigh_dtype": "float32"})
    ref = repif.InfluenceEstimator(model, (x, y), curvature="kfac", solver="eigen",
                                   damping=1e-2)
    g = est.train_gradients(torch.arange(3))
    a, b = ref.inverse_hvp(g), est.inverse_hvp(g)
    assert 0 < float((a - b).norm() / a.norm()) < TOL  # float32 bases: close, not identical
