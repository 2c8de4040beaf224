"""repif over torch.distributed: 2 gloo processes on the CPU give one process's numbers.

Each run starts real processes (tests/_distributed_worker.py, one per rank, on 127.0.0.1 with a
free port) so that the process group, its collectives and its failures are the real ones. Float
sums are added in another order over 2 ranks, so values agree to a relative 1e-5 (the issue's
bound); subsets, pool statistics and the two ranks' results agree bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repif import distributed
from repif.studies.class_removal.study import MEASURED_FIELDS

WORKER = Path(__file__).with_name("_distributed_worker.py")
REL_TOL = 1e-5
#: Seconds a launch may take before the test kills it and fails (a hang is a failure).
LAUNCH_TIMEOUT_S = 300
#: Collective timeout inside the workers: a failing rank must stop the others well before it.
WORKER_COLLECTIVE_TIMEOUT_S = 60
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _launch(args: list[str], world: int, cwd: Path) -> list[subprocess.Popen]:
    """``world`` processes of ``python args…`` as ranks of one gloo group (one plain process
    when ``world`` is 1)."""
    if world == 1:
        return [subprocess.Popen([sys.executable, *args], env=_env(), cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, *args],
            env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world),
                     RANK=str(r), LOCAL_RANK=str(r),
                     REPIF_DIST_TIMEOUT=str(WORKER_COLLECTIVE_TIMEOUT_S)),
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process; kills them all and fails the test past
    ``timeout``."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"processes still running after {timeout} s: a rank hangs")
        out.append((p.returncode, err))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The ``compare`` scenario in one process and in two, run side by side."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    procs = {"one": _launch([str(WORKER), "compare", str(one)], 1, one),
             "two": _launch([str(WORKER), "compare", str(two)], 2, two)}
    done = {k: _wait(v, LAUNCH_TIMEOUT_S) for k, v in procs.items()}
    for name, results in done.items():
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"{name}, rank {rank} exited {code}:\n{err[-3000:]}"
    return (torch.load(one / "rank0.pt"), torch.load(two / "rank0.pt"),
            torch.load(two / "rank1.pt"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_ranks_hold_identical_results(runs):
    _, rank0, rank1 = runs
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


#: Pool statistics and sampler weights from one process against two: the same sums over
#: other chunk compositions (and per-process thread counts), so they may differ in the last
#: bits on some processors; 1e-12 relative is far below any difference a sampler could act on.
CROSS_PROCESS_RTOL = 1e-12


@pytest.mark.parametrize("key", ["subset_importance", "subset_kmeans"])
def test_subsets_are_identical(runs, key):
    single, sharded, _ = runs
    assert torch.equal(single[key], sharded[key])


@pytest.mark.parametrize("key", ["weights_importance", "weights_kmeans", "logits", "features"])
def test_weights_and_pool_statistics_agree(runs, key):
    single, sharded, _ = runs
    torch.testing.assert_close(sharded[key], single[key], rtol=CROSS_PROCESS_RTOL, atol=0)


@pytest.mark.parametrize("key", [
    "train_gradients", "ihvp_1", "ihvp_5", "ihvp_shrink", "ihvp_woodbury", "ihvp_direct",
    "ihvp_lissa", "influence", "influence_1", "self_influence", "self_influence_lissa",
    "removed_params",
])
def test_numbers_match_one_process(runs, key):
    single, sharded, _ = runs
    assert single[key].shape == sharded[key].shape
    assert _rel(sharded[key], single[key]) <= REL_TOL


def test_removal_f1_matches_one_process(runs):
    single, sharded, _ = runs
    assert float(sharded["removal_f1"]) == pytest.approx(float(single["removal_f1"]),
                                                         rel=REL_TOL)


@pytest.mark.parametrize("how", ["raise", pytest.param("kill", marks=pytest.mark.slow)])
def test_failing_rank_stops_every_rank(tmp_path, how):
    """Rank 1 raises (or is killed) while rank 0 waits in a collective: both exit non-zero,
    long before the collective timeout, and rank 0 says why."""
    start = time.monotonic()
    results = _wait(_launch([str(WORKER), how, str(tmp_path)], 2, tmp_path), LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    (code0, err0), (code1, err1) = results
    assert (tmp_path / "rank1.started").exists(), err1[-3000:]
    assert code0 != 0 and code1 != 0
    assert not (tmp_path / "rank0.finished").exists()
    assert "DistributedError" not in err0  # one line, no traceback
    assert "rank 0:" in err0 and "failed" in err0
    if how == "raise":
        assert "because rank 1 failed" in err0
        assert "injected failure on rank 1" in err1
    assert elapsed < WORKER_COLLECTIVE_TIMEOUT_S + 30  # setup time; no wait for the timeout


@pytest.mark.slow
def test_failing_rank_in_a_users_script_stops_every_rank(tmp_path):
    """The same failure in a script that made the group itself (no run_launched): the
    uncaught exception aborts the group, so rank 0 stops at once naming rank 1."""
    start = time.monotonic()
    results = _wait(_launch([str(WORKER), "api-raise", str(tmp_path)], 2, tmp_path),
                    LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    (code0, err0), (code1, err1) = results
    assert code0 != 0 and code1 != 0
    assert not (tmp_path / "rank0.finished").exists()
    assert "injected failure on rank 1" in err1
    assert "because rank 1 failed" in err0, err0[-3000:]
    assert elapsed < WORKER_COLLECTIVE_TIMEOUT_S  # stopped by the abort, not the timeout


@pytest.mark.parametrize("what,message", [
    ("other-data", "other training data"), ("other-labels", "other training data"),
    ("other-seed", "other estimator options"),
    pytest.param("other-test", "other test data", marks=pytest.mark.slow)])
def test_ranks_given_other_data_or_options_refuse(tmp_path, what, message):
    """A rank given other points, labels, seed or test set would be silently overruled or
    mixed in; every rank refuses instead, naming rank 1."""
    results = _wait(_launch([str(WORKER), what, str(tmp_path)], 2, tmp_path), LAUNCH_TIMEOUT_S)
    for rank, (code, _) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        assert not (tmp_path / f"rank{rank}.finished").exists()
    assert f"rank(s) 1 hold {message} than rank 0" in results[0][1], results[0][1][-3000:]


# --------------------------------------------------------------------------- in one process
def test_helpers_are_identities_without_a_process_group():
    t = torch.arange(7.0)
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.local_range(7, 3) == (0, 7)
    for fn in (distributed.shard, distributed.all_reduce_sum, distributed.all_gather_cat,
               distributed.broadcast):
        assert fn(t) is t or torch.equal(fn(t), t)
    assert distributed.agree(5) == 5 and distributed.gather_numbers(2.5) == [2.5]
    assert distributed.output_dir(Path("x")) == Path("x")
    assert distributed.run_launched(lambda: 3) == 3  # not launched: just runs


@pytest.mark.parametrize("n,block,world", [(10, 1, 3), (1000, 64, 2), (1000, 64, 3), (5, 4, 4),
                                           (2, 1, 3)])
def test_shares_tile_the_points_in_order(monkeypatch, n, block, world):
    """Rank r's share follows rank r − 1's, the shares cover every point once, and shares
    start on multiples of the block (so chunk boundaries fall where one process puts them)."""
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.local_range(n, block))
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
    assert all(lo % block == 0 for lo, _ in shares)
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= block  # balanced to within one block


@pytest.mark.slow
def test_torchrun_class_removal_writes_the_same_results(tmp_path):
    """``torchrun --nproc_per_node=2 -m repif class-removal …`` (rank 0 writes) and one process
    write the same results.json, up to timings and memory."""
    args = ["class-removal", "--dataset", "digits", "--model", "mlp", "--width", "32",
            "--remove", "0", "--samplers", "random,logit-importance", "--sizes", "16,32",
            "--seeds", "1", "--solver", "cg", "--epochs", "3", "--quiet"]
    one = _launch(["-m", "repif", *args, "--out", str(tmp_path / "one")], 1, tmp_path)
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "repif", *args,
                "--out", str(tmp_path / "two")]
    two = _launch(torchrun, 1, tmp_path)
    for code, err in _wait(one + two, LAUNCH_TIMEOUT_S):
        assert code == 0, err[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["config_hash"] == b["config_hash"]
    varying = {*MEASURED_FIELDS, "memory_method"}  # per process: RSS sampling or not
    for rows in ("references", "cells"):
        assert len(a[rows]) == len(b[rows]) > 0
        for ra, rb in zip(a[rows], b[rows], strict=True):
            assert ra.keys() == rb.keys()
            for k in ra.keys() - varying:
                if isinstance(ra[k], float):
                    assert rb[k] == pytest.approx(ra[k], rel=REL_TOL), (rows, k)
                else:
                    assert rb[k] == ra[k], (rows, k)
    assert not list(tmp_path.glob("two/.repif.lock*"))  # rank 0's lock released


def test_torchrun_evaluate_spreads_retraining_and_writes_the_same_results(tmp_path):
    """``torchrun --nproc_per_node=2 -m repif evaluate …``: the ranks share the retraining
    (each trains about half, and rank 0 ends up holding every model), and results.json has one
    process's scores. A second run trains nothing."""
    args = ["evaluate", "--dataset", "digits", "--model", "linear", "--limit-train", "120",
            "--limit-test", "12", "--epochs", "2", "--subsets", "10", "--methods",
            "ggn:direct,ggn:cg@logit-importance,grad-dot", "--sizes", "30", "--seeds", "1",
            "--quiet"]
    one = _launch(["-m", "repif", *args, "--out", str(tmp_path / "one")], 1, tmp_path)
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "repif", *args,
                "--out", str(tmp_path / "two")]
    for code, err in _wait(one + _launch(torchrun, 1, tmp_path), LAUNCH_TIMEOUT_S):
        assert code == 0, err[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    jobs = 1 + 10 * 2  # the attributed model, 10 subsets × (1 ground-truth seed + 1 noise seed)
    assert a["ground_truth"]["trained_now"] == b["ground_truth"]["trained_now"] == jobs
    models = {p.name for p in (tmp_path / "one" / "ground-truth").rglob("*.safetensors")}
    assert len(models) == jobs
    assert {p.name for p in (tmp_path / "two" / "ground-truth").rglob("*.safetensors")} == models
    assert a["config_hash"] == b["config_hash"]
    assert b["ground_truth"]["reliability"]["mean"] == pytest.approx(
        a["ground_truth"]["reliability"]["mean"], rel=REL_TOL)
    cells = {(c["method"], c["sample_size"], c["seed"], c["damping"]): c for c in a["cells"]}
    assert len(b["cells"]) == len(cells) > 0
    for c in b["cells"]:
        ref = cells[(c["method"], c["sample_size"], c["seed"], c["damping"])]
        assert c["score"] == pytest.approx(ref["score"], rel=REL_TOL, abs=1e-9)
        assert c["per_test"] == pytest.approx(ref["per_test"], rel=REL_TOL, abs=1e-9)
    again = _launch(torchrun[:4] + [f"--master_port={_free_port()}"] + torchrun[5:], 1, tmp_path)
    for code, err in _wait(again, LAUNCH_TIMEOUT_S):
        assert code == 0, err[-3000:]
    b2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b2["ground_truth"]["trained_now"] == 0
