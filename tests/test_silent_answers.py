"""Answers that used to be wrong without a word now raise, naming the cause and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import repif
from repif.solvers.cg import CGSolver

N = 200


@pytest.fixture(scope="module")
def problem(digits_mlp):
    model, (x, y), (xt, yt) = digits_mlp
    return model, (x[:N], y[:N]), (xt[:5], yt[:5])


def _with_nan(x: torch.Tensor, row: int) -> torch.Tensor:
    bad = x.clone()
    bad.reshape(bad.shape[0], -1)[row, 3] = float("nan")
    return bad


@pytest.mark.parametrize("solver", ["cg", "woodbury", "lissa"])
def test_a_nan_pixel_in_a_removed_dataset_point_is_refused(problem, solver):
    """Used to return the original model with solver='cg': CG read the NaN right-hand side's
    norm as zero and answered zero."""
    model, (x, y), _ = problem
    est = repif.InfluenceEstimator(model, TensorDataset(_with_nan(x, 7), y), solver=solver,
                                   damping=0.1, sample_size=32, depth=5, tol=0.0) \
        if solver == "lissa" else repif.InfluenceEstimator(
            model, TensorDataset(_with_nan(x, 7), y), solver=solver, damping=0.1,
            sample_size=32)
    with pytest.raises(ValueError, match="non-finite"):
        est.remove(torch.tensor([6, 7, 8]))


def test_a_nan_loss_in_a_removed_point_is_refused(problem):
    """A task whose loss is NaN for some points (not the first, which the estimator probes)
    gives a NaN removal gradient: refused, not solved."""
    model, (x, y), _ = problem
    assert int(y[0]) != 9

    class NanForNines(repif.ClassificationTask):
        def loss_from_output(self, output, targets):
            out = super().loss_from_output(output, targets)
            return torch.where(targets == 9, out * float("nan"), out)

    est = repif.InfluenceEstimator(model, (x, y), task=NanForNines(), solver="cg",
                                   damping=0.1, sample_size=32)
    with pytest.raises(ValueError, match="removed points is not finite"):
        est.remove(torch.nonzero(y == 9).flatten())


def test_every_solver_refuses_a_nan_right_hand_side(problem):
    model, train, _ = problem
    for solver in ("cg", "direct", "woodbury", "identity"):
        est = repif.InfluenceEstimator(model, train, solver=solver, damping=0.1,
                                       sample_size=32).fit()
        g = torch.ones(2, est.num_params, dtype=torch.float64)
        g[1, 0] = float("nan")
        with pytest.raises(ValueError, match=r"1 of 2 right-hand side\(s\).*rows \[1\]"):
            est.solver.solve(g)
    assert issubclass(CGSolver, repif.solvers.Solver)


def test_nan_inputs_in_a_dataset_give_no_scores_for_top_k_to_rank(problem):
    model, (x, y), (xt, yt) = problem
    est = repif.InfluenceEstimator(model, TensorDataset(_with_nan(x, 150), y), solver="cg",
                                   damping=0.1, sample_size=32, sampler="random")
    with pytest.raises(ValueError, match="non-finite"):
        est.top_k((xt[0], yt[0]), k=3)


def test_top_k_refuses_a_batch_of_two(problem):
    """Used to answer for the first test point and ignore the second."""
    model, train, (xt, yt) = problem
    est = repif.InfluenceEstimator(model, train, solver="cg", damping=0.1, sample_size=32)
    with pytest.raises(ValueError, match="one test point, got a batch of 2"):
        est.top_k((xt[:2], yt[:2]))
    one = est.top_k((xt[:1], yt[:1]), k=3)
    scores = est.influence((xt[:1], yt[:1]))[0]
    assert one.proponents.tolist() == torch.argsort(scores)[:3].tolist()


def test_a_batch_mean_loss_is_refused(problem):
    """F.cross_entropy with its default reduction gave correct influence but a removal step
    20× too short that changed with batch_size."""
    model, train, _ = problem

    class MeanLoss(repif.ClassificationTask):
        def loss_from_output(self, output, targets):
            return F.cross_entropy(output, targets)

    with pytest.raises(ValueError, match=r"one floating-point value per point.*reduction='none'"):
        repif.InfluenceEstimator(model, train, task=MeanLoss())

    class SumLoss(repif.ClassificationTask):
        def loss_from_output(self, output, targets):
            return F.cross_entropy(output, targets, reduction="sum")

    with pytest.raises(ValueError, match="one floating-point value per point"):
        repif.InfluenceEstimator(model, train, task=SumLoss())


def test_a_custom_task_that_fails_or_gives_nan_is_named(problem):
    model, (x, y), _ = problem

    class FloatLabels(repif.Task):
        def loss_from_output(self, output, targets):
            return F.cross_entropy(output, targets.float(), reduction="none")

    with pytest.raises(ValueError, match=r"FloatLabels.loss_from_output fails.*torch.int64"):
        repif.InfluenceEstimator(model, (x, y), task=FloatLabels())

    class NanLoss(repif.ClassificationTask):
        def loss_from_output(self, output, targets):
            return super().loss_from_output(output, targets) * float("nan")

    with pytest.raises(ValueError, match="NanLoss.loss_from_output is not finite"):
        repif.InfluenceEstimator(model, (x, y), task=NanLoss())

    class WrongShape(repif.ClassificationTask):
        def loss_from_output(self, output, targets):
            return output  # (n, C), not (n,)

    with pytest.raises(ValueError, match=r"shape \(1,\).*got shape \(1, 10\)"):
        repif.InfluenceEstimator(model, (x, y), task=WrongShape())


def test_a_per_point_loss_of_a_custom_task_is_accepted():
    """The check refuses only what is wrong: a squared-error regression task is fine."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)

    class Squared(repif.Task):
        def loss_from_output(self, output, targets):
            return 0.5 * (output[:, 0] - targets) ** 2

    est = repif.InfluenceEstimator(nn.Linear(3, 1).double(), (x, y), task=Squared(),
                                   damping=0.1)
    assert est.influence((x[:2], y[:2])).shape == (2, 30)
