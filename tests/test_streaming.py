"""Streaming data through :class:`repif.InfluenceEstimator`: dict batches, Datasets, DataLoaders,
memory-sized chunks, over-budget refusals, boolean masks and custom queries.

Every expected value is computed here by hand: dense GGNs from ``torch.func.jacrev`` of the
model output per sample (Λ = diag(p) − ppᵀ), per-sample gradients from one plain autograd
backward per sample, and ``torch.linalg.solve``; never with repif's gradient, curvature or
solver code. Chunked runs are compared with unchunked ones of the same estimator settings.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, Dataset, TensorDataset

import repif
from repif.data import DataSource
from repif.errors import TooLargeError
from repif.memory import MIN_BYTES

pytestmark = pytest.mark.usefixtures("single_thread")

DAMPING = 0.1


# --------------------------------------------------------------------------- references
def _rel(got: Tensor, ref: Tensor) -> float:
    """Norm-wise relative difference ‖got − ref‖ / ‖ref‖."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    named = list(model.named_parameters())
    chunks = torch.split(theta, [p.numel() for _, p in named])
    return {n: c.reshape(p.shape) for (n, p), c in zip(named, chunks, strict=True)}


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _grads_by_loop(model: nn.Module, samples, y: Tensor, measure=_cross_entropy) -> Tensor:
    """(n, p) per-sample gradients of ``measure``: one ordinary backward per sample.
    ``samples`` is a list of (args, kwargs) holding one sample each (batch dimension 1)."""
    params = list(model.parameters())
    rows = []
    for i, (args, kwargs) in enumerate(samples):
        value = measure(model(*args, **kwargs), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _ggn_by_jacrev(model: nn.Module, samples, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i J_iᵀ(diag(p_i) − p_i p_iᵀ)J_i (default w_i = 1/n), J_i = ∂ logits_i / ∂θ."""
    theta = _flat(model)
    n = len(samples)
    weights = torch.full((n,), 1.0 / n, dtype=theta.dtype) if weights is None else weights
    h = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for (args, kwargs), w in zip(samples, weights, strict=True):

        def out(t, args=args, kwargs=kwargs):
            return functional_call(model, _unflatten(model, t), args, kwargs)[0]

        jac = jacrev(out)(theta)  # (C, p)
        with torch.no_grad():
            p = torch.softmax(out(theta), dim=-1)
        lam = torch.diag(p) - torch.outer(p, p)
        h += float(w) * jac.T @ lam @ jac
    return h


def _influence_ref(h: Tensor, g_test: Tensor, g_train: Tensor) -> Tensor:
    """−g_test (H)⁻¹ g_trainᵀ for an already damped H."""
    return -torch.linalg.solve(h, g_test.T).T @ g_train.T


def _self_ref(h: Tensor, g_train: Tensor) -> Tensor:
    return -(g_train * torch.linalg.solve(h, g_train.T).T).sum(1)


def _eye(p: int) -> Tensor:
    return torch.eye(p, dtype=torch.float64)


# --------------------------------------------------------------------------- 1. dict inputs
VOCAB, D_MODEL, N_CLASSES, SEQ = 20, 8, 3, 6


class TinyAttention(nn.Module):
    """Embedding → one hand-written single-head self-attention → masked mean-pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_MODEL)
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, D_MODEL)
        self.v = nn.Linear(D_MODEL, D_MODEL)
        self.head = nn.Linear(D_MODEL, N_CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.emb(input_ids)  # (n, L, d)
        m = attention_mask.to(h.dtype)  # (n, L)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(D_MODEL)
        scores = scores + (m[:, None, :] - 1.0) * 1e9  # padded keys get no attention
        o = torch.softmax(scores, dim=-1) @ self.v(h)
        pooled = (o * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return self.head(pooled)


class DictDataset(Dataset):
    """Items {"input_ids": (L,) long, "attention_mask": (L,), "labels": () long}."""

    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def _token_data(n: int, gen: torch.Generator, mask_dtype: torch.dtype):
    """Random token sequences of lengths 2…SEQ (padded with id 0, mask 0); the label depends
    on the tokens (their sum mod 3) so that training has something to learn."""
    lengths = torch.randint(2, SEQ + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(mask_dtype)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen) * mask.long()
    labels = (ids.sum(1) % N_CLASSES).long()
    return ids, mask, labels


def _samples_of(ids: Tensor, mask: Tensor) -> list:
    return [((ids[i : i + 1], mask[i : i + 1]), {}) for i in range(len(ids))]


@pytest.fixture(scope="module")
def attention_problem():
    gen = torch.Generator().manual_seed(0)
    ids, mask, labels = _token_data(40, gen, torch.float64)
    ids_te, mask_te, labels_te = _token_data(9, gen, torch.long)  # a long mask on the test side
    torch.manual_seed(0)
    model = TinyAttention().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):  # a brief hand-written loop (loss ≈ 0.37, far from one-hot outputs)
        opt.zero_grad()
        F.cross_entropy(model(ids, mask), labels).backward()
        opt.step()
    model.eval()
    train = DictDataset(ids, mask, labels)
    test = DictDataset(ids_te, mask_te, labels_te)

    g_train = _grads_by_loop(model, _samples_of(ids, mask), labels)
    g_test = _grads_by_loop(model, _samples_of(ids_te, mask_te), labels_te)
    p = g_train.shape[1]
    h = _ggn_by_jacrev(model, _samples_of(ids, mask)) + DAMPING * _eye(p)
    return {
        "model": model, "train": train, "test": test, "ids": ids, "mask": mask,
        "labels": labels, "g_train": g_train, "g_test": g_test, "h": h,
        "scores": _influence_ref(h, g_test, g_train), "self": _self_ref(h, g_train),
    }


def _attention_est(ap, train, **kw):
    kw = {"curvature": "ggn", "damping": DAMPING, "solver": "direct", "sample_size": None,
          **kw}
    return repif.InfluenceEstimator(ap["model"], train, **kw)


def test_dict_dataset_influence_matches_dense_reference(attention_problem):
    ap = attention_problem
    est = _attention_est(ap, ap["train"])
    n, p = len(ap["labels"]), ap["g_train"].shape[1]
    assert est.num_params == p == (VOCAB * D_MODEL + 3 * (D_MODEL + 1) * D_MODEL
                                   + (D_MODEL + 1) * N_CLASSES)
    assert est.n_train == n

    assert _rel(est.train_gradients(), ap["g_train"]) <= 1e-10
    assert _rel(est.test_gradients(ap["test"]), ap["g_test"]) <= 1e-10

    scores = est.influence(ap["test"])
    assert scores.shape == (len(ap["test"]), n)
    assert _rel(scores, ap["scores"]) <= 1e-6
    assert est.subset.indices.tolist() == list(range(n))

    some = torch.tensor([5, 0, 39, 5])
    assert _rel(est.influence(ap["test"], train_indices=some), ap["scores"][:, some]) <= 1e-6

    # the GGN matters: damping alone (H = λI) gives other scores
    assert _rel(-ap["g_test"] @ ap["g_train"].T / DAMPING, ap["scores"]) > 1e-2

    self_inf = est.self_influence()
    assert _rel(self_inf, ap["self"]) <= 1e-6
    assert bool((self_inf < 0).all())
    assert _rel(est.self_influence(torch.tensor([3, 17])), ap["self"][[3, 17]]) <= 1e-6


def test_dict_dataset_remove_matches_newton_step_on_the_rest(attention_problem):
    ap = attention_problem
    model = ap["model"]
    before = copy.deepcopy(model.state_dict())
    est = _attention_est(ap, ap["train"]).fit()
    removed = torch.tensor([3, 7, 11, 30])
    keep = torch.ones(len(ap["labels"]), dtype=torch.bool)
    keep[removed] = False
    rest = torch.nonzero(keep).flatten()

    new = est.remove(removed, scale=1.0)

    # reference: θ̂ + (C_R + λI)⁻¹ g with g = (1/|R|) Σ_S ∇l, C_R the mean GGN over R
    g = ap["g_train"][removed].sum(0) / rest.numel()
    h_r = _ggn_by_jacrev(model, _samples_of(ap["ids"][rest], ap["mask"][rest]))
    h_r += DAMPING * _eye(g.numel())
    expected = _flat(model) + torch.linalg.solve(h_r, g)
    assert _rel(_flat(new), expected) <= 1e-6
    # the full-data curvature would give another step: the test can tell them apart
    full_step = _flat(model) + torch.linalg.solve(ap["h"], g)
    assert _rel(full_step, expected) > 1e-4

    assert new is not model
    for name, t in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(t, before[name]), name
    assert torch.equal(_flat(est.model), _flat(model))  # and so is the estimator's copy
    assert est.subset.indices.tolist() == list(range(len(ap["labels"])))  # its fit kept


# --------------------------------------------------------------------------- 2. DataLoader
@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_gives_the_dataset_scores(attention_problem, shuffle):
    ap = attention_problem
    loader = DataLoader(ap["train"], batch_size=7, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(1))
    sizes = []
    original = DataSource.batches

    def spy(self, indices, rows):
        for offset, batch in original(self, indices, rows):
            sizes.append(len(batch["labels"]))
            yield offset, batch

    est = _attention_est(ap, loader)
    assert est.source.batch_size == 7
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DataSource, "batches", spy)
        scores = est.influence(ap["test"])
        self_inf = est.self_influence()
    # the loader's batch size caps the chunks; indices are dataset positions, even if it shuffles
    assert sizes and max(sizes) == 7
    assert _rel(scores, ap["scores"]) <= 1e-6
    assert _rel(self_inf, ap["self"]) <= 1e-6
    reference = _attention_est(ap, ap["train"])
    assert _rel(scores, reference.influence(ap["test"])) <= 1e-10


