"""Distributed benchmark: the scale benchmark's ResNet-18 job, narrowed, on 1 and 2 processes.

    python benchmarks/distributed.py --data-dir DIR [--procs 1,2] [--pool 4000] [--width 16]
    python benchmarks/distributed.py --report        # rewrite the .md (and projection) only

For each N in ``--procs`` the launcher starts
``python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/distributed.py
--worker JOB`` (gloo on the CPU, one torch thread per process; with N = 1 repif runs as one plain
process). Each rank runs the job of ``benchmarks/scale.py``'s ``fit`` and ``influence`` steps on
the first ``--pool`` MNIST training images and the first 10 test images, phase by phase, with a
barrier between phases (so a phase's wall time is the slowest rank's):

* ``build``: ``InfluenceEstimator(model, pool, solver="cg", sampler="logit-importance",
  sample_size=m, max_iter=--cg-iters, tol=0)`` (CG runs exactly ``--cg-iters`` steps);
* ``fit``: the logit/feature pass over the pool (``pool_s``), the draw, the subset gathered;
* ``test_gradients``: the 10 query gradients;
* ``ihvp``: (C + λI)⁻¹ of the 10 query gradients (over 2 ranks the rows are split: each rank
  solves its 5 with the whole subset, only the solutions travel);
* ``ihvp_lockstep``: one right-hand side (the removal step's case): the ranks run CG in
  lockstep and each curvature-vector product is summed over the ranks' halves of the subset;
* ``influence``: ``influence(queries)`` against the whole pool (its own 10 solves included).

The collectives are counted by wrapping ``torch.distributed``'s ``all_reduce``,
``all_gather_single`` / ``all_gather_into_tensor``, ``broadcast``, ``broadcast_object_list``
and ``barrier`` (the functions repif's distributed module calls): calls and bytes per phase,
for each payload size.
Rank 0 saves its results; the launcher compares N = 2 with N = 1 (identical subsets, maximum
relative difference of the inverse-HVPs and scores) and projects the full-width ResNet-18 on the
60,000-image pool to 8 GPUs and 4 × 8 GPUs (see ``project``). A finished N is kept in
``results/distributed.json`` and skipped by the next run (``--force`` redoes it); rank 0's
tensors go to ``benchmarks/cache/distributed/`` (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "distributed.json"
REPORT = HERE / "results" / "distributed.md"
SCALE_RESULTS = HERE / "results" / "scale.json"
TENSORS = HERE / "cache" / "distributed"
PHASES = ("build", "fit", "test_gradients", "ihvp", "ihvp_lockstep", "influence")
N_QUERIES = 10
#: Fixed per-rank memory budget, so that chunk sizes (and so the sums' order) do not depend on
#: the memory free when a rank starts.
MAX_MEMORY = 2 * 2**30

# ------------------------------------------------------------------ projection constants
#: Effective all-reduce bus bandwidth inside one 8-GPU node with NVLink/NVSwitch, bytes/s.
#: nccl-tests report ~230 GB/s (A100) to ~450 GB/s (H100) bus bandwidth for large messages;
#: 150 GB/s leaves room for mid-sized messages (one ResNet-18 vector is 45 MB) and no overlap.
NVLINK_BUS_BW = 150e9
#: Effective bus bandwidth of a ring that crosses nodes, bytes/s: one 200 Gb/s InfiniBand or
#: RoCE link per node (25 GB/s) is the ring's slowest hop (more NICs per node would raise it).
INTERNODE_BUS_BW = 25e9
#: Fixed cost of one collective, seconds: NCCL's small-message latency is ~10-30 µs inside an
#: NVLink node and ~50-100 µs across an InfiniBand fabric; the larger figures are taken.
LATENCY_INTRA_S = 30e-6
LATENCY_INTER_S = 100e-6
#: Full-width ResNet-18 (width 64) on MNIST and the pool of the scale benchmark.
FULL_WIDTH = 64
FULL_POOL = 60_000
FULL_SUBSET = 256  # scale.py's SAMPLE_SIZE
#: Devices of the projection: (name, N, bus bandwidth, latency).
TARGETS = (("1 node × 8 GPUs (NVLink)", 8, NVLINK_BUS_BW, LATENCY_INTRA_S),
           ("4 nodes × 8 GPUs (25 GB/s between nodes)", 32, INTERNODE_BUS_BW, LATENCY_INTER_S))
#: Single-device times of one block curvature product (10 right-hand sides over the 256-point
#: subset) at which the projection's efficiency is shown, besides the measured CPU figure.
PRODUCT_TIMES_S = (1e-3, 1e-2, 1e-1)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------ counting collectives
class CollectiveCounter:
    """Wraps torch.distributed's collectives and sums calls and bytes per (phase, op, size).

    all_reduce and broadcast: the tensor's bytes (each rank's payload); all_gather: the bytes
    of the gathered output (what every rank ends up holding, its own share included);
    broadcast_object_list: the pickled objects' length (an estimate of what gloo sends)."""

    OPS = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "broadcast",
           "broadcast_object_list", "barrier")

    def __init__(self) -> None:
        self.phase: str | None = None
        self.counts: dict[tuple[str, str, int], int] = {}

    def install(self) -> None:
        import torch.distributed as dist

        for op in self.OPS:
            if hasattr(dist, op):
                setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op: str, fn: Any) -> Any:
        name = "all_gather" if op.startswith("all_gather") else op

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.phase is not None:
                nbytes = self._nbytes(op, args, kwargs)
                k = (self.phase, name, nbytes)
                self.counts[k] = self.counts.get(k, 0) + 1
            return fn(*args, **kwargs)

        return counted

    @staticmethod
    def _nbytes(op: str, args: tuple, kwargs: dict) -> int:
        if op == "barrier":
            return 0
        if op == "broadcast_object_list":
            objs = args[0] if args else kwargs["object_list"]
            return len(pickle.dumps(objs))
        if op.startswith("all_gather"):
            out = args[0] if args else kwargs["output_tensor"]
            return out.numel() * out.element_size()
        t = args[0] if args else kwargs["tensor"]
        return t.numel() * t.element_size()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        phase, self.phase = self.phase, None
        try:
            yield
        finally:
            self.phase = phase

    def rows(self) -> list[dict[str, Any]]:
        return [{"phase": p, "op": op, "bytes": b, "calls": c}
                for (p, op, b), c in sorted(self.counts.items())]


