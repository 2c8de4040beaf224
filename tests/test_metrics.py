"""The removal and faithfulness metrics of docs/design.md, "Protocol", on small hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repif.metrics import (
    RemovalScores,
    cosine,
    f1_score,
    predict,
    relative_error,
    removal_scores,
    seed_spread,
)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------- removal scores
def test_removal_scores_hand_computed():
    # Removed class 2: four test points of class 2, six of the other classes.
    labels = _t([2, 2, 2, 2, 0, 0, 1, 1, 3, 3])
    original = _t([2, 2, 2, 2, 0, 1, 1, 1, 2, 0])
    new = _t([2, 0, 1, 3, 0, 1, 1, 0, 3, 3])
    s = removal_scores(new, original, labels, removed_class=2)
    # 1 of the 4 class-2 points is still predicted 2 -> forget = 1 - 1/4.
    assert s.forget == pytest.approx(0.75)
    # Others: new == original at positions 4, 5, 6 (not 7, 8, 9) -> 3/6.
    assert s.consistency == pytest.approx(0.5)
    # Others: new == label at positions 4, 6, 8, 9 -> 4/6.
    assert s.accuracy_remaining == pytest.approx(4 / 6)
    # F1 = 2 * 0.75 * 0.5 / 1.25.
    assert s.f1 == pytest.approx(0.6)
    # The literature's F1 pairs forget with the accuracy: 2 * 0.75 * (4/6) / (0.75 + 4/6).
    assert s.f1_literature == pytest.approx(2 * 0.75 * (4 / 6) / (0.75 + 4 / 6))
    assert isinstance(s, RemovalScores)
    assert s.as_dict() == {"forget": s.forget, "consistency": s.consistency,
                           "accuracy_remaining": s.accuracy_remaining, "f1": s.f1,
                           "f1_literature": s.f1_literature}


def test_removal_scores_perfect_removal():
    labels = _t([0, 0, 1, 2, 1])
    original = _t([0, 0, 1, 1, 1])
    new = _t([1, 2, 1, 1, 1])  # nothing predicted 0; the others unchanged
    s = removal_scores(new, original, labels, removed_class=0)
    assert (s.forget, s.consistency, s.f1) == (1.0, 1.0, 1.0)
    assert s.accuracy_remaining == pytest.approx(2 / 3)  # label 2 was predicted 1


def test_removal_scores_nothing_forgotten():
    labels = _t([1, 1, 1, 0, 2])
    original = _t([1, 1, 1, 0, 2])
    s = removal_scores(original.clone(), original, labels, removed_class=1)
    assert s.forget == 0.0
    assert s.consistency == 1.0
    assert s.accuracy_remaining == 1.0
    assert s.f1 == 0.0


def test_removal_scores_everything_broken():
    # The removed class is forgotten by predicting it everywhere else: forget 1, consistency 0.
    labels = _t([3, 0, 1])
    original = _t([3, 0, 1])
    new = _t([0, 3, 3])
    s = removal_scores(new, original, labels, removed_class=3)
    assert (s.forget, s.consistency, s.accuracy_remaining, s.f1) == (1.0, 0.0, 0.0, 0.0)


def test_removal_scores_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        removal_scores(_t([0, 1, 1]), _t([0, 1]), _t([0, 1, 1]), removed_class=0)
    with pytest.raises(ValueError, match="one shape"):
        removal_scores(_t([0, 1]), _t([0, 1]), _t([0, 1, 1]), removed_class=0)


def test_removal_scores_no_point_of_removed_class():
    labels = _t([0, 1, 1])
    with pytest.raises(ValueError, match="no test point has class 5"):
        removal_scores(labels, labels, labels, removed_class=5)


def test_removal_scores_only_removed_class():
    labels = _t([4, 4])
    with pytest.raises(ValueError, match="consistency is undefined"):
        removal_scores(labels, labels, labels, removed_class=4)


# --------------------------------------------------------------------------- F1
@pytest.mark.parametrize(
    ("forget", "consistency", "expected"),
    [
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.5, 1.0, 2 / 3),
        (0.75, 0.5, 0.6),
        (0.9, 0.9, 0.9),
    ],
)
def test_f1_score(forget, consistency, expected):
    assert f1_score(forget, consistency) == pytest.approx(expected)


def test_f1_is_symmetric_and_below_the_arithmetic_mean():
    for f, c in [(0.2, 0.9), (0.6, 0.3), (0.99, 0.01)]:
        assert f1_score(f, c) == pytest.approx(f1_score(c, f))
        assert min(f, c) <= f1_score(f, c) <= (f + c) / 2


# --------------------------------------------------------------------------- faithfulness
def test_relative_error():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.tensor([0.0, 4.0]), ref) == pytest.approx(3 / 5)
    assert relative_error(torch.zeros(2), ref) == pytest.approx(1.0)
    assert relative_error(2 * ref, ref) == pytest.approx(1.0)
    assert isinstance(relative_error(ref, ref), float)


def test_relative_error_is_not_symmetric():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    assert relative_error(a, b) == pytest.approx(0.5)
    assert relative_error(b, a) == pytest.approx(1.0)


def test_cosine():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert cosine(e1, e2) == pytest.approx(0.0)
    assert cosine(e1, e1) == pytest.approx(1.0)
    assert cosine(e1, -e1) == pytest.approx(-1.0)
    assert cosine(e1, torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])) == pytest.approx(1.0)
    # Works on any shape (flattened) and returns a Python float.
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = cosine(m, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert isinstance(c, float) and c == pytest.approx(1 / math.sqrt(2))


def test_seed_spread_identical_vectors_is_zero():
    v = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    assert seed_spread([v, v.clone(), v.clone()]) == pytest.approx(0.0, abs=1e-12)
    # Only directions matter: a rescaled estimate is as consistent.
    assert seed_spread([v, 5 * v]) == pytest.approx(0.0, abs=1e-12)


def test_seed_spread_orthogonal_pair_is_one():
    assert seed_spread([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]) == pytest.approx(1.0)


def test_seed_spread_opposite_pair_is_two():
    v = torch.tensor([1.0, 2.0])
    assert seed_spread([v, -v]) == pytest.approx(2.0)


def test_seed_spread_three_vectors_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # Pairwise cosines 1 (e1, e1), 0, 0: mean 1/3, spread 2/3.
    assert seed_spread([e1, e1, e2]) == pytest.approx(2 / 3)


def test_seed_spread_needs_two_vectors():
    assert math.isnan(seed_spread([torch.tensor([1.0, 0.0])]))
    assert math.isnan(seed_spread([]))


# --------------------------------------------------------------------------- predict
def test_predict_is_argmax_and_restores_training_mode():
    model = nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    model.train()
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-2.0, -2.0]], dtype=torch.float32)
    pred = predict(model, x, batch_size=2)  # two batches; inputs cast to the model's dtype
    assert pred.tolist() == [0, 1, 2]
    assert pred.dtype == torch.long
    assert model.training