def test_worker_processes_give_the_same_results(attention_problem):
    ap = attention_problem
    plain = _attention_est(ap, ap["train"], batch_size=4)
    workers = _attention_est(ap, ap["train"], batch_size=4, num_workers=2)
    some = torch.tensor([39, 2, 17, 2])
    assert torch.equal(workers.train_gradients(some), plain.train_gradients(some))
    assert _rel(workers.influence(ap["test"]), ap["scores"]) <= 1e-6
    assert _rel(workers.self_influence(some), ap["self"][some]) <= 1e-6


def test_test_dataloader_keeps_its_own_collate(attention_problem):
    ap = attention_problem
    est = _attention_est(ap, ap["train"])
    test = ap["test"]
    items = [{"ids": test.ids[i], "mask": test.mask[i], "y": test.labels[i]}
             for i in range(len(test))]

    def collate(batch):
        return {"input_ids": torch.stack([b["ids"] for b in batch]),
                "attention_mask": torch.stack([b["mask"] for b in batch]),
                "labels": torch.stack([b["y"] for b in batch])}

    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    assert _rel(est.influence(loader), ap["scores"]) <= 1e-6


def test_top_k_of_a_dict_batch_of_one(attention_problem):
    ap = attention_problem
    est = _attention_est(ap, ap["train"])
    test = ap["test"]
    one = {"input_ids": test.ids[:1], "attention_mask": test.mask[:1],
           "labels": test.labels[:1]}
    top = est.top_k(one, k=3)
    assert top.proponents.tolist() == torch.argsort(ap["scores"][0])[:3].tolist()