# ------------------------------------------------------------------ one rank
def worker(job: dict[str, Any]) -> int:
    import torch

    from repif import distributed

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message="CG stopped at max_iter")
    counter = CollectiveCounter()
    counter.install()

    def main() -> int:
        import repif
        from repif import datasets

        sys.path.insert(0, str(HERE))
        load0 = os.getloadavg()
        ds = datasets.load("mnist", data_dir=job["data_dir"])
        model, weights = load_model(ds, job)
        x, y = ds.train
        pool = (x[: job["pool"]].clone(), y[: job["pool"]].clone())
        xt, yt = ds.test
        queries = (xt[:N_QUERIES].clone(), yt[:N_QUERIES].clone())
        del ds, x, y
        w = distributed.world_size()
        times: dict[str, float] = {}
        cpus: dict[str, float] = {}
        rss: dict[str, int] = {"setup": peak_rss_bytes()}
        out: dict[str, Any] = {}
        state: dict[str, Any] = {}

        @contextlib.contextmanager
        def phase(name: str) -> Iterator[None]:
            with counter.paused():
                distributed.barrier()
            counter.phase = name
            t0, c0 = time.perf_counter(), cpu_s()
            yield
            times[name] = time.perf_counter() - t0
            cpus[name] = cpu_s() - c0
            rss[name] = peak_rss_bytes()
            counter.phase = None

        with phase("build"):
            est = repif.InfluenceEstimator(
                model, pool, solver="cg", sampler="logit-importance",
                sample_size=job["sample_size"], max_iter=job["cg_iters"], tol=0.0,
                damping=job["damping"], max_memory=MAX_MEMORY, progress=False)
        with phase("fit"):
            est.fit()
        state["pool_s"] = est.timings["sample_s"]
        out["subset_indices"], out["subset_weights"] = est.subset.indices, est.subset.weights
        with phase("test_gradients"):
            g = est.test_gradients(queries)
        out["test_gradients"] = g
        with phase("ihvp"):
            out["ihvp"] = est.inverse_hvp(g)
        with phase("ihvp_lockstep"):
            before = len(est.solver.iterations)
            out["ihvp_lockstep"] = est.inverse_hvp(g[0])
        state["lockstep_cg_iterations"] = est.solver.iterations[before:]
        with phase("influence"):
            out["scores"] = est.influence(queries)
        if w == 1 and job["check_partition"] > 1:  # untimed; no collectives in one process
            out.update(partition_reference(est, queries, job["check_partition"]))
        with counter.paused():
            per_rank = {
                "wall_s": {k: distributed.gather_numbers(v) for k, v in times.items()},
                "cpu_s": {k: distributed.gather_numbers(v) for k, v in cpus.items()},
                "peak_rss_bytes": {k: [int(b) for b in distributed.gather_numbers(v)]
                                   for k, v in rss.items()},
            }
            comm = counter.rows()
        if distributed.is_main():
            from repif import io

            row = {"procs": w, "weights": weights, "num_params": est.num_params,
                   "pool_s": state["pool_s"], "per_rank": per_rank,
                   "wall_s": {k: max(v) for k, v in per_rank["wall_s"].items()},
                   "peak_rss_bytes_max": max(per_rank["peak_rss_bytes"]["influence"]),
                   "collectives": comm,
                   "lockstep_cg_iterations": state["lockstep_cg_iterations"],
                   "ihvp_norms": [float(v) for v in out["ihvp"].norm(dim=1)],
                   "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
                   "num_threads": torch.get_num_threads(), "backend": backend_name()}
            TENSORS.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in out.items()},
                       TENSORS / f"{job['tag']}-N{w}.pt")
            io.write_json_atomic(Path(job["row_file"]), row)
        return 0

    return distributed.run_launched(main)


