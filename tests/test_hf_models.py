"""Hugging Face models as they come: a BertForSequenceClassification built from a config (no
download) fed dict batches, its output in every common form, against the same model wrapped to
return a tensor (the path that needs nothing of the model's output)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import repif
from repif.gradients.streaming import per_sample_gradients
from repif.task import FunctionalModel

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, CLASSES = 40, 8, 3
README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config).double().eval()


def token_items(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding, so the attention mask matters
    return [{"input_ids": i, "attention_mask": m, "labels": i[0] % CLASSES}
            for i, m in zip(ids, mask, strict=True)]


class Logits(nn.Module):
    """The model seen through ``pick``: what its forward returns becomes ``pick(output)``."""

    def __init__(self, model: nn.Module, pick) -> None:
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, **inputs):
        return self.pick(self.model(**inputs))


FORMS = {
    "model-output": lambda out: out,                            # HF's SequenceClassifierOutput
    "object-with-logits": lambda out: type("Out", (), {"logits": out.logits})(),
    "dict": lambda out: {"hidden": out.logits.sum(), "logits": out.logits},
    "tuple": lambda out: (out.logits, out.logits.sum()),
    "list": lambda out: [out.logits],
}


@pytest.fixture(scope="module")
def data():
    return token_items(24, 0), token_items(4, 1)


def _scores(model: nn.Module, train, test) -> torch.Tensor:
    est = repif.InfluenceEstimator(model, DataLoader(train, batch_size=8), solver="woodbury",
                                   damping=0.1)
    return est.influence(DataLoader(test, batch_size=8))


@pytest.fixture(scope="module")
def reference(data):
    return _scores(Logits(tiny_bert(), lambda out: out.logits), *data)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_output_form_gives_the_tensor_models_scores(form, data, reference):
    model = tiny_bert() if form == "model-output" else Logits(tiny_bert(), FORMS[form])
    scores = _scores(model, *data)
    assert scores.shape == (4, 24)
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)


def test_return_dict_false_gives_a_tuple_with_the_logits_first(data, reference):
    model = tiny_bert()
    model.config.return_dict = False
    assert isinstance(model(**{k: v[None] for k, v in data[0][0].items() if k != "labels"}),
                      tuple)
    torch.testing.assert_close(_scores(model, *data), reference, rtol=1e-9, atol=1e-12)


def test_the_hook_engine_takes_every_bert_layer(data):
    """Embeddings (the position embeddings' one shared row included), LayerNorm and every
    Linear have closed-form rules, checked against torch.func when the estimator is built."""
    est = repif.InfluenceEstimator(tiny_bert(), DataLoader(data[0], batch_size=8),
                                   solver="woodbury", per_sample="hooks")
    assert est.cost.engine is not None
    fm = FunctionalModel(est.model)
    batch = torch.utils.data.default_collate(data[0][:5])
    x = {k: v for k, v in batch.items() if k != "labels"}
    mine = est.cost.engine.gradients(x, batch["labels"])
    ref = per_sample_gradients(fm, x, batch["labels"])
    torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-10)


def test_readme_hugging_face_snippet_runs_as_written():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "BertForSequenceClassification" in b)
    namespace = {"repif": repif, "torch": torch}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    n = len(namespace["token_dataset"])
    assert namespace["scores"].shape == (len(namespace["query_dataset"]), n)
    assert isinstance(namespace["forgotten"], nn.Module)


def test_gpt2_conv1d_and_position_embeddings_have_closed_form_rules():
    """GPT-2's Conv1D (y = x W + b, W of shape (in, out)) and its position embeddings (one row
    shared by the batch) go through the hook engine, equal to torch.func's gradients."""
    from repif.gradients.hooks import layer_engine

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, num_labels=CLASSES, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2ForSequenceClassification(config).double().eval()
    fm = FunctionalModel(model)
    batch = torch.utils.data.default_collate(token_items(5, 3))
    x = {k: v for k, v in batch.items() if k != "labels"}
    x["attention_mask"] = torch.ones_like(x["attention_mask"])  # GPT-2 pools the last token
    engine = layer_engine(fm, x, batch["labels"])
    assert engine is not None
    assert any(type(b.module).__name__ == "Conv1D" for b in engine.blocks)
    torch.testing.assert_close(engine.gradients(x, batch["labels"]),
                               per_sample_gradients(fm, x, batch["labels"]),
                               rtol=1e-8, atol=1e-10)