# --------------------------------------------------------------------------- 3. chunking
N_CHUNK_TRAIN, N_CHUNK_TEST = 300, 3


@pytest.fixture(scope="module")
def mlp_problem(digits_mlp):
    model, (x, y), (xt, yt) = digits_mlp
    return model, (x[:N_CHUNK_TRAIN], y[:N_CHUNK_TRAIN]), (xt[:N_CHUNK_TEST], yt[:N_CHUNK_TEST])


def _woodbury_bytes(m: int, c: int, p: int) -> int:
    rows = m * c
    return rows * p * 8 + 2 * rows * rows * 8


SOLVER_SETTINGS = {
    "cg": {"solver": "cg", "tol": 1e-10, "max_iter": 2000},
    "woodbury": {"solver": "woodbury"},
}


def _chunk_quantities(est, test, self_idx, removed):
    return {
        "scores": est.influence(test),
        "self": est.self_influence(self_idx),
        "grads": est.train_gradients(),
        "removed": _flat(est.remove(removed)),
    }


@pytest.mark.parametrize("solver", ["cg", "woodbury"])
def test_tiny_budget_chunks_change_nothing(mlp_problem, solver):
    model, train, test = mlp_problem
    p = sum(t.numel() for t in model.parameters())
    common = {"curvature": "ggn", "damping": DAMPING, "sampler": "logit-importance",
              "sample_size": 32, "seed": 5, **SOLVER_SETTINGS[solver]}
    self_idx, removed = torch.tensor([0, 157, 299]), torch.tensor([4, 9, 190])

    default = repif.InfluenceEstimator(model, train, **common)
    ref = _chunk_quantities(default, test, self_idx, removed)

    # the Woodbury factor must fit; then the rest of the budget holds few rows per chunk
    budget = MIN_BYTES if solver == "cg" else _woodbury_bytes(32, 10, p) + MIN_BYTES
    tiny = repif.InfluenceEstimator(model, train, max_memory=budget, **common)
    got = _chunk_quantities(tiny, test, self_idx, removed)

    sizes = []  # points per chunk of a training-gradient pass under the tiny budget
    original = DataSource.batches

    def spy(self, indices, rows):
        for offset, batch in original(self, indices, rows):
            sizes.append(len(batch[-1]))
            yield offset, batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DataSource, "batches", spy)
        tiny.train_gradients()
    assert sum(sizes) == N_CHUNK_TRAIN
    if solver == "cg":  # a row or two per chunk
        assert max(sizes) <= 2, sizes
    else:  # the factor takes most of the budget: the gradients came in several chunks
        assert max(sizes) < N_CHUNK_TRAIN, sizes

    assert torch.equal(tiny.subset.indices, default.subset.indices)
    for key, value in ref.items():
        assert _rel(got[key], value) <= 1e-6, key
    assert got["scores"].shape == (N_CHUNK_TEST, N_CHUNK_TRAIN)

    # a Dataset of (x, y) tuples: the same subset and the same scores
    ds = repif.InfluenceEstimator(model, TensorDataset(*train), **common)
    assert torch.equal(ds.fit().subset.indices, default.subset.indices)
    assert torch.allclose(ds.subset.weights, default.subset.weights, rtol=1e-12, atol=0)
    assert _rel(ds.influence(TensorDataset(*test)), ref["scores"]) <= 1e-6
    assert _rel(ds.self_influence(self_idx), ref["self"]) <= 1e-6


