"""How good a class removal and an inverse-HVP estimate are (docs/design.md, "Protocol")."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RemovalScores:
    """forget, consistency, accuracy on the other classes, and two F1s (all in [0, 1]).

    ``f1`` is repif's: forget against consistency with the original model's predictions.
    ``f1_literature`` is the class-removal literature's: forget against the plain accuracy on
    the other classes (their true labels), so it also rewards or penalises how right the
    original model was (docs/design.md, "Protocol").
    """

    forget: float
    consistency: float
    accuracy_remaining: float
    f1: float
    f1_literature: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def f1_score(forget: float, consistency: float) -> float:
    """Harmonic mean 2·f·c/(f + c); 0 when both are 0."""
    return 0.0 if forget + consistency == 0 else 2 * forget * consistency / (forget + consistency)


def removal_scores(
    new_pred: Tensor, original_pred: Tensor, labels: Tensor, removed_class: int | Iterable[int]
) -> RemovalScores:
    """Scores of a removal from test-set predictions (all (n,) integer tensors).

    forget = 1 − fraction of class-``removed_class`` points still predicted as it (several
    removed classes: as their own class);
    consistency = fraction of other-class points whose prediction equals the original model's;
    accuracy_remaining = plain accuracy on the other-class points.
    """
    if not (new_pred.shape == original_pred.shape == labels.shape):
        raise ValueError(
            f"predictions and labels must have one shape, got {tuple(new_pred.shape)}, "
            f"{tuple(original_pred.shape)} and {tuple(labels.shape)}"
        )
    classes = [int(removed_class)] if isinstance(removed_class, int) else sorted(
        int(c) for c in removed_class)
    target = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))
    shown = classes[0] if len(classes) == 1 else classes
    if not bool(target.any()):
        raise ValueError(f"no test point has class {shown}; cannot measure forgetting")
    if bool(target.all()):
        raise ValueError("every test point is of the removed class; consistency is undefined")
    forget = 1.0 - float((new_pred[target] == labels[target]).double().mean())
    other = ~target
    consistency = float((new_pred[other] == original_pred[other]).double().mean())
    accuracy = float((new_pred[other] == labels[other]).double().mean())
    return RemovalScores(forget, consistency, accuracy, f1_score(forget, consistency),
                         f1_score(forget, accuracy))


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """‖estimate − reference‖ / ‖reference‖."""
    return float((estimate - reference).norm() / reference.norm())


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors."""
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


def seed_spread(estimates: list[Tensor]) -> float:
    """1 − mean pairwise cosine of estimates across seeds (0 = identical directions).

    Read it only beside the error against the full-pool solve: a sampler can be consistently
    wrong.
    """
    if len(estimates) < 2:
        return float("nan")
    pairs = [cosine(a, b) for a, b in itertools.combinations(estimates, 2)]
    return 1.0 - sum(pairs) / len(pairs)


@torch.no_grad()
def predict(model: torch.nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """(n,) arg-max predictions of ``model`` in eval mode, on the model's device and dtype."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    out = [
        model(x[s : s + batch_size].to(p.device, p.dtype)).argmax(-1).cpu()
        for s in range(0, x.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)
