"""repif against kronfluence at ResNet size: a ResNet-9 on MNIST made 3×32×32, 10,000 pool points.

    python -m venv venv-peers
    venv-peers/bin/pip install torch==2.13.0
    venv-peers/bin/pip install --no-deps kronfluence
    venv-peers/bin/pip install accelerate einops einconv opt_einsum safetensors \\
        scikit-learn scipy tqdm numpy matplotlib           # (torch stays 2.13.0+cpu)
    PYTHONPATH=src venv-peers/bin/python benchmarks/peers/scale.py \\
        --data-dir data/mnist [--resume]             # ≈ 45 min on 2 busy cores
    PYTHONPATH=src venv-peers/bin/python benchmarks/peers/scale.py \
        --data-dir data/mnist --resume --repeat 2    # the main rows twice more (≈ 25 min)
    # the committed results: the first command, then --resume --repeat 2 (main rows), then
    # --resume --repeat 2 --repeat-rows repif-identity,kronfluence-identity,kronfluence-kfac
    PYTHONPATH=src venv-peers/bin/python benchmarks/peers/scale.py \\
        --data-dir data/mnist --quick                # smoke run (tiny pool), temp dir

Both libraries run under the same interpreter and torch (the venv above: torch 2.13.0+cpu,
kronfluence 1.0.1; repif from this checkout through ``PYTHONPATH=src``), each row in its own
child process with one torch thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).

Problem. kronfluence's CIFAR-10 example model is the ResNet-9 of the TRAK/ffcv examples
(conv–BatchNorm–ReLU blocks, a stride-2 5×5 block, two residual blocks, a max-pool, a global
max-pool, a bias-free linear head scaled by 0.2); written here from that description at a
quarter of its width (channels 16/32/64/32 for 64/128/256/128): 142,576 Conv2d/Linear
parameters. Inputs: MNIST (``repif.datasets.load("mnist")``, normalised), padded 28→32 with the
background value and repeated to 3 channels. Trained here on all 60,000 training images (Adam
1e-3, cosine decay, batches of 128, no weight decay, 1 epoch; cached in ``benchmarks/cache/``),
then BatchNorm frozen (eval mode, ``requires_grad=False``) so every method works on the same
Conv2d/Linear parameters. Pool: the first 10,000 training images; queries: the first 100 test
images; scores: (100 × 10,000), repif's sign (−∇l_testᵀ(C + λI)⁻¹∇l_train: negative =
proponent; kronfluence's scores, positive = helpful, are negated).

Damping: λ = 0.01 absolute for every method (the repo's ResNet-18 benchmark's value; weight
decay 0, so kronfluence's ``damping_factor`` = λ exactly: added to its eigenvalues as repif's
(Λ + λ)⁻¹). Curvature for both: the Fisher with labels sampled from the model (kronfluence's
``use_empirical_fisher=False``, repif's ``kronecker_options={"fisher": "sampled"}``), i.e. a
sampled estimate of the GGN.

Rows (each its own process): kronfluence EK-FAC, K-FAC and identity (its defaults otherwise:
float32, batch 256 for the factors and the training side of the scores, the 100 queries in one
batch); repif EK-FAC on the full pool, EK-FAC on logit-importance subsets (m = 1,000 and 256,
two-phase with ``candidates=8``), identity; repif's default memory budget and exact score path,
its Kronecker fits with ``cache_dir=False`` (every run fits from scratch: the default cache reads
back fits that took over a minute). Two more repif rows: the projected score path
(``scores="projected"``) of the m = 256 fit, used only if it reaches Pearson ≥ 0.95 against that
fit's exact path (it did not), and the exact subset GGN by CG on the m = 256 subset, stopped
after ``cg_time_s`` of steps with the residual it reached (one step took minutes: it does not fit).
Timed: fit (estimator or analyzer construction, sampling, factors, eigendecompositions,
eigenvalue corrections) and score (query solves, training gradients, products); imports and
data loading are not timed. Memory: the process's resident memory polled every 5 ms during the
timed part, above its level before it (the data and model are loaded already), and the child's
whole-life peak RSS (``VmHWM``). ``os.getloadavg()`` is recorded before and after each row.

Agreement: per query row, Pearson and Spearman (scipy.stats) against two references, averaged
over the queries: kronfluence's EK-FAC on the full pool (the field's de-facto standard) and
repif's EK-FAC on the full pool. No exact full-pool solve fits on this CPU.

Rows are written to ``peers-scale.json`` (and the score matrices to
``benchmarks/cache/peers-scale/``) as they finish; ``--resume`` keeps finished rows;
``--repeat K`` runs the ``--repeat-rows`` K more times (alternating order; times and memory
only, the scores checked equal to the first run's) and the report uses medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _memory import PeakRSS, peak_rss_bytes  # noqa: E402
from _process import wait_child  # noqa: E402

CONFIG = {"width": 16, "train_images": 60_000, "epochs": 1, "batch_size": 128, "lr": 1e-3,
          "pool": 10_000, "queries": 100, "damping": 0.01, "weight_decay": 0.0, "seed": 0,
          "candidates": 8, "sizes": [1000, 256], "kron_batch": 256, "cg_size": 256,
          "cg_time_s": 60}
QUICK = {"train_images": 2_000, "pool": 300, "queries": 5, "sizes": [64], "cg_size": 64,
         "cg_time_s": 10}


# --------------------------------------------------------------------------- the model
def conv_block(cin: int, cout: int, kernel: int = 3, stride: int = 1, pad: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, channels), conv_block(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def resnet9(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """The TRAK/kronfluence ResNet-9 layout with base width ``width`` (64 in the original)."""
    w = width
    return nn.Sequential(
        conv_block(3, w), conv_block(w, 2 * w, kernel=5, stride=2, pad=2), Residual(2 * w),
        conv_block(2 * w, 4 * w), nn.MaxPool2d(2), Residual(4 * w),
        conv_block(4 * w, 2 * w, pad=0), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(2 * w, num_classes, bias=False), Scale(0.2))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.requires_grad_(False)
    return model


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) normalised MNIST → (N, 3, 32, 32): padded with the background value (the
    normalised 0 pixel, the image minimum) and repeated over 3 channels."""
    background = float(x.amin())
    return F.pad(x, (2, 2, 2, 2), value=background).expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------- measurement
