"""Progress bars on the long passes: shown when asked, silent otherwise, and never a change to
the numbers (a bar only counts what the pass already does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repif
from repif import progress


def _problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    return model, (x, y)


def _estimator(progress: bool, curvature: str = "kfac") -> repif.InfluenceEstimator:
    model, train = _problem()
    return repif.InfluenceEstimator(model, train, curvature=curvature, solver="eigen",
                                    sampler="logit-importance", sample_size=48, damping=0.1,
                                    progress=progress, batch_size=16)


@pytest.mark.parametrize("curvature,passes", [("kfac", ["K-FAC factors"]),
                                              ("ekfac", ["K-FAC factors", "EK-FAC eigenvalues"])])
def test_fit_shows_a_bar_per_pass_when_asked(capsys, monkeypatch, curvature, passes):
    closed: dict[str, tuple[int, int]] = {}

    class Recording(progress.tqdm):
        def close(self) -> None:
            if not self.disable:
                closed[self.desc] = (self.n, self.total)
            super().close()

    monkeypatch.setattr(progress, "tqdm", Recording)
    est = _estimator(True, curvature).fit()
    err = capsys.readouterr().err
    for desc in ["pool statistics", *passes]:
        assert desc in err
    # every bar ends full: the pool pass counts all 96 points, the factor passes the 48 drawn
    assert closed == {"pool statistics": (96, 96), **{d: (48, 48) for d in passes}}
    quiet = _estimator(False, curvature).fit()
    assert capsys.readouterr().err == ""
    v = torch.randn(est.num_params, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    assert torch.equal(est.inverse_hvp(v), quiet.inverse_hvp(v))


def test_training_bar_counts_mini_batches(capsys):
    model, train = _problem()
    repif.train(model, train, epochs=2, batch_size=32, progress=True)
    err = capsys.readouterr().err
    assert "6/6" in err and "epoch=2/2" in err  # 2 epochs × 3 mini-batches of 32
    repif.train(model, train, epochs=1, batch_size=32, progress=False)
    assert capsys.readouterr().err == ""
