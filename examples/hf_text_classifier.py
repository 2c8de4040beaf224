"""Influence, top-k and class removal for a Hugging Face text classifier, taken as it comes.

    python examples/hf_text_classifier.py [--tiny]

A ``BertForSequenceClassification`` built from a config (no download) is trained briefly on a
synthetic token task (each class owns a few marker tokens) and handed to repif unchanged: a
``DataLoader`` of dict batches (``input_ids``, ``attention_mask``, ``labels``) and the model's
``ModelOutput`` (its ``.logits`` are taken). ``--tiny`` shrinks everything to run in seconds.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

import repif

VOCAB, LENGTH, CLASSES, MARKERS = 48, 10, 3, 4


def token_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences of noise tokens with two marker tokens of their class, some padded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(1 + CLASSES * MARKERS, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
    items = []
    for i in range(n):
        length = int(lengths[i])
        where = torch.randperm(length, generator=g)[:2]
        ids[i, where] = 1 + int(y[i]) * MARKERS + torch.randint(0, MARKERS, (2,), generator=g)
        ids[i, length:] = 0
        mask = (torch.arange(LENGTH) < length).long()
        items.append({"input_ids": ids[i].clone(), "attention_mask": mask, "labels": y[i]})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (seconds)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_train, epochs = (150, 6) if args.tiny else (1200, 6)
    train, val, test = token_task(n_train, 0), token_task(n_train // 4, 1), token_task(60, 2)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=CLASSES))
    wd = 1e-4
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(epochs):
        for batch in DataLoader(train, batch_size=32, shuffle=True):
            labels = batch.pop("labels")
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            loss = loss + 0.5 * wd * sum(p.pow(2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    est = repif.InfluenceEstimator(
        model, DataLoader(train, batch_size=64), weight_decay=wd, damping=1e-3,
        solver="woodbury", sampler="logit-importance", sample_size=64, seed=0).fit()
    scores = est.influence(DataLoader(test[:4], batch_size=4))      # (4, n_train)
    print("influence", tuple(scores.shape))
    top = est.top_k(DataLoader(test[:1]), k=3)
    print("proponents of test point 0:", top.proponents.tolist())
    print("self-influence of 5 points:", est.self_influence(torch.arange(5)).tolist())
    labels = torch.stack([d["labels"] for d in train])
    forgotten = est.remove(labels == 0, scale="auto", validation=DataLoader(val))
    batch = torch.utils.data.default_collate(test)
    y = batch.pop("labels")
    with torch.no_grad():
        before, after = model(**batch).logits.argmax(-1), forgotten(**batch).logits.argmax(-1)
    for name, pred in (("before", before), ("after removing class 0", after)):
        acc = [float((pred[y == c] == c).float().mean()) for c in range(CLASSES)]
        print(f"test accuracy per class {name}: {[round(a, 2) for a in acc]}")
    print("η picked on the validation points:", est.last_removal["scale"])


if __name__ == "__main__":
    main()