def partition_reference(est: Any, queries: tuple[Any, Any], parts: int) -> dict[str, Any]:
    """What ``parts`` ranks compute, recomputed in one process from the same batches as theirs:
    gradients and solves of each rank's share of the queries (repif splits rows in contiguous
    shares), and scores of each rank's share of the pool's columns against those factors. A
    difference between this and the ranks' results would be the communication's; a difference
    between this and the one-process results is float round-off of other batch shapes."""
    import torch

    from repif.gradients.streaming import stream_scores

    xq, yq = queries

    def cuts(n: int) -> list[tuple[int, int]]:  # repif.distributed.local_range, block 1
        return [(n * r // parts, n * (r + 1) // parts) for r in range(parts)]

    def share(a: int, b: int, measure: str = "loss") -> Any:
        return est.test_gradients((xq[a:b], yq[a:b]), measure=measure)

    g = torch.cat([share(a, b) for a, b in cuts(len(yq))])
    v = torch.cat([est.inverse_hvp(g[a:b]) for a, b in cuts(len(yq))])
    gq = torch.cat([share(a, b, "query") for a, b in cuts(len(yq))])
    f = v if torch.equal(gq, g) else torch.cat([est.inverse_hvp(gq[a:b])
                                                 for a, b in cuts(len(yq))])
    scores = torch.empty(len(yq), est.n_train, dtype=f.dtype)
    for a, b in cuts(est.n_train):
        for offset, part in stream_scores(est.fm, est.source, torch.arange(a, b), est.budget,
                                          est.cost, f):
            scores[:, a + offset : a + offset + part.shape[1]] = -part.cpu()
    return {"test_gradients_partition": g, "ihvp_partition": v, "scores_partition": scores}


def backend_name() -> str | None:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_initialized() else None


def load_model(ds: Any, job: dict[str, Any]) -> tuple[Any, str]:
    """The scale benchmark's trained ResNet-18 of ``job["width"]`` when benchmarks/cache holds
    it, else untrained weights (time and traffic do not depend on the values); never trains."""
    import repif
    import repif.training

    if job["weights"] == "trained":
        from train_resnet18 import trained

        fit = repif.training._fit

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise LookupError("not cached")

        repif.training._fit = refuse
        try:
            return trained(job["data_dir"], job["width"], job["epochs"]), "trained"
        except LookupError:
            pass
        finally:
            repif.training._fit = fit
    return repif.models.build("resnet18", ds, width=job["width"]).eval(), "init"


# ------------------------------------------------------------------ launcher
def job_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"width": args.width, "epochs": args.epochs, "pool": args.pool,
            "sample_size": args.sample_size, "cg_iters": args.cg_iters,
            "damping": args.damping, "weights": args.weights, "queries": N_QUERIES,
            "max_memory": MAX_MEMORY, "check_partition": 2}


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}


def save_results(res: dict[str, Any]) -> None:
    from repif import io

    io.write_json_atomic(RESULTS, res)
    REPORT.write_text(report(res))


def launch(procs: int, job: dict[str, Any]) -> dict[str, Any]:
    row_file = TENSORS / f"{job['tag']}-N{procs}.json"
    row_file.parent.mkdir(parents=True, exist_ok=True)
    row_file.unlink(missing_ok=True)
    job = {**job, "row_file": str(row_file)}
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(Path(__file__).resolve()), "--worker",
           json.dumps(job)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not row_file.exists():
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"the run with {procs} processes failed")
    row = json.loads(row_file.read_text())
    row.update(config=job["config"], launcher_wall_s=wall, launcher_loadavg_start=list(load0),
               launcher_loadavg_end=list(os.getloadavg()), finished=time.strftime("%Y-%m-%d %H:%M"))
    return row


