"""Inputs that used to end in a raw torch error, a misleading hint or a silent choice: each is
refused with one error naming the value and the fix, or handled as a user would expect (a
DataLoader's sampler selects the points; empty test data give empty results)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

import repif

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, C = 40, 5, 3


@pytest.fixture()
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return x, y


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    return nn.Linear(D, C).double()  # 18 parameters


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


# --------------------------------------------------------------------------- data forms
@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "dataloader"])
def test_iterable_dataset_names_the_fix(linear, data, wrap):
    stream = _Stream(*data)
    train = DataLoader(stream, batch_size=4) if wrap else stream
    with pytest.raises(TypeError, match=r"training data are a torch IterableDataset \(_Stream\)"
                                        r".*materialise it.*map-style Dataset"):
        repif.InfluenceEstimator(linear, train)
    est = repif.InfluenceEstimator(linear, data)
    with pytest.raises(TypeError, match=r"test data are a torch IterableDataset"):
        est.influence(stream)


@pytest.mark.parametrize("batched", [False, True], ids=["sampler", "batch_sampler"])
def test_subset_sampler_selects_its_points_in_dataset_order(linear, data, batched):
    """A DataLoader with a SubsetRandomSampler means "these points": the estimator works on
    them, numbered in ascending dataset index, exactly as on that subset of the tensors."""
    x, y = data
    chosen = [31, 4, 17, 9, 22, 0, 38, 13, 27, 6, 35, 19]
    sampler = SubsetRandomSampler(chosen, generator=torch.Generator().manual_seed(3))
    ds = TensorDataset(x, y)
    loader = (DataLoader(ds, batch_sampler=BatchSampler(sampler, 5, drop_last=False)) if batched
              else DataLoader(ds, batch_size=5, sampler=sampler))
    est = repif.InfluenceEstimator(linear, loader, damping=0.1)
    order = sorted(chosen)
    assert est.n_train == len(chosen)
    assert est.source.dataset_indices.tolist() == order
    plain = repif.InfluenceEstimator(linear, (x[order], y[order]), damping=0.1)
    torch.testing.assert_close(est.influence((x[:3], y[:3])), plain.influence((x[:3], y[:3])),
                               rtol=1e-10, atol=0)  # same maths, batched differently
    # as test data, the loader's points are the rows, in the same order
    full = repif.InfluenceEstimator(linear, data, damping=0.1)
    torch.testing.assert_close(full.influence(loader), full.influence((x[order], y[order])),
                               rtol=1e-10, atol=0)


def test_shuffling_loader_gives_every_point_in_dataset_order(linear, data):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    est = repif.InfluenceEstimator(linear, loader)
    assert est.n_train == N and est.source.dataset_indices is None


@pytest.mark.parametrize("make, words", [
    (lambda ds: DataLoader(ds, sampler=WeightedRandomSampler(torch.ones(N), N)),
     "WeightedRandomSampler"),
    (lambda ds: DataLoader(ds, sampler=RandomSampler(ds, replacement=True)),
     "with replacement"),
    (lambda ds: DataLoader(ds, sampler=RandomSampler(ds, num_samples=10)),
     "samples 10 of its 40 points"),
    (lambda ds: DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0)),
     "shards the data across processes itself"),
    (lambda ds: DataLoader(ds, sampler=SubsetRandomSampler([1, 5, 1])), "listing an index twice"),
    (lambda ds: DataLoader(ds, sampler=SubsetRandomSampler([1, 40])), "holding index 40, outside"),
    (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), "custom batch_sampler"),
], ids=["weighted", "replacement", "fewer", "distributed", "duplicate", "range", "batches"])
def test_samplers_repif_cannot_honour_are_refused(linear, data, make, words):
    with pytest.raises(ValueError, match="the DataLoader passed as training data ") as err:
        repif.InfluenceEstimator(linear, make(TensorDataset(*data)))
    assert words in str(err.value)


@pytest.mark.parametrize("bad", [2.5, True, 0, -3, "8"])
def test_batch_size_must_be_a_positive_integer(linear, data, bad):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer or None, got "
                                         rf"{bad!r}".replace("(", r"\(")):
        repif.InfluenceEstimator(linear, data, batch_size=bad)


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("empty", [[], torch.tensor([]), torch.tensor([], dtype=torch.long)],
                         ids=["list", "float-tensor", "long-tensor"])
def test_removing_nothing_says_the_set_is_empty(linear, data, empty):
    est = repif.InfluenceEstimator(linear, data)
    with pytest.raises(ValueError, match=r"no indices to remove"):
        est.remove(empty)


def test_empty_test_data_and_blocks_give_empty_results(linear, data, monkeypatch):
    x, y = data
    est = repif.InfluenceEstimator(linear, data, solver="cg")

    def no_solve(*args, **kwargs):
        raise AssertionError("an empty input must not reach the solver")

    monkeypatch.setattr(type(est), "_solve", no_solve)
    scores = est.influence((x[:0], y[:0]))
    assert scores.shape == (0, N) and scores.dtype == torch.float64
    assert est.influence(TensorDataset(x[:0], y[:0]), train_indices=[1, 2]).shape == (0, 2)
    block = est.inverse_hvp(torch.zeros(0, est.num_params, dtype=torch.float64))
    assert block.shape == (0, est.num_params)
    assert est.test_gradients((x[:0], y[:0])).shape == (0, est.num_params)
    assert est._fitted is None  # nothing was fitted for them either
    with pytest.raises(ValueError, match=r"the training data are empty"):
        repif.InfluenceEstimator(linear, (x[:0], y[:0]))