# --------------------------------------------------------------------------- 4. over budget
def test_woodbury_over_budget_refuses_naming_cg(mlp_problem):
    model, train, _ = mlp_problem
    est = repif.InfluenceEstimator(model, train, solver="woodbury", sampler="logit-importance",
                                   sample_size=32, max_memory=MIN_BYTES)
    with pytest.raises(TooLargeError) as err:
        est.fit()
    msg = str(err.value)
    assert "woodbury" in msg and "cg" in msg
    assert "MiB" in msg or "KiB" in msg
    assert isinstance(err.value, MemoryError)
    with pytest.raises(TooLargeError):  # a lazy fit refuses in the same way
        est.self_influence(torch.tensor([0]))


def test_direct_over_budget_refuses_naming_cg(mlp_problem):
    model, train, _ = mlp_problem
    est = repif.InfluenceEstimator(model, train, solver="direct", max_memory=MIN_BYTES)
    with pytest.raises(TooLargeError, match="cg") as err:
        est.fit()
    msg = str(err.value)
    assert "direct" in msg
    assert "MiB" in msg or "KiB" in msg


# --------------------------------------------------------------------------- small linear model
@pytest.fixture(scope="module")
def linear_problem():
    """nn.Linear(5, 3) on 30 random points, trained briefly; 6 test points."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    w_true = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = (x @ w_true + 0.5 * torch.randn(30, 3, generator=gen, dtype=torch.float64)).argmax(1)
    xt = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    yt = (xt @ w_true).argmax(1)
    torch.manual_seed(3)
    model = nn.Linear(5, 3).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    samples = [((x[i : i + 1],), {}) for i in range(len(x))]
    test_samples = [((xt[i : i + 1],), {}) for i in range(len(xt))]
    return {"model": model, "x": x, "y": y, "xt": xt, "yt": yt, "samples": samples,
            "test_samples": test_samples, "ggn": _ggn_by_jacrev(model, samples),
            "g_train": _grads_by_loop(model, samples, y),
            "g_test": _grads_by_loop(model, test_samples, yt)}


# --------------------------------------------------------------------------- 5. tuple API
def test_tuple_api_with_weight_decay(linear_problem):
    lp = linear_problem
    wd = 1e-2
    est = repif.InfluenceEstimator(lp["model"], (lp["x"], lp["y"]), damping=DAMPING,
                                   weight_decay=wd)
    assert est.weight_decay == wd
    p = lp["ggn"].shape[0]
    h = lp["ggn"] + (wd + DAMPING) * _eye(p)
    scores = est.influence((lp["xt"], lp["yt"]))
    assert _rel(scores, _influence_ref(h, lp["g_test"], lp["g_train"])) <= 1e-6
    assert _rel(est.self_influence(), _self_ref(h, lp["g_train"])) <= 1e-6

    # weight decay enters the removal gradient: g = ((1/|S|)Σ_S ∇l + wd θ̂)·|S|/|R|
    removed = torch.tensor([2, 8])
    rest = torch.tensor([i for i in range(30) if i not in (2, 8)])
    theta = _flat(lp["model"])
    g = (lp["g_train"][removed].mean(0) + wd * theta) * 2 / 28
    h_r = _ggn_by_jacrev(lp["model"], [lp["samples"][i] for i in rest]) + (wd + DAMPING) * _eye(p)
    assert _rel(_flat(est.remove(removed)), theta + torch.linalg.solve(h_r, g)) <= 1e-6


def test_task_weight_decay_conflict_and_agreement(linear_problem):
    lp = linear_problem
    data = (lp["x"], lp["y"])
    task = repif.ClassificationTask(weight_decay=1e-2)
    with pytest.raises(ValueError, match="weight_decay"):
        repif.InfluenceEstimator(lp["model"], data, task=task, weight_decay=2e-2)
    assert repif.InfluenceEstimator(lp["model"], data, task=task).weight_decay == 1e-2
    same = repif.InfluenceEstimator(lp["model"], data, task=task, weight_decay=1e-2)
    assert same.weight_decay == 1e-2

    plain = repif.ClassificationTask()  # wd 0: the argument sets it on a copy
    est = repif.InfluenceEstimator(lp["model"], data, task=plain, weight_decay=3e-3)
    assert est.weight_decay == 3e-3
    assert plain.weight_decay == 0.0
    assert repif.InfluenceEstimator(lp["model"], data).weight_decay == 0.0


# --------------------------------------------------------------------------- 6. boolean masks
def test_boolean_masks_equal_their_indices(linear_problem):
    lp = linear_problem
    y = lp["y"]
    est = repif.InfluenceEstimator(lp["model"], (lp["x"], y), damping=DAMPING)
    mask = y == 1
    idx = torch.nonzero(mask).flatten()
    assert 0 < idx.numel() < len(y)

    assert torch.equal(_flat(est.remove(mask)), _flat(est.remove(idx)))
    assert torch.equal(est.self_influence(mask), est.self_influence(idx))
    test = (lp["xt"], lp["yt"])
    assert torch.equal(est.influence(test, train_indices=mask),
                       est.influence(test, train_indices=idx))
    assert torch.equal(est.train_gradients(mask), est.train_gradients(idx))
    h = lp["ggn"] + DAMPING * _eye(lp["ggn"].shape[0])
    assert _rel(est.self_influence(mask), _self_ref(h, lp["g_train"][idx])) <= 1e-6

    short = torch.ones(len(y) - 1, dtype=torch.bool)
    for call in (est.remove, est.self_influence, est.train_gradients):
        with pytest.raises(ValueError, match="mask"):
            call(short)
        with pytest.raises(ValueError, match="integers"):
            call(torch.tensor([1.7]))
    with pytest.raises(ValueError, match="mask"):
        est.influence(test, train_indices=short)
    with pytest.raises(ValueError, match="integers"):
        est.influence(test, train_indices=torch.tensor([1.7]))


# --------------------------------------------------------------------------- 7. custom query
def _margin(out: Tensor, y: Tensor) -> Tensor:
    """Correct-class logit minus the largest other logit."""
    correct = out.gather(1, y[:, None]).squeeze(1)
    own = torch.arange(out.shape[1], device=out.device)[None, :] == y[:, None]
    others = out.masked_fill(own, float("-inf"))
    return correct - others.max(1).values


class MarginTask(repif.ClassificationTask):
    def query_from_output(self, output: Tensor, targets: Tensor) -> Tensor:
        return _margin(output, targets)


def test_custom_query_uses_its_gradient_on_the_test_side(linear_problem):
    lp = linear_problem
    est = repif.InfluenceEstimator(lp["model"], (lp["x"], lp["y"]), damping=DAMPING,
                                   task=MarginTask())
    q_test = _grads_by_loop(lp["model"], lp["test_samples"], lp["yt"], measure=_margin)
    h = lp["ggn"] + DAMPING * _eye(lp["ggn"].shape[0])
    test = (lp["xt"], lp["yt"])

    assert _rel(est.test_gradients(test, measure="query"), q_test) <= 1e-10
    assert _rel(est.test_gradients(test), lp["g_test"]) <= 1e-10  # the loss by default
    scores = est.influence(test)
    assert _rel(scores, _influence_ref(h, q_test, lp["g_train"])) <= 1e-6
    # the query really changed the scores; training side and self-influence keep the loss
    assert _rel(scores, _influence_ref(h, lp["g_test"], lp["g_train"])) > 1e-2
    assert _rel(est.train_gradients(), lp["g_train"]) <= 1e-10
    assert _rel(est.self_influence(), _self_ref(h, lp["g_train"])) <= 1e-6


# --------------------------------------------------------------------------- 8. progress bars
def test_progress_bars_do_not_change_results(linear_problem, attention_problem):
    lp = linear_problem
    data, test = (lp["x"], lp["y"]), (lp["xt"], lp["yt"])
    quiet = repif.InfluenceEstimator(lp["model"], data, damping=DAMPING, progress=False)
    loud = repif.InfluenceEstimator(lp["model"], data, damping=DAMPING, progress=True)
    assert torch.equal(quiet.influence(test), loud.influence(test))
    assert torch.equal(quiet.self_influence(), loud.self_influence())
    assert torch.equal(_flat(quiet.remove(torch.tensor([0]))),
                       _flat(loud.remove(torch.tensor([0]))))
    ap = attention_problem
    dict_loud = _attention_est(ap, ap["train"], progress=True)
    assert _rel(dict_loud.influence(ap["test"]), ap["scores"]) <= 1e-6


@pytest.mark.parametrize("free, expected", [(64 * 2**30, 2**30), (2 * 2**30, 2**29)])
def test_default_budget_is_a_quarter_of_free_memory_capped_on_the_cpu(monkeypatch, free,
                                                                       expected):
    from repif import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: free)
    assert memory.MemoryBudget.resolve(None, "cpu").bytes == expected
    assert memory.MemoryBudget.resolve(None, None).bytes == expected
    assert memory.MemoryBudget.resolve(3 * 2**30, "cpu").bytes == 3 * 2**30  # a figure is kept
