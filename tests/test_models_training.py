import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repif import datasets, models, training
from repif.training import load_or_train, train


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", seed=0)


def _shape(c, h, w):
    return SimpleNamespace(input_shape=(c, h, w), num_classes=10)


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_build_forward_and_head(name, shape):
    model = models.build(name, _shape(*shape), seed=0)
    out = model.eval()(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    head = models.head(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert head is linears[-1] and head.out_features == 10
    feats = {}
    head.register_forward_hook(lambda m, inp, out: feats.setdefault("x", inp[0]))
    assert torch.allclose(model(torch.ones(2, *shape)), head(feats["x"]))
    if shape == (1, 28, 28) and name == "cnn":
        assert 5_000 <= models.num_parameters(model) <= 30_000


def test_model_sizes_and_determinism(digits):
    mlp = models.build("mlp", digits)
    assert models.num_parameters(mlp) == 4810
    state = torch.get_rng_state()
    a, b = models.build("cnn", digits, seed=3), models.build("cnn", digits, seed=3)
    c = models.build("cnn", digits, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="mlp, cnn, resnet"):
        models.build("vgg", digits)
    assert models.names() == ["linear", "mlp", "cnn", "resnet", "resnet18"]


def _weights(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def test_training_is_deterministic(digits):
    runs = []
    for seed in (0, 0, 1):
        m = models.build("mlp", digits, seed=0)
        train(m, digits.train, epochs=2, seed=seed)
        runs.append(_weights(m))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


def test_digits_mlp_default_recipe_accuracy(digits):
    state = torch.get_rng_state()
    model = models.build("mlp", digits, seed=0)
    out = train(model, digits.train)
    assert out is model and not model.training
    assert torch.equal(state, torch.get_rng_state())
    with torch.no_grad():
        acc = (model(digits.test[0]).argmax(1) == digits.test[1]).float().mean().item()
    assert acc >= 0.9


def test_train_accepts_torch_dataset_and_sgd(digits):
    x, y = digits.train
    ds = torch.utils.data.TensorDataset(x[:100], y[:100])
    a, b = models.build("mlp", digits), models.build("mlp", digits)
    train(a, ds, epochs=1, optimizer="sgd", lr=0.05, weight_decay=1e-3)
    train(b, (x[:100], y[:100]), epochs=1, optimizer="sgd", lr=0.05, weight_decay=1e-3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="optimizer"):
        train(a, ds, optimizer="lbfgs")


def test_resnet_left_in_eval_mode(digits):
    x, y = digits.train
    model = models.build("resnet", digits, hidden=4)
    train(model, (x[:64], y[:64]), epochs=1)
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_bad_inputs_raise(digits):
    x, y = digits.train
    x = x[:50].clone()
    x[3, 0, 0, 0] = float("nan")
    x[4, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite"):
        train(models.build("mlp", digits), (x, y[:50]), epochs=1)
    bad = y[:50].clone()
    bad[7] = 12
    with pytest.raises(ValueError, match="label 12"):
        train(models.build("mlp", digits), (digits.train[0][:50], bad), epochs=1)
    bad[7] = -1
    with pytest.raises(ValueError, match="label -1"):
        train(models.build("mlp", digits), (digits.train[0][:50], bad), epochs=1)
    with pytest.raises(ValueError, match="integer"):
        train(models.build("mlp", digits), (digits.train[0][:50], y[:50].float()), epochs=1)


@pytest.fixture
def fit_counter(monkeypatch):
    calls = []
    real = training._fit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_fit", counting)
    return calls


def test_cache_reused_only_when_metadata_matches(digits, tmp_path, fit_counter):
    kw = dict(seed=0, epochs=1, cache_dir=tmp_path)
    a = load_or_train(digits, "mlp", **kw)
    assert len(fit_counter) == 1 and len(os.listdir(tmp_path)) == 1
    b = load_or_train(digits, "mlp", **kw)
    assert len(fit_counter) == 1  # reused
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    load_or_train(digits, "mlp", **{**kw, "seed": 1})
    assert len(fit_counter) == 2
    load_or_train(digits, "mlp", **{**kw, "epochs": 2})
    assert len(fit_counter) == 3
    load_or_train(digits, "mlp", **{**kw, "weight_decay": 1e-3})
    assert len(fit_counter) == 4
    other = datasets.load("digits", seed=1)
    load_or_train(other, "mlp", **kw)
    assert len(fit_counter) == 5
    load_or_train(digits, "mlp", **kw)
    assert len(fit_counter) == 5
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".safetensors")] == []


def test_cache_with_resnet_buffers(digits, tmp_path, fit_counter):
    small = datasets.load("digits", seed=0, limit_train=64, limit_test=10)
    a = load_or_train(small, "resnet", epochs=1, cache_dir=tmp_path, hidden=4)
    b = load_or_train(small, "resnet", epochs=1, cache_dir=tmp_path, hidden=4)
    assert len(fit_counter) == 1 and not b.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_corrupt_cache_warns_and_retrains(digits, tmp_path, fit_counter):
    load_or_train(digits, "mlp", epochs=1, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt model cache"):
        load_or_train(digits, "mlp", epochs=1, cache_dir=tmp_path)
    assert len(fit_counter) == 2
    load_or_train(digits, "mlp", epochs=1, cache_dir=tmp_path)  # rewritten, reused
    assert len(fit_counter) == 2


def test_train_cache_keyed_by_data(digits, tmp_path, fit_counter):
    x, y = digits.train
    m = models.build("mlp", digits)
    train(m, (x[:100], y[:100]), epochs=1, cache_dir=tmp_path)
    train(models.build("mlp", digits), (x[:100], y[:100]), epochs=1, cache_dir=tmp_path)
    assert len(fit_counter) == 1
    train(models.build("mlp", digits), (x[1:101], y[1:101]), epochs=1, cache_dir=tmp_path)
    assert len(fit_counter) == 2
    train(models.build("mlp", digits, seed=5), (x[:100], y[:100]), epochs=1, cache_dir=tmp_path)
    assert len(fit_counter) == 3


def test_cosine_schedule_is_deterministic_and_differs_from_constant():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))

    def fit(schedule: str) -> torch.Tensor:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        train(model, (x, y), epochs=3, batch_size=8, seed=0, schedule=schedule)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(fit("cosine"), fit("cosine"))
    assert not torch.allclose(fit("cosine"), fit("constant"))
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        train(nn.Linear(5, 3), (x, y), schedule="step")


def test_logistic_regression_and_deeper_mlp():
    lr = models.build("linear", _shape(1, 28, 28))
    assert models.num_parameters(lr) == 784 * 10 + 10
    with pytest.raises(ValueError, match="has no hidden size"):
        models.build("linear", _shape(1, 28, 28), hidden=8)
    mlp = models.build("mlp", _shape(1, 28, 28), hidden=(128, 64), seed=0)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [128, 64, 10]
    assert list(models.build("mlp", _shape(1, 8, 8), hidden=32).state_dict()) == [
        "1.weight", "1.bias", "3.weight", "3.bias"]  # one hidden layer: as before
    with pytest.raises(ValueError, match="non-empty sequence"):
        models.build("mlp", _shape(1, 8, 8), hidden=(16, 0))


def test_sgd_momentum_option():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))

    def fit(**kw) -> torch.Tensor:
        model = models.build("linear", SimpleNamespace(input_shape=(5,), num_classes=3), seed=1)
        train(model, (x, y), epochs=2, batch_size=8, seed=0, optimizer="sgd", lr=0.1, **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(fit(), fit(momentum=0.9))  # the default
    assert not torch.allclose(fit(momentum=0.0), fit())
    with pytest.raises(ValueError, match="optimizer='sgd' only"):
        train(nn.Linear(5, 3), (x, y), momentum=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.5"):
        train(nn.Linear(5, 3), (x, y), optimizer="sgd", momentum=1.5)
