"""Per-sample gradients of transformer models by the hook engine's rules against torch.func.

    python benchmarks/layer_rules.py [--points 64] [--threads 1]

For each model (built from a config, float32, eval mode, random weights: the cost of a gradient
does not depend on training), in one process and one run, best of ``REPEATS``:

* ``pass``: one batched forward+backward of the summed loss over the points;
* ``hooks``: their per-sample gradients by the hook engine (``per_sample="auto"``: closed-form
  rules where a layer has one, the generic rule — the module rerun per point under ``vmap`` —
  for the others, which are listed);
* ``func``: the same by ``torch.func.vmap(grad)`` of the whole model (``per_sample="func"``);
* the largest relative difference between the two (round-off only, float32).

Models: a Hugging Face ViT (its ``cls_token`` and position embeddings are bare parameters of
``ViTEmbeddings``: generic rule), a ``torch.nn.TransformerEncoder`` classifier
(``nn.MultiheadAttention``: its own rule, generic kind), and a Hugging Face BERT (every layer
has a closed form: no generic rule). Results: ``benchmarks/results/layer-rules.json`` and
``layer-rules.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "layer-rules.json"
REPORT = HERE / "results" / "layer-rules.md"
sys.path.insert(0, str(HERE))
from _timing import REPEATS, best  # noqa: E402


class EncoderClassifier(nn.Module):
    """Token and position embeddings → nn.TransformerEncoder (2 layers) → mean → head."""

    def __init__(self, vocab: int = 1000, d: int = 64, tokens: int = 32, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(tokens, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head(self.encoder(self.emb(ids) + self.pos(positions)).mean(1))


def problems(points: int) -> dict[str, tuple[nn.Module, Any, torch.Tensor]]:
    import transformers

    gen = torch.Generator().manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, num_labels=10,
        attn_implementation="eager"))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, num_labels=4,
        attn_implementation="eager"))
    ids = torch.randint(1, 1000, (points, 32), generator=gen)
    y4 = torch.randint(0, 4, (points,), generator=gen)
    return {
        "hf-vit": (vit, torch.randn(points, 3, 32, 32, generator=gen),
                   torch.randint(0, 10, (points,), generator=gen)),
        "torch-transformer": (EncoderClassifier(), ids, y4),
        "hf-bert": (bert, {"input_ids": ids, "labels": y4}, y4),
    }


def measure(name: str, model: nn.Module, x: Any, y: torch.Tensor) -> dict[str, Any]:
    from repif.data import DataSource
    from repif.gradients.hooks import choose_engine, generic_layers
    from repif.gradients.streaming import per_sample_gradients, split_batch
    from repif.task import FunctionalModel

    model = model.eval()
    fm = FunctionalModel(model)
    data = x if isinstance(x, dict) else (x, y)
    source = DataSource(data)
    inputs, targets = split_batch(fm, source.gather(torch.arange(len(source))))
    engine = choose_engine(fm, source, "auto")
    assert engine is not None, f"{name}: the hook engine refused the model"

    def one_pass() -> None:
        theta = fm.theta.detach().requires_grad_(True)
        torch.autograd.grad(fm.losses(theta, inputs, targets).sum(), theta)

    hooks = engine.gradients(inputs, targets)
    func = per_sample_gradients(fm, inputs, targets)
    diff = float((hooks - func).norm() / func.norm())
    row = {"model": name, "parameters": fm.space.size, "points": int(targets.shape[0]),
           "generic_layers": generic_layers(engine),
           "pass_s": best(one_pass),
           "hooks_s": best(lambda: engine.gradients(inputs, targets)),
           "func_s": best(lambda: per_sample_gradients(fm, inputs, targets)),
           "rel_diff": diff}
    row["hooks_x_pass"] = row["hooks_s"] / row["pass_s"]
    row["func_x_pass"] = row["func_s"] / row["pass_s"]
    row["speedup"] = row["func_s"] / row["hooks_s"]
    print(json.dumps(row), flush=True)
    return row


def report(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [
        "# Per-sample gradients of transformers: layer rules against torch.func",
        "",
        f"`python benchmarks/layer_rules.py --points {config['points']} --threads "
        f"{config['threads']}` (float32, eval mode, best of {REPEATS}; commit "
        f"{config.get('commit', '?')}).",
        "",
        "| model | parameters | pass (s) | hooks (s) | torch.func (s) | hooks ÷ pass | "
        "func ÷ pass | speed-up | rel. diff | generic rule on |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['pass_s']:.3f} | {r['hooks_s']:.3f} | "
            f"{r['func_s']:.3f} | {r['hooks_x_pass']:.2f} | {r['func_x_pass']:.2f} | "
            f"{r['speedup']:.2f}× | {r['rel_diff']:.1e} | "
            f"{', '.join(r['generic_layers']) or 'none'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from repif import io

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip() or "?"
    config = {"points": args.points, "threads": args.threads, "commit": commit,
              **io.environment_metadata()}
    rows = [measure(name, *p) for name, p in problems(args.points).items()]
    out = Path(args.out)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(rows, config))


if __name__ == "__main__":
    main()
