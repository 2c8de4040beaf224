"""Influence, top-k, self-influence and class removal for a torchvision ResNet-18, as it comes.

    python examples/torchvision_resnet.py [--tiny]

``torchvision.models.resnet18(num_classes=10)`` is trained briefly on synthetic 3×32×32
images (each class a noisy colour pattern) and handed to repif unchanged. BatchNorm runs in
eval mode during influence computations (the estimator works on a copy). EK-FAC covers the
convolutions and the final Linear; the BatchNorm parameters are left to
``other_layers="identity"``. ``--tiny`` shrinks everything to run in seconds.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import repif

CLASSES = 10


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % CLASSES
    return patterns[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = 60 if args.tiny else 500
    train, val, test = images(n, 0), images(n // 2, 1), images(100, 2)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    model = repif.train(model, train, epochs=2 if args.tiny else 5, weight_decay=1e-4, seed=0)

    est = repif.InfluenceEstimator(
        model, train, curvature="ekfac", solver="eigen", damping=1e-3, weight_decay=1e-4,
        sampler="logit-importance", sample_size=min(64, n // 2), seed=0,
        kronecker_options={"other_layers": "identity"}).fit()
    scores = est.influence((test[0][:4], test[1][:4]))               # (4, n_train)
    print("influence", tuple(scores.shape))
    top = est.top_k((test[0][0], test[1][0]), k=3)
    print("proponents of test point 0:", top.proponents.tolist())
    print("self-influence of 5 points:", est.self_influence(torch.arange(5)).tolist())
    forgotten = est.remove(train[1] == 0, scale="auto", validation=val)
    with torch.no_grad():
        for name, m in (("before", model.eval()), ("after removing class 0", forgotten)):
            pred = m(test[0]).argmax(-1)
            acc = [round(float((pred[test[1] == c] == c).float().mean()), 2)
                   for c in range(CLASSES)]
            print(f"test accuracy per class {name}: {acc}")
    print("η picked on the validation points:", est.last_removal["scale"])


if __name__ == "__main__":
    main()