def correlations(scores: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean over query rows of the row-wise Pearson and Spearman correlations."""
    from scipy.stats import pearsonr, spearmanr

    p = [pearsonr(a, b)[0] for a, b in zip(scores, ref, strict=True)]
    s = [spearmanr(a, b)[0] for a, b in zip(scores, ref, strict=True)]
    return {"pearson": float(np.mean(p)), "spearman": float(np.mean(s)),
            "pearson_min": float(np.min(p))}


# --------------------------------------------------------------------------- rows
#: name → (library, options). repif: InfluenceEstimator keywords; kronfluence: its strategy.
def rows(cfg: dict) -> dict[str, tuple[str, dict]]:
    # cache_dir=False: every run fits from scratch (repif's default keeps fits longer than a
    # minute in ~/.cache/repif and reads them back, which made a repeated full fit take 2 s)
    kron = {"fisher": "sampled", "other_layers": "frozen", "cache_dir": False}
    out = {"kronfluence-ekfac": ("kronfluence", {"strategy": "ekfac"}),
           "repif-ekfac-full": ("repif", {"curvature": "ekfac", "solver": "eigen",
                                          "kronecker_options": kron})}
    for m in cfg["sizes"]:
        c = cfg["candidates"] if cfg["candidates"] * m < cfg["pool"] else None
        out[f"repif-ekfac-li-{m}"] = ("repif", {
            "curvature": "ekfac", "solver": "eigen", "kronecker_options": kron,
            "sampler": "logit-importance", "sample_size": m, "candidates": c})
    out["repif-identity"] = ("repif", {"solver": "identity"})
    out["kronfluence-kfac"] = ("kronfluence", {"strategy": "kfac"})
    out["kronfluence-identity"] = ("kronfluence", {"strategy": "identity"})
    # projected scores (repif's cheaper score path): used only if Pearson ≥ 0.95 against the
    # exact path of the same fit (the row above with the same m)
    m = cfg["sizes"][-1]
    out[f"repif-ekfac-li-{m}-projected"] = ("repif", {
        **out[f"repif-ekfac-li-{m}"][1], "scores": "projected"})
    # the exact subset GGN (CG on every query at once), stopped after cg_time_s of steps
    m = cfg["cg_size"]
    c = cfg["candidates"] if cfg["candidates"] * m < cfg["pool"] else None
    out[f"repif-cg-li-{m}"] = ("repif", {
        "solver": "cg", "sampler": "logit-importance", "sample_size": m, "candidates": c,
        "tol": 1e-6, "max_iter": 1000, "block_size": cfg["queries"],
        "cg_time_s": cfg["cg_time_s"]})
    return out


def run_repif(model, pool, queries, cfg, opts, mem: PeakRSS) -> dict:
    import repif

    opts = dict(opts)
    cap = opts.pop("cg_time_s", None)
    cg: dict = {}
    if cap is not None:  # CG stopped after cap seconds of steps; its last iterate kept
        def monitor(it: int, x: torch.Tensor) -> bool:
            cg.update(it=it, x=x, t=time.perf_counter())
            return time.perf_counter() - cg["start"] > cap

        opts["monitor"] = monitor
    t = time.perf_counter()
    est = repif.InfluenceEstimator(model, pool, damping=cfg["damping"],
                                   weight_decay=cfg["weight_decay"], seed=cfg["seed"], **opts)
    est.fit()
    fit_s = time.perf_counter() - t
    fit_mem = mem.mark()
    t = cg["start"] = time.perf_counter()
    scores = est.influence(queries)
    score_s = time.perf_counter() - t
    extra = {}
    if cap is not None:
        def residual() -> dict:
            """‖(C + λI)x − g‖/‖g‖ per query at CG's last iterate (after the timed part)."""
            g = est.test_gradients(queries)
            x = cg["x"]
            r = (est.solver.operator.matmat(x) + cfg["damping"] * x - g).detach()
            rel = (r.norm(dim=1) / g.norm(dim=1)).tolist()
            return {"cg_steps": cg["it"], "cg_time_cap_s": cap,
                    "cg_s_per_step": (cg["t"] - cg["start"]) / cg["it"],
                    "rel_residual_max": max(rel), "rel_residual_mean": float(np.mean(rel))}

        extra["residual"] = residual
    return {"scores": scores, "fit_s": fit_s, "score_s": score_s, **extra,
            "fit_peak_rss_growth_bytes": fit_mem, "version": repif.__version__,
            "timings": {k: float(v) for k, v in est.timings.items()},
            "subset_size": len(est.subset.indices) if opts.get("solver") != "identity" else None}


def run_kronfluence(model, pool, queries, cfg, opts, mem: PeakRSS) -> dict:
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import TensorDataset

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    bs = cfg["kron_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        task = Classification()
        model = prepare_model(model, task)
        an = Analyzer("scale", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        an.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        an.fit_all_factors("factors", TensorDataset(*pool), per_device_batch_size=bs,
                           factor_args=FactorArguments(strategy=opts["strategy"],
                                                       use_empirical_fisher=False))
        fit_s = time.perf_counter() - t
        fit_mem = mem.mark()
        t = time.perf_counter()
        an.compute_pairwise_scores(
            "scores", "factors", query_dataset=TensorDataset(*queries),
            train_dataset=TensorDataset(*pool), per_device_query_batch_size=len(queries[1]),
            per_device_train_batch_size=bs,
            score_args=ScoreArguments(damping_factor=cfg["damping"] + cfg["weight_decay"]))
        scores = an.load_pairwise_scores("scores")["all_modules"]
        score_s = time.perf_counter() - t
    return {"scores": -scores, "fit_s": fit_s, "score_s": score_s,
            "fit_peak_rss_growth_bytes": fit_mem, "version": kronfluence.__version__}


def child(name: str, problem: str, out: str) -> None:
    """One row, in its own process: load the problem, time fit and score under the monitor."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    prob = torch.load(problem, weights_only=False)
    cfg = prob["config"]
    lib, opts = rows(cfg)[name]
    if lib == "repif":
        import repif  # noqa: F401  (imported before the monitor, like kronfluence below)
    else:
        import kronfluence  # noqa: F401
    model = resnet9(cfg["width"])
    model.load_state_dict(prob["state"])
    freeze_batchnorm(model)
    torch.manual_seed(cfg["seed"])
    load_before = os.getloadavg()
    run = run_repif if lib == "repif" else run_kronfluence
    with PeakRSS() as mem:
        res = run(model, prob["pool"], prob["queries"], cfg, opts, mem)
    if "residual" in res:
        res.update(res.pop("residual")())
    res.update(peak_rss_growth_bytes=mem.peak - mem.base, rss_before_bytes=mem.base,
               loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()),
               total_s=res["fit_s"] + res["score_s"], library=lib, options=opts,
               max_rss_bytes=peak_rss_bytes())
    res["scores"] = res["scores"].detach().to(torch.float64).contiguous()
    torch.save(res, out)


# --------------------------------------------------------------------------- the problem
def build_problem(data_dir: str, cfg: dict, cache: Path, log) -> Path:
    """Train (or load the cached) ResNet-9 and store the pool, queries and weights for the
    children; returns the problem file."""
    from repif import datasets, io, training

    path = cache / "problem.pt"
    meta = {k: cfg[k] for k in ("width", "train_images", "epochs", "batch_size", "lr", "pool",
                                "queries", "seed", "weight_decay")}
    if path.exists():
        old = torch.load(path, weights_only=False)
        if old.get("meta") == meta:
            old["config"] = cfg
            torch.save(old, path)
            return path
    ds = datasets.load("mnist", data_dir=data_dir)
    x_train = to_rgb32(ds.train[0][: cfg["train_images"]])
    y_train = ds.train[1][: cfg["train_images"]]
    x_test, y_test = to_rgb32(ds.test[0]), ds.test[1]
    torch.manual_seed(cfg["seed"])
    model = resnet9(cfg["width"])
    t = time.perf_counter()
    model = training.train(model, (x_train, y_train), epochs=cfg["epochs"],
                           batch_size=cfg["batch_size"], lr=cfg["lr"],
                           weight_decay=cfg["weight_decay"], seed=cfg["seed"],
                           schedule="cosine", cache_dir=BENCH / "cache", progress=False)
    train_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(x_test[s : s + 1000]).argmax(1) == y_test[s : s + 1000]).sum())
                  for s in range(0, len(y_test), 1000)) / len(y_test)
    n = sum(p.numel() for p in model.parameters())
    n_cl = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
               for p in m.parameters())
    log(f"ResNet-9 (width {cfg['width']}): {n_cl:,} Conv2d/Linear parameters of {n:,}; test "
        f"accuracy {acc:.4f} (training or cache load {train_s:.0f} s)")
    prob = {"meta": meta, "config": cfg, "state": model.state_dict(),
            "pool": (x_train[: cfg["pool"]].clone(), y_train[: cfg["pool"]].clone()),
            "queries": (x_test[: cfg["queries"]].clone(), y_test[: cfg["queries"]].clone()),
            "test_accuracy": acc, "num_params": n_cl, "num_params_model": n,
            "environment": io.environment_metadata()}
    torch.save(prob, path)
    return path


def run_child(name: str, problem: Path, out: Path, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", name, str(problem),
                                 str(out)], env=env, stdout=log, stderr=subprocess.STDOUT)
        status, _ = wait_child(proc, timeout, poll=0.5, started=t0)
        log.seek(0)
        text = log.read()
    wall = time.perf_counter() - t0
    if status != 0 or not out.exists():
        return {"error": f"exit {status}: {text[-1500:]}", "wall_s": wall}
    res = torch.load(out, weights_only=False)
    res["wall_s"] = wall
    return res


# --------------------------------------------------------------------------- the report
REF_KF, REF_REPIF = "kronfluence-ekfac", "repif-ekfac-full"
#: The measured quantities a repeated run of a row adds (``--repeat``); medians over the runs.
TIMED = ("fit_s", "score_s", "total_s", "peak_rss_growth_bytes", "fit_peak_rss_growth_bytes",
         "max_rss_bytes")


def med(r: dict, key: str) -> float:
    """The median of ``key`` over a row's runs (the first and its repeats)."""
    return r.get("median", r)[key]


def annotate(res: dict, scores: dict[str, np.ndarray]) -> None:
    for r in res["rows"]:
        for key, ref in (("vs_kronfluence_ekfac", REF_KF), ("vs_repif_ekfac_full", REF_REPIF)):
            if r["name"] in scores and ref in scores and ref != r["name"]:
                r[key] = correlations(scores[r["name"]], scores[ref])
            else:
                r.pop(key, None)
        exact = r["name"].removesuffix("-projected")
        if exact != r["name"] and exact in scores and r["name"] in scores:
            r["vs_exact_score_path"] = correlations(scores[r["name"]], scores[exact])
        runs = [r, *r.get("repeats", [])]
        r["median"] = {k: float(np.median([x[k] for x in runs])) for k in TIMED if k in r}
    res["goal"] = goal(res)


def goal(res: dict, margin: float = 0.01) -> dict | None:
    """The issue's goal: at equal agreement with the reference, repif's total time ≤ 0.5×
    kronfluence's EK-FAC and its peak memory ≤ kronfluence's. Equal agreement: Pearson and
    Spearman against kronfluence's EK-FAC both within ``margin`` of repif's full-pool EK-FAC's
    (two full-pool EK-FAC fits that differ in their sampled labels and implementation)."""
    by = {r["name"]: r for r in res["rows"] if "error" not in r}
    kf, full = by.get(REF_KF), by.get(REF_REPIF)
    if not kf or not full or "vs_kronfluence_ekfac" not in full:
        return None
    floor = full["vs_kronfluence_ekfac"]
    out = {"margin": margin, "floor_pearson": floor["pearson"],
           "floor_spearman": floor["spearman"], "kronfluence_total_s": med(kf, "total_s"),
           "kronfluence_peak_rss_growth_bytes": med(kf, "peak_rss_growth_bytes"),
           "candidates": []}
    for name, r in by.items():
        if (not name.startswith("repif-") or "vs_kronfluence_ekfac" not in r
                or name.endswith("-projected") or "cg_steps" in r):  # capped CG: see its note
            continue
        v = r["vs_kronfluence_ekfac"]
        equal = (v["pearson"] >= floor["pearson"] - margin
                 and v["spearman"] >= floor["spearman"] - margin)
        t_ratio = med(r, "total_s") / med(kf, "total_s")
        m_ratio = med(r, "peak_rss_growth_bytes") / med(kf, "peak_rss_growth_bytes")
        out["candidates"].append({
            "name": name, "pearson": v["pearson"], "spearman": v["spearman"],
            "equal_agreement": equal, "time_ratio": t_ratio, "memory_ratio": m_ratio,
            "max_rss_ratio": med(r, "max_rss_bytes") / med(kf, "max_rss_bytes"),
            "met": bool(equal and t_ratio <= 0.5 and m_ratio <= 1.0)})
    out["met"] = any(c["met"] for c in out["candidates"])
    return out


def markdown(res: dict) -> str:
    cfg, mb = res["config"], 2**20
    lines = [
        "# repif against kronfluence at ResNet size", "",
        f"`PYTHONPATH=src venv-peers/bin/python benchmarks/peers/scale.py --data-dir "
        f"data/mnist` — {res['wall_s'] / 60:.1f} min in all (rows in their own processes, "
        "one torch thread each, on a 2-core machine shared with other jobs: see the load "
        "column). The script's docstring has the setup.", "",
        f"ResNet-9 (kronfluence's CIFAR-10 example layout at width {cfg['width']}: "
        f"{res['num_params']:,} Conv2d/Linear parameters, BatchNorm frozen) trained on "
        f"{cfg['train_images']:,} MNIST images made 3×32×32 ({cfg['epochs']} epoch; test "
        f"accuracy {res['test_accuracy']:.4f}). Pool: the first {cfg['pool']:,} training "
        f"images; {cfg['queries']} test queries; scores {cfg['queries']} × {cfg['pool']:,}. "
        f"λ = {cfg['damping']} for every method (kronfluence `damping_factor` = λ + wd, wd = "
        f"{cfg['weight_decay']}); labels sampled from the model for both libraries' factors. "
        f"torch {res['environment'].get('torch', '?')}, kronfluence "
        f"{res.get('kronfluence_version', '?')}.", "",
        "Agreement: mean over the queries of the row-wise Pearson / Spearman against "
        "kronfluence's EK-FAC on the full pool (the reference) and against repif's EK-FAC on "
        "the full pool. Times: fit (construction, sampling, factors, eigendecompositions, "
        "corrections) and score (the queries × pool scores). Peak: resident memory growth "
        "during fit + score over the process's level before (model and data loaded); max RSS: "
        "the child process's whole-life peak (VmHWM: interpreter, torch and the library "
        "included). Load: 1-minute load average before–after each run of the row. Rows run more "
        "than once (`--repeat`, alternating order) show medians over their runs.", "",
        "| row | m | vs kronfluence EK-FAC P / S | vs repif EK-FAC full P / S | fit s | "
        "score s | total s | peak MB | max RSS MB | load | total s per run |",
        "|" + "---|" * 11]

    def pair(r, k):
        if k in r:
            return f"{r[k]['pearson']:.3f} / {r[k]['spearman']:.3f}"
        return "(reference)" if r["name"] == {"vs_kronfluence_ekfac": REF_KF}.get(
            k, REF_REPIF) else "—"

    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | — | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        m = r.get("subset_size") or (cfg["pool"] if "identity" not in r["name"] else "—")
        runs = [r, *r.get("repeats", [])]
        totals = ", ".join(f"{x['total_s']:.0f}" for x in runs)
        load = ", ".join(f"{x['loadavg_before'][0]:.1f}–{x['loadavg_after'][0]:.1f}"
                         for x in runs)
        lines.append(
            f"| {r['name']} | {m} | {pair(r, 'vs_kronfluence_ekfac')} | "
            f"{pair(r, 'vs_repif_ekfac_full')} | {med(r, 'fit_s'):.1f} | "
            f"{med(r, 'score_s'):.1f} | {med(r, 'total_s'):.1f} | "
            f"{med(r, 'peak_rss_growth_bytes') / mb:.0f} | {med(r, 'max_rss_bytes') / mb:.0f} | "
            f"{load} | {totals} |")
    for r in res["rows"]:
        if "vs_exact_score_path" in r:
            v = r["vs_exact_score_path"]
            lines += ["", f"`{r['name']}`: repif's projected scores (`scores=\"projected\"`, "
                      "default dimension) of the same fit as the exact-path row without the "
                      f"suffix: Pearson / Spearman {v['pearson']:.3f} / {v['spearman']:.3f} "
                      "against it — " + ("≥ 0.95, so usable; the goal below still uses the "
                      "exact path." if v["pearson"] >= 0.95 else "below 0.95, so every other "
                      "repif row uses the exact score path.")]
        if "cg_steps" in r:
            lines += ["", f"`{r['name']}`: the exact GGN of its subset solved by CG for all "
                      f"{cfg['queries']} queries at once, stopped after {r['cg_time_cap_s']} s "
                      f"of steps: {r['cg_steps']} step(s) ({r['cg_s_per_step']:.0f} s each), "
                      "relative residual ‖(C + λI)x − g‖/‖g‖ "
                      f"{r['rel_residual_max']:.2e} max / {r['rel_residual_mean']:.2e} mean "
                      "over the queries" + (" — far from converged, so its agreement says "
                      "nothing about the exact subset solve (after one step CG's iterate is a "
                      "multiple of the gradient, hence the identity row's agreement), and the "
                      "exact subset solve does not fit in minutes here." if
                      r["rel_residual_max"] > 0.1 else ".")]
    for note in res.get("notes", []):
        lines += ["", note]
    g = res.get("goal")
    lines += ["", "## Goal", "",
              "At equal agreement with the reference, repif's total time ≤ 0.5× kronfluence's "
              "EK-FAC and its peak memory ≤ kronfluence's. Equal agreement: Pearson and "
              "Spearman against kronfluence's EK-FAC both within "
              f"{g['margin'] if g else 0.01} of repif's full-pool EK-FAC's (the agreement of two "
              "full-pool EK-FAC fits, which differ in their sampled labels and implementation)."]
    if not g:
        lines += ["", "Not evaluated yet: a reference row is missing."]
    else:
        lines += ["", "| repif row | P / S vs kronfluence | equal agreement | time ratio | "
                  "peak ratio | max RSS ratio | goal met |", "|" + "---|" * 7]
        for c in g["candidates"]:
            lines.append(f"| {c['name']} | {c['pearson']:.3f} / {c['spearman']:.3f} | "
                         f"{'yes' if c['equal_agreement'] else 'no'} | {c['time_ratio']:.2f} | "
                         f"{c['memory_ratio']:.2f} | {c['max_rss_ratio']:.2f} | "
                         f"{'yes' if c['met'] else 'no'} |")
        lines += ["", f"Goal {'met' if g['met'] else 'not met'} on this problem."]
    lines += ["", "## Conclusions", "", *conclusions(res)]
    return "\n".join(lines) + "\n"


def conclusions(res: dict) -> list[str]:
    """The measured ratios against the goal, the load and the caveats, from the rows."""
    g = res.get("goal")
    by = {r["name"]: r for r in res["rows"] if "error" not in r}
    if not g:
        return ["Not written yet: the reference rows are missing."]
    kf = by[REF_KF]
    out = []
    for c in g["candidates"]:
        if "ekfac" not in c["name"]:
            continue
        r = by[c["name"]]
        fit = med(r, "fit_s") / med(kf, "fit_s")
        score = med(r, "score_s") / med(kf, "score_s")
        out.append(
            f"* `{c['name']}` against kronfluence's EK-FAC: Pearson / Spearman "
            f"{c['pearson']:.3f} / {c['spearman']:.3f} "
            f"(agreement {'equal' if c['equal_agreement'] else 'not equal'} by the rule "
            f"above); total time ×{c['time_ratio']:.2f} (fit ×{fit:.2f}, score ×{score:.2f}), "
            f"peak memory growth ×{c['memory_ratio']:.2f}, whole-process peak "
            f"×{c['max_rss_ratio']:.2f} — goal {'met' if c['met'] else 'not met'}"
            + ("" if c["met"] else " (" + ", ".join(
                w for w, bad in (("agreement", not c["equal_agreement"]),
                                 ("time", c["time_ratio"] > 0.5),
                                 ("memory", c["memory_ratio"] > 1)) if bad) + ")") + ".")
    loads = [x[k][0] for r in by.values() for x in [r, *r.get("repeats", [])]
             for k in ("loadavg_before", "loadavg_after")]
    runs = max(1 + len(r.get("repeats", [])) for r in by.values())
    subset = [by[n] for n in by if n.startswith("repif-ekfac-li-") and "projected" not in n]
    share = [med(r, "score_s") / med(r, "total_s") for r in subset]
    out += [
        "",
        f"Load: the 1-minute load average was {min(loads):.1f}–{max(loads):.1f} on the 2 cores "
        "during the rows (other workers' test suites ran beside them), so each one-thread row "
        "got between about half a core and a whole one, and times vary by tens of per cent "
        f"between runs; the main rows were run up to {runs} times in alternating order and the "
        "table and ratios use medians over the runs (per-run totals in the last column).",
        "",
        "What limits it: on the subsets the score dominates "
        + (f"({min(share):.0%}–{max(share):.0%} of repif's total time)" if share else "")
        + f": {res['config']['queries']} queries against every one of the "
        f"{res['config']['pool']:,} training points need a pass of per-sample gradients over "
        "the whole pool whatever m is, so sampling the fit cannot cut the total below that "
        "pass. repif's peak memory is set by its memory budget (chunks of up to 1 GiB by "
        "default), not by m: it is close to kronfluence's (batches of 256) for every row.",
        "",
        "Caveats: one model, one seed, one problem size; float32 for both; kronfluence at "
        "its defaults with batches of 256 (not tuned), repif at its default memory budget; the "
        "reference is itself an approximation (EK-FAC; no exact full-pool solve fits here), and "
        "two full-pool EK-FAC fits agree only to the Pearson / Spearman in the first rows (they "
        "differ in their sampled labels and implementation), which is the resolution of any "
        "agreement below them. kronfluence's plain K-FAC agrees with its EK-FAC no better than "
        "the gradient dot product (identity) here; `kronfluence_peer.py` notes a likely reason "
        "(its convolution factors are averaged over positions, so the damping dominates "
        "them; EK-FAC refits the eigenvalues from per-example gradients).",
    ]
    return out


def write(out: Path, res: dict) -> None:
    from repif import io

    io.write_json_atomic(out / "peers-scale.json", res)
    tmp = out / "peers-scale.md.tmp"
    tmp.write_text(markdown(res))
    os.replace(tmp, out / "peers-scale.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data/mnist",
                    help="the four MNIST IDX files (default: data/mnist in the checkout)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already measured")
    ap.add_argument("--quick", action="store_true", help="tiny pool, 5 queries, temp dir")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    ap.add_argument("--repeat", type=int, default=0,
                    help="run the --repeat-rows this many more times (times and memory)")
    ap.add_argument("--repeat-rows", default=None,
                    help="default: both full-pool EK-FAC rows and repif's subset EK-FAC rows")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    torch.set_num_threads(1)
    cfg = dict(CONFIG, **(QUICK if args.quick else {}))
    out = Path(tempfile.mkdtemp(prefix="peers-scale-")) if args.quick else Path(args.out)
    cache = out / "cache" if args.quick else BENCH / "cache" / "peers-scale"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    from repif import io

    problem = build_problem(args.data_dir, cfg, cache, log)
    prob = torch.load(problem, weights_only=False)
    res = {"config": cfg, "num_params": prob["num_params"],
           "num_params_model": prob["num_params_model"], "test_accuracy": prob["test_accuracy"],
           "environment": io.environment_metadata(), "python": sys.executable,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "rows": [], "wall_s": 0.0}
    store = cache / "scores.pt"
    scores: dict[str, np.ndarray] = {}
    previous = out / "peers-scale.json"
    if args.resume and previous.exists() and store.exists():
        old = json.loads(previous.read_text())
        same = json.loads(json.dumps(cfg))  # keys added since the old run may be new
        if {k: same.get(k) for k in old.get("config", {})} == old.get("config"):
            saved = torch.load(store, weights_only=False)
            res["rows"] = [r for r in old["rows"] if "error" not in r and r["name"] in saved]
            scores = {r["name"]: saved[r["name"]] for r in res["rows"]}
            res["wall_s"] = old.get("wall_s", 0.0)
            for k in ("kronfluence_version", "notes", "conclusions"):
                if k in old:
                    res[k] = old[k]
            log(f"resuming with {len(res['rows'])} rows")
    names = list(rows(cfg))
    if args.rows:
        names = [n for n in args.rows.split(",") if n]
    t0, wall0 = time.perf_counter(), res["wall_s"]
    for name in names:
        if name in scores:
            continue
        log(f"{name}: running (load {os.getloadavg()[0]:.1f})")
        r = run_child(name, problem, cache / f"row-{name}.pt", args.timeout)
        row = {"name": name}
        if "error" in r:
            row.update(r)
            log(f"  failed: {r['error'][-600:]}")
        else:
            s = r.pop("scores").numpy()
            if not np.isfinite(s).all():
                row["nonfinite"] = int((~np.isfinite(s)).sum())
            scores[name] = s
            if r["library"] == "kronfluence":
                res["kronfluence_version"] = r["version"]
            row.update({k: v for k, v in r.items() if k != "options"},
                       options=json.loads(json.dumps(r["options"])))
            tmp = store.with_suffix(".tmp")
            torch.save(scores, tmp)
            os.replace(tmp, store)
        res["rows"] = [x for x in res["rows"] if x["name"] != name] + [row]
        order = list(rows(cfg))
        res["rows"].sort(key=lambda x: order.index(x["name"]) if x["name"] in order else 99)
        annotate(res, scores)
        res["wall_s"] = wall0 + time.perf_counter() - t0
        write(out, res)
        if "error" not in row:
            vs = row.get("vs_kronfluence_ekfac", {}).get("pearson", float("nan"))
            log(f"  fit {row['fit_s']:.1f} s, score {row['score_s']:.1f} s, peak +"
                f"{row['peak_rss_growth_bytes'] / 2**20:.0f} MB, vs kronfluence EK-FAC "
                f"{vs:.3f}")
    # repeated runs of the main rows (times and memory only), alternating their order
    again = ([n for n in args.repeat_rows.split(",") if n] if args.repeat_rows else
             [REF_KF, REF_REPIF, *(f"repif-ekfac-li-{m}" for m in cfg["sizes"])])
    for k in range(1, args.repeat + 1):
        for name in again if k % 2 == 0 else again[::-1]:
            row = next((x for x in res["rows"] if x["name"] == name and "error" not in x), None)
            if row is None or len(row.get("repeats", [])) >= k:
                continue
            log(f"{name}: repeat {k} (load {os.getloadavg()[0]:.1f})")
            r = run_child(name, problem, cache / f"row-{name}.pt", args.timeout)
            if "error" in r:
                log(f"  failed: {r['error'][-600:]}")
                continue
            s = r.pop("scores").numpy()
            rep = {key: r[key] for key in (*TIMED, "loadavg_before", "loadavg_after")}
            # the same seed: the same scores, up to the order of floating-point sums
            rep["scores_rel_diff"] = float(np.abs(s - scores[name]).max()
                                           / np.abs(scores[name]).max())
            row.setdefault("repeats", []).append(rep)
            annotate(res, scores)
            res["wall_s"] = wall0 + time.perf_counter() - t0
            write(out, res)
            log(f"  total {rep['total_s']:.1f} s, peak +"
                f"{rep['peak_rss_growth_bytes'] / 2**20:.0f} MB")
    annotate(res, scores)
    write(out, res)
    log(f"wrote {out / 'peers-scale.json'} and {out / 'peers-scale.md'}")
    if args.quick:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