def compare(tag: str, a: int, b: int) -> dict[str, Any] | None:
    """Run ``b`` processes against ``a``: identical subsets, max relative differences."""
    import torch

    pa, pb = TENSORS / f"{tag}-N{a}.pt", TENSORS / f"{tag}-N{b}.pt"
    if not (pa.exists() and pb.exists()):
        return None
    ra, rb = torch.load(pa), torch.load(pb)
    out: dict[str, Any] = {"procs": [a, b],
                           "subset_identical": bool(torch.equal(ra["subset_indices"],
                                                                rb["subset_indices"]))}
    for k in ("subset_weights", "test_gradients", "ihvp", "ihvp_lockstep", "scores"):
        out[k] = diff(rb[k], ra[k])
        if f"{k}_partition" in ra:  # the same batches as the ranks', in one process
            out[f"{k}_partition"] = diff(rb[k], ra[f"{k}_partition"])
    return out


def diff(a: Any, b: Any) -> dict[str, Any]:
    """max |a − b| / max |b|, and whether a and b are equal bit for bit."""
    import torch

    x, y = a.double(), b.double()
    return {"max_rel_diff": float((x - y).abs().max() / y.abs().max().clamp_min(1e-300)),
            "bit_identical": bool(torch.equal(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="directory with the four MNIST IDX files")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2, help="training recipe of the cached model")
    ap.add_argument("--weights", default="trained", choices=("trained", "init"),
                    help="'trained': the scale benchmark's cached model if present (never "
                         "trains here), else untrained; 'init': untrained")
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--sample-size", type=int, default=128)
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--force", action="store_true", help="redo finished process counts")
    ap.add_argument("--report", action="store_true", help="rewrite the report only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        raise SystemExit(worker(json.loads(args.worker)))
    res = load_results()
    if args.report:
        res["projection"] = project(res)
        save_results(res)
        return
    if not args.data_dir:
        ap.error("--data-dir is required (the MNIST IDX files; see README, Data)")
    config = job_config(args)
    tag = f"w{args.width}-n{args.pool}-m{args.sample_size}-cg{args.cg_iters}-{args.weights}"
    if res.get("config") != config:  # another configuration: start afresh
        res = {"config": config, "runs": []}
    res["command"] = ("python benchmarks/distributed.py --data-dir DIR --procs PROCS "
                      f"--width {args.width} --pool {args.pool} --sample-size "
                      f"{args.sample_size} --cg-iters {args.cg_iters} --weights {args.weights}")
    for n in [int(p) for p in args.procs.split(",")]:
        if not args.force and any(r["procs"] == n for r in res["runs"]):
            print(f"N = {n}: done, skipped")
            continue
        print(f"N = {n} …", flush=True)
        row = launch(n, {**config, "config": config, "tag": tag, "data_dir": args.data_dir})
        print(f"  {row['launcher_wall_s']:.1f} s (steps: "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["wall_s"].items()) + ")", flush=True)
        res["runs"] = [r for r in res["runs"] if r["procs"] != n] + [row]
        res["runs"].sort(key=lambda r: r["procs"])
        cmp = compare(tag, 1, 2)
        if cmp is not None:
            res["comparison"] = cmp
        res["projection"] = project(res)
        save_results(res)  # after every N: a stopped run keeps what it finished


# ------------------------------------------------------------------ projection
def full_width_figures() -> dict[str, Any] | None:
    """One process's per-step times of the full-width model from scale.json (CPU, 1 thread)."""
    if not SCALE_RESULTS.exists():
        return None
    rows = json.loads(SCALE_RESULTS.read_text())
    fit = next((r for r in rows if r["width"] == FULL_WIDTH and r["step"] == "fit"), None)
    inf = [r for r in rows if r["width"] == FULL_WIDTH and r["step"] == "influence"
           and not r.get("stopped")]
    if fit is None or not inf:
        return None
    inf = max(inf, key=lambda r: r["n"])
    steps = max(fit["cg_iterations"])
    return {"source": "benchmarks/results/scale.json (cpu, 1 thread, width 64)",
            "num_params": fit["num_params"], "pool_s": fit["pool_s"],
            "prepare_s": fit["fit_s"] - fit["pool_s"], "ihvp_s": fit["ihvp_s"],
            "cg_steps": steps, "product_s": fit["ihvp_s"] / steps,
            "influence_s_per_point": inf["wall_s"] / inf["n"], "influence_n": inf["n"]}


def collective_s(nbytes: float, n: int, bw: float, latency: float, kind: str) -> float:
    """Ring model: all-reduce moves 2(N−1)/N of the payload per rank, all-gather (N−1)/N of
    the gathered output; plus a fixed latency per call."""
    if n == 1:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return latency + factor * nbytes / bw


def measured_bytes(res: dict[str, Any]) -> dict[str, Any] | None:
    """Bytes per curvature-vector product and per influence query of the 2-process run, and the
    formulas they check (p parameters, 4-byte floats)."""
    run = next((r for r in res.get("runs", []) if r["procs"] == 2), None)
    if run is None:
        return None
    cfg, p = res["config"], run["num_params"]
    col = run["collectives"]

    def total(phase: str, op: str, min_bytes: int = 0) -> tuple[int, int]:
        rows = [c for c in col if c["phase"] == phase and c["op"] == op
                and c["bytes"] >= min_bytes]
        return sum(c["calls"] for c in rows), sum(c["calls"] * c["bytes"] for c in rows)

    prod_calls, prod_bytes = total("ihvp_lockstep", "all_reduce", 4 * p)
    inf_calls, inf_bytes = total("influence", "all_gather", 64)
    ihvp_calls, ihvp_bytes = total("ihvp", "all_gather", 64)
    fit_calls, fit_bytes = total("fit", "all_gather", 64)
    q = cfg["queries"]
    return {
        "num_params": p,
        "product_all_reduces": prod_calls,
        "bytes_per_product": prod_bytes / max(prod_calls, 1),
        "bytes_per_product_formula": 4 * p,  # k·p floats, k = 1
        "ihvp_gathered_bytes": ihvp_bytes, "ihvp_gathered_formula": 4 * p * q,
        "influence_gathered_bytes": inf_bytes,
        "influence_bytes_per_query": inf_bytes / q,
        "influence_bytes_per_query_formula": 4 * (p + cfg["pool"]),  # factor + score row
        "influence_gathers": inf_calls,
        "pool_gathered_bytes": fit_bytes,
        "pool_bytes_per_point": fit_bytes / cfg["pool"],
    }


def project(res: dict[str, Any]) -> dict[str, Any] | None:
    """time(N) per step = compute(1)/N (or the largest share of rows) + Σ collectives, for the
    full-width ResNet-18 (p from scale.json), the 60,000-image pool, m = 256, 10 queries."""
    fig = full_width_figures()
    meas = measured_bytes(res)
    if fig is None or meas is None:
        return None
    p, q, n = fig["num_params"], N_QUERIES, FULL_POOL
    d = 8 * FULL_WIDTH  # penultimate features of ResNet-18: 8 × width channels
    pool_bytes = n * (4 * 10 + 4 * d + 8)  # logits, features (float32), targets (int64)
    vec = 4 * p
    out: dict[str, Any] = {"compute": fig, "bytes": {
        "vector": vec, "pool_gather": pool_bytes, "factors_gather": q * vec,
        "scores_gather": q * n * 4, "per_query_influence": vec + 4 * n}, "targets": []}
    t1 = {"pool": fig["pool_s"], "prepare": fig["prepare_s"], "ihvp": fig["ihvp_s"],
          "influence": fig["influence_s_per_point"] * n}
    for name, w, bw, lat in TARGETS:
        split = q >= w  # repif splits the rows when every rank gets one, else runs lockstep
        share = math.ceil(q / w) / q if split else 1 / w
        steps = {
            "pool": (t1["pool"] / w, collective_s(pool_bytes, w, bw, lat, "all_gather")),
            "prepare": (t1["prepare"], 0.0),  # every rank gathers the whole subset
            # split: each rank's solutions gathered; lockstep: the gradients gathered, then
            # one all-reduce of the 10-row block per CG step
            "ihvp": (t1["ihvp"] * share,
                     collective_s(q * vec, w, bw, lat, "all_gather") + (0.0 if split else
                     fig["cg_steps"] * collective_s(q * vec, w, bw, lat, "all_reduce"))),
            "influence": (t1["influence"] / w,
                          collective_s(q * n * 4, w, bw, lat, "all_gather")),
        }
        total1 = sum(t1.values())
        totalw = sum(c + x for c, x in steps.values())
        lockstep = []
        for k in (1, q) if q < w else (1,):  # rows in lockstep: a removal step; the queries
            comm = collective_s(k * vec, w, bw, lat, "all_reduce")
            lockstep.append({"rows": k, "all_reduce_s": comm, "break_even_s": comm * w,
                             "efficiency_at": {f"{t:g}": t / w / (t / w + comm)
                                               for t in PRODUCT_TIMES_S}})
        out["targets"].append({
            "name": name, "procs": w, "bus_bw": bw, "latency_s": lat,
            "ihvp_rows": "split" if split else "lockstep",
            "steps": {k: {"compute_s": c, "comm_s": x} for k, (c, x) in steps.items()},
            "total_1_s": total1, "total_s": totalw, "speedup": total1 / totalw,
            "lockstep_product": lockstep,
        })
    return out


# ------------------------------------------------------------------ report
def _gb(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def report(res: dict[str, Any]) -> str:
    cmd = res.get("command", "python benchmarks/distributed.py --data-dir DIR")
    cfg = res.get("config", {})
    runs = {r["procs"]: r for r in res.get("runs", [])}
    cmd = cmd.replace("PROCS", ",".join(str(n) for n in runs) or "1,2")
    out = [f"`{cmd}`", "",
           "# Distributed benchmark: ResNet-18 pool pass, fit and influence on 1 and 2 processes",
           "",
           "Generated by `benchmarks/distributed.py` from `distributed.json`. gloo on the CPU, one "
           "torch thread per process, launched with `python -m torch.distributed.run "
           "--standalone --nproc_per_node=N`, on a 2-core machine shared with other jobs. The "
           "job is the scale benchmark's `fit` and `influence` steps narrowed: ResNet-18 of "
           f"width {cfg.get('width')} ({', '.join(sorted({r['weights'] for r in runs.values()}))}"
           f" weights), a pool of the first {cfg.get('pool', 0):,} MNIST training images, "
           f"solver `cg` with exactly {cfg.get('cg_iters')} steps (tol 0), sampler "
           f"`logit-importance`, m = {cfg.get('sample_size')}, λ = {cfg.get('damping')}, "
           f"{cfg.get('queries')} queries (the first MNIST test images), a fixed "
           f"{_gb(cfg.get('max_memory', 0))} GB memory budget per rank. A barrier separates the "
           "steps; a step's wall time is the slowest rank's.", ""]
    if runs:
        out += ["| step | " + " | ".join(f"N = {n}: wall s" for n in runs) + " | speed-up "
                "| " + " | ".join(f"N = {n}: CPU s per rank" for n in runs) + " | CPU-time "
                "speed-up |",
                "| --- | " + " | ".join("---:" for _ in runs) + " | ---: | "
                + " | ".join("---" for _ in runs) + " | ---: |"]
        names = {"build": "build the estimator", "fit": "fit (pool pass + draw + subset)",
                 "test_gradients": "10 query gradients",
                 "ihvp": "10 inverse-HVPs (rows split over the ranks)",
                 "ihvp_lockstep": "1 inverse-HVP (lockstep, products all-reduced)",
                 "influence": "influence: 10 queries × pool (its 10 solves included)"}
        for ph in PHASES:
            walls = [r["wall_s"].get(ph) for r in runs.values()]
            sp = (f"{walls[0] / walls[-1]:.2f}×" if len(walls) > 1 and walls[-1] else "")
            cpu = [" / ".join(f"{c:.1f}" for c in r["per_rank"]["cpu_s"][ph])
                   for r in runs.values()]
            cmax = [max(r["per_rank"]["cpu_s"][ph]) for r in runs.values()]
            csp = f"{cmax[0] / cmax[-1]:.2f}×" if len(cmax) > 1 and cmax[-1] else ""
            out.append(f"| {names[ph]} | " + " | ".join(f"{w:.1f}" for w in walls)
                       + f" | {sp} | " + " | ".join(cpu) + f" | {csp} |")
        pools = [r["pool_s"] for r in runs.values()]
        out.append("| of which the pool pass + draw | " + " | ".join(f"{t:.1f}" for t in pools)
                   + (f" | {pools[0] / pools[-1]:.2f}× |" if len(pools) > 1 else " | |")
                   + " |" * (len(runs) + 1))
        tot = [sum(r["wall_s"].values()) for r in runs.values()]
        ctot = [max(sum(c[i] for c in r["per_rank"]["cpu_s"].values()) for i in range(n))
                for n, r in runs.items()]
        out.append("| **sum of the steps** | " + " | ".join(f"**{t:.1f}**" for t in tot)
                   + (f" | **{tot[0] / tot[-1]:.2f}×** | " if len(tot) > 1 else " | | ")
                   + " | ".join(f"{c:.1f}" for c in ctot)
                   + (f" | **{ctot[0] / ctot[-1]:.2f}×** |" if len(ctot) > 1 else " | |"))
        out += ["", "Speed-up: N = 1 over the largest N, in wall time and in the busiest rank's "
                "CPU time (user + system); the latter does not count the time a rank waited "
                "for a core held by another job, so it approximates what the processes would "
                "give on free cores (contention still inflates CPU time somewhat, through "
                "shared caches and memory bandwidth)."]
        out += ["", "Peak RSS per rank (GB, after each step; the process's own high-water mark, "
                "imports and the data included), load average (1, 5, 15 min) when the run "
                "started and ended, and the whole launch's wall time (imports, data, model; "
                "for N = 1 also the untimed recomputation of the 2 ranks' shares used below):",
                "",
                "| N | " + " | ".join(PHASES) + " | load at start | load at end | launch s |",
                "| --- | " + " | ".join("---" for _ in PHASES) + " | --- | --- | ---: |"]
        for n, r in runs.items():
            rss = r["per_rank"]["peak_rss_bytes"]
            out.append(f"| {n} | " + " | ".join(" / ".join(_gb(b) for b in rss[ph])
                                                 for ph in PHASES)
                       + " | " + ", ".join(f"{v:.2f}" for v in r["loadavg_start"])
                       + " | " + ", ".join(f"{v:.2f}" for v in r["loadavg_end"])
                       + f" | {r['launcher_wall_s']:.0f} |")
    cmp = res.get("comparison")
    if cmp:
        out += ["", "## 2 processes against 1", "",
                f"Subsets identical: **{cmp['subset_identical']}**. Maximum relative "
                "difference max |a − b| / max |b| of the 2-process results a against (i) the "
                "1-process results and (ii) the 1-process run recomputing each rank's share "
                "from the same batches as that rank (query gradients and solves of 5 + 5 "
                "queries, scores of pool points 0-2,499 and 2,500-4,999 against those "
                "factors; float32):", "",
                "| quantity | (i) against 1 process | bit-identical | (ii) against the ranks' "
                "batches in 1 process | bit-identical |", "| --- | ---: | --- | ---: | --- |"]
        labels = {"subset_weights": "subset weights", "test_gradients": "10 query gradients",
                  "ihvp": "10 inverse-HVPs (rows split)",
                  "ihvp_lockstep": "1 inverse-HVP (lockstep)", "scores": "influence scores"}
        for k, label in labels.items():
            one, part = cmp[k], cmp.get(k + "_partition")
            out.append(f"| {label} | {one['max_rel_diff']:.1e} | {one['bit_identical']} | "
                       + (f"{part['max_rel_diff']:.1e} | {part['bit_identical']} |" if part
                          else "— | — |"))
        out += ["", "Where (ii) is bit-identical the communication adds nothing: the difference "
                "in (i) is float32 round-off of other batch shapes (one process puts the 10 "
                "queries in one batch and one CG block; each rank puts 5), which CG amplifies. "
                "The lockstep solve sums the ranks' halves of each product, so it differs from "
                "one process by the order of that sum as well."]
    meas = measured_bytes(res)
    if meas:
        out += ["", "## Communication (counted)", "",
                "Counted on the 2-process run by wrapping the `torch.distributed` collectives "
                "that `repif.distributed` calls: bytes of each call's tensor (all-reduce, "
                "broadcast) or of the gathered output (all-gather), per step and payload size; "
                f"p = {meas['num_params']:,} parameters (float32).", "",
                "| step | collective | calls | bytes in all | sizes ≥ 1 kB (bytes × calls) |",
                "| --- | --- | ---: | ---: | --- |"]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in runs[2]["collectives"]:
            groups.setdefault((c["phase"], c["op"]), []).append(c)
        for ph in PHASES:
            for (gp, op), cs in groups.items():
                if gp != ph:
                    continue
                big = ", ".join(f"{c['bytes']:,} × {c['calls']}" for c in cs
                                if c["bytes"] >= 1000)
                out.append(f"| {ph} | {op} | {sum(c['calls'] for c in cs)} | "
                           f"{sum(c['calls'] * c['bytes'] for c in cs):,} | {big} |")
        out += ["", f"* **per curvature-vector product** (one right-hand side, lockstep): "
                f"{meas['product_all_reduces']} all-reduces of "
                f"{meas['bytes_per_product']:,.0f} bytes = 4·p "
                f"({meas['bytes_per_product_formula']:,}), one per CG step; k right-hand sides "
                "in lockstep send k·4·p. With ≥ N right-hand sides the rows are split instead "
                "and no product is communicated: the 10 inverse-HVPs all-gather the solutions, "
                f"{meas['ihvp_gathered_bytes']:,} bytes = 10·4·p.",
                f"* **per influence query**: {meas['influence_bytes_per_query']:,.0f} bytes "
                f"gathered = 4·(p + n_pool) = {meas['influence_bytes_per_query_formula']:,} "
                "(its solved factor and its row of scores).",
                f"* pool pass: {meas['pool_gathered_bytes']:,} bytes gathered once, "
                f"{meas['pool_bytes_per_point']:.0f} per point (C logits and d features in "
                "float32, the target in int64)."]
    proj = res.get("projection")
    if proj:
        fig, b = proj["compute"], proj["bytes"]
        out += ["", "## Projection: full-width ResNet-18, 60,000-image pool", "",
                "Model, per step: **time(N) = compute(1) / N + Σ over its collectives "
                "(latency + f · bytes / bandwidth)**, with f = 2(N − 1)/N for an all-reduce "
                "and (N − 1)/N for an all-gather (of the gathered size) — a ring on the given "
                "bus bandwidth, no overlap of compute and communication. Exceptions, as the "
                "code runs them: the pool step (logit/feature pass, then the draw, which every "
                "rank repeats but costs milliseconds) is divided by N; `prepare` (gathering the "
                "m subset points) is done by every rank, so not divided; the 10 inverse-HVPs "
                "are split by rows when N ≤ 10 (compute × the largest share, ⌈10/N⌉ of 10 "
                "rows; then the solutions are all-gathered), else run in lockstep with the "
                "subset split (compute ÷ N; the 10 gradients all-gathered, then one "
                "all-reduce of 10·4·p bytes per CG step). These 10 solutions are the factors "
                "`influence` needs; its streaming pass over the pool divides the columns "
                "(compute ÷ N) and all-gathers the 10 × 60,000 scores.", "",
                f"compute(1): one CPU thread, from `{fig['source'].split(' (')[0]}` "
                f"({fig['num_params']:,} parameters, trained width 64): pool pass + draw "
                f"{fig['pool_s']:.0f} s, prepare {fig['prepare_s']:.1f} s, 10 inverse-HVPs "
                f"{fig['ihvp_s']:.0f} s ({fig['cg_steps']} CG steps, m = 256; "
                f"{fig['product_s']:.0f} s per 10-row product), influence "
                f"{fig['influence_s_per_point'] * 1e3:.0f} ms per pool point (measured over "
                f"{fig['influence_n']:,}) × 60,000. These were measured on a loaded machine "
                "(4-6 jobs on 2 cores at times). Bytes: one vector 4·p = "
                f"{_mb(b['vector'])}; pool gather {_mb(b['pool_gather'])}; 10 factors "
                f"{_mb(b['factors_gather'])}; scores {_mb(b['scores_gather'])}; per influence "
                f"query 4·(p + 60,000) = {_mb(b['per_query_influence'])}.", "",
                "Constants (named in the script): NVLINK_BUS_BW = "
                f"{NVLINK_BUS_BW / 1e9:.0f} GB/s (nccl-tests bus bandwidth of 8-GPU NVSwitch "
                "nodes is ~230-450 GB/s for large messages; taken lower for 45-450 MB messages "
                f"and no overlap), INTERNODE_BUS_BW = {INTERNODE_BUS_BW / 1e9:.0f} GB/s (one "
                "200 Gb/s InfiniBand/RoCE link per node, the ring's slowest hop), latency "
                f"{LATENCY_INTRA_S * 1e6:.0f} µs per collective inside a node, "
                f"{LATENCY_INTER_S * 1e6:.0f} µs across nodes.", "",
                "| target | step | compute s | communication ms |", "| --- | --- | ---: | ---: |"]
        for t in proj["targets"]:
            for k, v in t["steps"].items():
                label = k + (f" ({t['ihvp_rows']})" if k == "ihvp" else "")
                out.append(f"| {t['name']} | {label} | {v['compute_s']:.1f} | "
                           f"{v['comm_s'] * 1e3:.2f} |")
            out.append(f"| {t['name']} | **total** | **{t['total_s']:.0f}** (one process "
                       f"{t['total_1_s']:.0f}) | speed-up **{t['speedup']:.1f}×** |")
        out += ["", "With one CPU thread's compute the communication is negligible. On GPUs "
                "the compute shrinks by orders of magnitude and what bounds the scaling is the "
                "all-reduce of the curvature products run in lockstep: a removal step (1 row) "
                "at any N, and the 10 queries once N > 10. Per CG step, for a product whose "
                "single-device time over the 256-point subset is T (an input: not measured "
                "here):", "",
                "| target | rows | all-reduce per product | efficiency at " + ", ".join(
                    f"T = {t * 1e3:g} ms" for t in PRODUCT_TIMES_S)
                + " | T at which compute = communication |",
                "| --- | ---: | ---: | --- | ---: |"]
        for t in proj["targets"]:
            for lk in t["lockstep_product"]:
                eff = ", ".join(f"{v:.0%}" for v in lk["efficiency_at"].values())
                out.append(f"| {t['name']} | {lk['rows']} | {lk['all_reduce_s'] * 1e3:.2f} ms "
                           f"| {eff} | {lk['break_even_s'] * 1e3:.0f} ms |")
        out += ["", "Efficiency = (T/N) / (T/N + all-reduce time). With at least N rows repif "
                "splits them over the ranks instead, and no product is communicated. Not "
                "measured: NCCL, GPUs and several nodes (no GPU here)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
