"""K-FAC-reduce (``kronecker_options={"weight_sharing": "reduce"}``), checked against:

* the factors built by hand: A from the mean of each point's unfolded patches, G from the sum
  over positions of the output-side gradients (zero probes added to each layer's output);
* the exact GGN block of a convolution in a network that is linear up to a pooling, for one
  point — where K-FAC-reduce is exact and the default ("expand") is not;
* the default on layers used at one position (a Linear on vectors), where both agree.
"""

from __future__ import annotations

import pytest
import torch
from _kronecker_reference import hand_factors
from torch import nn

import repif
from repif.curvature import kfac
from repif.curvature.operator import CurvatureOperator
from repif.memory import MIN_BYTES, MemoryBudget
from repif.task import ClassificationTask, FunctionalModel

pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _block(fm: FunctionalModel, layer: kfac.KroneckerLayer, dense: torch.Tensor) -> torch.Tensor:
    """The (out·d, out·d) block of a (p, p) matrix on ``layer``'s entries, in kron(G, A) order."""
    idx = layer.gather(torch.arange(fm.space.size)[None].double())[0].flatten().long()
    return dense[idx[:, None], idx[None, :]]


def test_reduce_factors_match_the_hand_construction(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 2, bias=False),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    ).double().eval()
    x = torch.randn(10, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    w = torch.rand(10, dtype=torch.float64)
    w /= w.sum()
    task = ClassificationTask(weight_decay=0.01)
    fm = FunctionalModel(model, task)
    layers, _ = kfac.kronecker_layers(fm)
    a_ref, g_ref = hand_factors(model, layers, x, y, w, task, "reduce")
    a_got, g_got = kfac.kronecker_statistics(fm, x, y, w, layers, weight_sharing="reduce")
    for got, want in zip(a_got + g_got, a_ref + g_ref, strict=True):
        assert _rel(got, want) < 1e-12
    expand_a, _ = kfac.kronecker_statistics(fm, x, y, w, layers)
    assert _rel(expand_a[0], a_ref[0]) > 0.05  # the two conventions differ on convolutions
    # chunking does not change the sums: a budget a little above the factors' own bytes
    forwards = []
    from repif.curvature import kronecker_passes

    capture = kronecker_passes._capture
    monkeypatch.setattr(kronecker_passes, "_capture",
                        lambda *a: forwards.append(1) or capture(*a))
    budget = MemoryBudget(max(MIN_BYTES, kfac.factor_bytes(fm, layers) + 8192))
    a_chunked, g_chunked = kfac.kronecker_statistics(fm, x, y, w, layers, budget=budget,
                                                     weight_sharing="reduce")
    assert len(forwards) > 1
    for got, want in zip(a_chunked + g_chunked, a_ref + g_ref, strict=True):
        assert _rel(got, want) < 1e-12


def test_reduce_is_exact_where_gradients_do_not_vary_over_positions():
    """Conv → global average pool → Linear, no non-linearity, one point: the output gradient
    at every position of the convolution is the same, so its exact GGN block is the rank-C
    Σ_c ĝ_c ĝ_cᵀ ⊗ ā āᵀ — K-FAC-reduce's G ⊗ A, and EK-FAC in that basis. The default
    ("expand") averages the patches' outer products instead and misses it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 4)).double().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([2])
    w = torch.ones(1, dtype=torch.float64)
    fm = FunctionalModel(model, ClassificationTask())
    ggn = CurvatureOperator(fm, x, y, w).dense()
    for kind in ("kfac", "ekfac"):
        fit = kfac.fit_kronecker(fm, x, y, w, kind=kind, weight_sharing="reduce")
        dense = fit.dense()
        for layer in fit.layers:  # K-FAC is block-diagonal: compare the layers' own blocks
            assert _rel(_block(fm, layer, dense), _block(fm, layer, ggn)) < 1e-10
    expand = kfac.fit_kronecker(fm, x, y, w, kind="kfac").dense()
    conv = fit.layers[0]
    assert _rel(_block(fm, conv, expand), _block(fm, conv, ggn)) > 0.1


def test_reduce_equals_expand_on_layers_at_one_position(digits_mlp):
    model, (x, y), _ = digits_mlp
    x, y = x[:64], y[:64]
    w = torch.full((64,), 1 / 64, dtype=torch.float64)
    fm = FunctionalModel(model, ClassificationTask(weight_decay=1e-3))
    for kind in ("kfac", "ekfac"):
        a = kfac.fit_kronecker(fm, x, y, w, kind=kind).dense()
        b = kfac.fit_kronecker(fm, x, y, w, kind=kind, weight_sharing="reduce").dense()
        assert _rel(b, a) < 1e-12


def test_option_through_the_estimator_its_cache_and_its_errors(tmp_path, monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3)).double()
    x = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match=r"weight_sharing must be one of expand, reduce, got "
                                         r"'mean'"):
        repif.InfluenceEstimator(model, (x, y), curvature="kfac", solver="eigen",
                                 kronecker_options={"weight_sharing": "mean"})

    def fit(sharing: str) -> repif.InfluenceEstimator:
        return repif.InfluenceEstimator(
            model, (x, y), curvature="kfac", solver="eigen", sample_size=20, damping=0.1,
            kronecker_options={"weight_sharing": sharing, "cache_dir": str(tmp_path)}).fit()

    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    expand, reduce = fit("expand").inverse_hvp(v), fit("reduce").inverse_hvp(v)
    assert len(list(tmp_path.glob("kfac-*.safetensors"))) == 2  # one cached fit per convention
    assert _rel(reduce, expand) > 1e-3
    def refit(*args, **kwargs):
        raise AssertionError("the cached reduce factors should have been read back")

    monkeypatch.setattr(kfac, "fit_kronecker", refit)
    assert _rel(fit("reduce").inverse_hvp(v), reduce) < 1e-12
