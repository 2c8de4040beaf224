"""Small shared fixtures: the embedded digits data and a briefly trained float64 MLP on it."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits
from torch import nn


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _factor_cache_of_its_own(tmp_path_factory):
    """Long Kronecker fits go to the default factor cache; the suite's go to a directory of its
    own, so a run neither reads a user's cache nor leaves files in it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("REPIF_CACHE_DIR", str(tmp_path_factory.mktemp("factor-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _one_thread_everywhere():
    """The whole suite runs on one torch / BLAS thread: its problems are small, and on a
    shared 2-core machine thread hand-offs, not arithmetic, dominated their run time."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one torch / BLAS thread. Their problems are small (p ≤ 2,410),
    where a second thread gains little; on a busy 2-core machine, thread hand-offs in LiSSA's
    thousands of tiny products made one test 35× slower (143 s against 4 s)."""
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits: x (n, 64) float64 scaled to [0, 1] (÷16), y (n,) int64."""
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64) / 16.0, y.astype(np.int64)


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """Linear(64, 32)-Tanh-Linear(32, 10) in float64, 150 full-batch Adam steps on 1,000 digits.

    Returns ``(model, (x_train, y_train), (x_test, y_test))`` as float64 / int64 tensors. The
    model is trained only briefly (not to a minimum): solvers must agree on any parameters.
    """
    x, y = digits
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1000], perm[1000:1100]
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.0)
    with _one_thread():
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt), yt).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, (xt, yt), (torch.from_numpy(x[te]), torch.from_numpy(y[te]))


@pytest.fixture
def basis_draws(monkeypatch) -> list:
    """The indices of every EK-FAC eigenbasis the fitter draws (``basis_size``), in order,
    recorded while the test runs."""
    from repif import fitting

    drawn: list = []
    real = fitting.CurvatureFitter.with_basis

    def spy(self, kind, request, pool=None):
        out = real(self, kind, request, pool)
        if out.basis is not None:
            drawn.append(out.basis.subset.indices.clone())
        return out

    monkeypatch.setattr(fitting.CurvatureFitter, "with_basis", spy)
    return drawn
