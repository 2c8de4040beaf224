"""A tiny Hugging Face BERT, as a user brings it, on a synthetic token task: class removal with
``scale="auto"``, self-influence of many points against the influence matrix, and Kronecker
curvatures against the exact GGN.

    python benchmarks/bert_removal.py [--threads 1] [--quick]

The model is ``BertForSequenceClassification`` built from a config (2 layers, hidden 64, 4 heads,
no download) and fed a ``DataLoader`` of dict batches (``input_ids``, ``attention_mask``,
``labels``); the estimator gets it unchanged (its ``ModelOutput``'s logits are taken). The task:
sequences of 12 tokens of a 64-token vocabulary with random padding; each class owns 4 marker
tokens, a sequence carries 2 markers of its class among noise tokens. Trained with Adam
(weight decay 1e-4) to high test accuracy.

* Removal: every training point of class 2, GGN with CG on a logit-importance subset of the
  remaining points, η picked by ``remove(..., scale="auto", validation=…)`` on a held-out
  validation split; goal: class 2's test accuracy below 20%, the others keep ≥ 90% of theirs.
* Self-influence of 500 training points against the 5×500 influence matrix, same estimator,
  per solver; goal: ≤ 3× the matrix's time.
* Score agreement (Pearson, 5×500) of EK-FAC (``other_layers`` "identity" and "frozen") with
  the exact subset GGN solved by Woodbury.

Results: ``benchmarks/results/bert-removal.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

OUT = Path(__file__).parent / "results"
VOCAB, LENGTH, CLASSES, MARKERS = 64, 12, 4, 4
REMOVED = 2
WD = 1e-4


def token_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n sequences: noise tokens ≥ CLASSES·MARKERS+1, two markers of the class, random padding."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    first = 1 + CLASSES * MARKERS
    ids = torch.randint(first, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
    items = []
    for i in range(n):
        L = int(lengths[i])
        pos = torch.randperm(L, generator=g)[:2]
        ids[i, pos] = 1 + int(y[i]) * MARKERS + torch.randint(0, MARKERS, (2,), generator=g)
        mask = (torch.arange(LENGTH) < L).long()
        ids[i, L:] = 0
        items.append({"input_ids": ids[i].clone(), "attention_mask": mask, "labels": y[i]})
    return items


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=LENGTH, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def fit_model(train: list, epochs: int, seed: int = 0) -> torch.nn.Module:
    model = tiny_bert(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in DataLoader(train, batch_size=32, shuffle=True, generator=g):
            labels = batch.pop("labels")
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            # (wd/2)‖θ‖², the objective the estimator is told about
            loss = loss + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def per_class_accuracy(model: torch.nn.Module, data: list) -> list[float]:
    batch = torch.utils.data.default_collate(data)
    labels = batch.pop("labels")
    pred = model(**batch).logits.argmax(-1)
    return [float((pred[labels == c] == c).float().mean()) for c in range(CLASSES)]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    import repif

    n_train, n_val, n_test = (400, 200, 200) if args.quick else (2000, 400, 1000)
    epochs = 4 if args.quick else 8
    train, val, test = token_task(n_train, 0), token_task(n_val, 1), token_task(n_test, 2)
    t0 = time.perf_counter()
    model = fit_model(train, epochs)
    train_s = time.perf_counter() - t0
    p = sum(q.numel() for q in model.parameters())
    before = per_class_accuracy(model, test)
    loader = DataLoader(train, batch_size=64)
    labels = torch.stack([d["labels"] for d in train])
    rec: dict = {"config": {"n_train": n_train, "n_val": n_val, "n_test": n_test,
                            "epochs": epochs, "params": p, "threads": args.threads,
                            "torch": torch.__version__, "machine": platform.machine()},
                 "train_s": train_s, "test_accuracy_per_class": before}
    print(f"p={p} trained in {train_s:.0f}s, per-class test accuracy {before}")

    # ---- removal with scale="auto"
    m = 128 if args.quick else 256
    t0 = time.perf_counter()
    est = repif.InfluenceEstimator(model, loader, solver="cg", damping=1e-3, weight_decay=WD,
                                   sampler="logit-importance", sample_size=m, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", repif.RemovalWarning)
        removed = est.remove(labels == REMOVED, scale="auto", validation=DataLoader(val))
    removal_s = time.perf_counter() - t0
    after = per_class_accuracy(removed, test)
    kept = [after[c] / before[c] for c in range(CLASSES) if c != REMOVED]
    rec["removal"] = {
        "solver": "cg", "curvature": "ggn", "sampler": "logit-importance", "sample_size": m,
        "damping": 1e-3, "scale": est.last_removal["scale"],
        "validation_f1": est.last_removal.get("validation_f1"),
        "test_accuracy_per_class": after, "removed_class_accuracy": after[REMOVED],
        "others_kept_share_min": min(kept), "time_s": removal_s,
        "warnings": [str(w.message) for w in caught],
        "goal_met": after[REMOVED] < 0.2 and min(kept) >= 0.9}
    print("removal", rec["removal"])

    # ---- self-influence of 500 points against the 5×500 influence matrix
    k = 100 if args.quick else 500
    idx = torch.arange(k)
    query = DataLoader(test[:5], batch_size=5)
    rec["self_influence"], scores = [], {}
    for label, solver, extra in (
            ("woodbury", "woodbury", {}), ("cg", "cg", {}),
            ("ekfac-identity", "eigen", {"curvature": "ekfac",
                                         "kronecker_options": {"other_layers": "identity"}}),
            ("ekfac-frozen", "eigen", {"curvature": "ekfac",
                                       "kronecker_options": {"other_layers": "frozen"}})):
        e = repif.InfluenceEstimator(model, loader, solver=solver, damping=1e-3,
                                     weight_decay=WD, sampler="logit-importance",
                                     sample_size=m, seed=0, **extra).fit()
        t0 = time.perf_counter()
        scores[label] = e.influence(query, train_indices=idx)
        matrix_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        e.self_influence(idx)
        self_s = time.perf_counter() - t0
        row = {"solver": label, "points": k, "matrix_5xk_s": matrix_s, "self_influence_s":
               self_s, "ratio": self_s / matrix_s,
               "pearson_vs_exact_ggn": pearson(scores[label], scores["woodbury"])}
        rec["self_influence"].append(row)
        print(row, flush=True)
        OUT.mkdir(exist_ok=True)
        (OUT / "bert-removal.json").write_text(json.dumps(rec, indent=1))
    write_markdown(rec)


def write_markdown(rec: dict) -> None:
    c, r = rec["config"], rec["removal"]
    lines = [
        "# Tiny BERT: removal with scale=\"auto\", self-influence, EK-FAC agreement",
        "",
        f"`python benchmarks/bert_removal.py --threads {c['threads']}`: "
        f"BertForSequenceClassification from a config ({c['params']:,} parameters), "
        f"{c['n_train']} training / {c['n_val']} validation / {c['n_test']} test sequences of "
        f"the synthetic marker-token task, {c['epochs']} epochs, torch {c['torch']}, one CPU "
        "thread on a shared 2-core machine (times are wall-clock under load).",
        "",
        f"Test accuracy per class before: {[round(a, 3) for a in rec['test_accuracy_per_class']]}",
        "",
        "## Removal of class 2",
        "",
        f"GGN, CG, logit-importance m = {r['sample_size']}, damping {r['damping']}; "
        f"`remove(labels == 2, scale=\"auto\", validation=…)` picked η = {r['scale']} "
        f"(validation F1 {r['validation_f1']:.3f}) in {r['time_s']:.0f} s.",
        "",
        f"Test accuracy per class after: {[round(a, 3) for a in r['test_accuracy_per_class']]}; "
        f"removed class {r['removed_class_accuracy']:.3f} (goal < 0.2), the others keep at "
        f"least {r['others_kept_share_min']:.1%} of their accuracy (goal ≥ 90%): goal "
        f"{'met' if r['goal_met'] else 'NOT met'}. Warnings: {r['warnings'] or 'none'}.",
        "",
        "## Self-influence of many points against the influence matrix",
        "",
        "| curvature / solver | points | 5×k influence (s) | self-influence (s) | ratio | "
        "Pearson with exact GGN (5×k scores) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rec["self_influence"]:
        lines.append(f"| {row['solver']} | {row['points']} | {row['matrix_5xk_s']:.2f} | "
                     f"{row['self_influence_s']:.2f} | {row['ratio']:.2f} | "
                     f"{row['pearson_vs_exact_ggn']:.3f} |")
    lines += ["", "Goal: self-influence ≤ 3× the 5×k matrix. Every row uses the same "
              "logit-importance subset; \"exact GGN\" is the Woodbury solve of that subset's "
              "GGN (CG solves the same system)."]
    (OUT / "bert-removal.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
