"""Data parallelism on ``torch.distributed`` (docs/design.md, "Several processes").

When a default process group with more than one process is initialised — by the user, or by
:func:`init_from_env` under ``torchrun`` — repif shards its passes over the data by rank and
combines them with collectives, so that every rank ends with the same numbers:

* the pool's logit/feature pass, per-sample gradients and influence scores: each rank computes a
  contiguous share of the points, the shares are gathered in rank order (:func:`all_gather_cat`);
* curvature products, GGN diagonals and dense Gram sums, the removal gradient and ∇L_R: each rank
  sums over its share of the points, the partial sums are added (:func:`all_reduce_sum`), so
  iterative solvers run in lockstep on identical vectors and need no change;
* subsets and removal updates are broadcast from rank 0, so they are identical by construction.

Without a process group, or with one process, every function here is the identity (or a no-op)
and repif computes exactly what it computes in a single process. All collectives run on the
tensor's own device (CPU tensors over gloo, CUDA tensors over NCCL with the default backend
``"cpu:gloo,cuda:nccl"``). A collective that fails because another rank died raises
:class:`DistributedError` naming the rank that reported the failure, when it is known.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed support
    dist = None  # type: ignore[assignment]

#: Seconds a collective may wait for the other ranks before failing (``init_from_env``'s
#: default; env ``REPIF_DIST_TIMEOUT`` overrides it). Generous: a rank may spend minutes on
#: local work (training a reference model) while the others wait at the next collective.
DEFAULT_TIMEOUT_S = 1800.0

#: Store key under which a failing rank leaves its number for the others' error messages.
FAILED_KEY = "repif/failed_rank"

#: Seconds a surviving rank waits on the store for the failing rank's number.
STORE_PROBE_S = 2.0

_local_depth = 0  # > 0 inside ``local()``: collectives are switched off


class DistributedError(RuntimeError):
    """A collective failed: another rank of the run failed, was killed or timed out."""


# --------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """Whether repif shards its work: a default process group of more than one process is
    initialised (and we are not inside :func:`local`)."""
    sharded = (
        _local_depth == 0
        and dist is not None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )
    if sharded:
        _abort_on_uncaught_exception()
    return sharded


_hook_installed = False


def _abort_on_uncaught_exception() -> None:
    """Make an exception that ends this process (uncaught, e.g. in a user's script under
    ``torchrun``) abort the process group first, so that the other ranks stop at their next
    collective naming this rank instead of waiting out the timeout. Installed once, the first
    time repif shards work (whoever created the group)."""
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
        first = not isinstance(err, DistributedError)  # else another rank failed first
        if first:
            with contextlib.suppress(Exception):
                print(f"repif: rank {dist.get_rank()} failed; stopping the other ranks",
                      file=sys.stderr)
        abort(record=first)
        previous(kind, err, tb)

    sys.excepthook = hook


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes sharing the work (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process shows progress, prints and writes files (rank 0)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block every rank computes on its own: no sharding, no collectives (used to
    solve different right-hand sides on different ranks with the whole curvature subset)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


# --------------------------------------------------------------------------- sharding
def local_range(n: int, block: int = 1) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n positions, cut at multiples of ``block``:
    blocks are dealt out in order, ⌊b·r/W⌋ … ⌊b·(r+1)/W⌋ of the b = ⌈n/block⌉ blocks to rank r,
    so concatenating the shares in rank order gives the positions back in order. Chunk
    boundaries inside a share fall where a single process puts them when ``block`` is its
    chunk size. Without a process group: (0, n)."""
    w = world_size()
    if w == 1:
        return 0, n
    block = max(1, int(block))
    blocks = -(-n // block)
    r = rank()
    return min(n, (blocks * r // w) * block), min(n, (blocks * (r + 1) // w) * block)


def shard(indices: Tensor, block: int = 1) -> Tensor:
    """This rank's contiguous share of ``indices`` (see :func:`local_range`)."""
    lo, hi = local_range(int(indices.numel()), block)
    return indices[lo:hi]


def balanced_block(n: int, rows: int) -> int:
    """The shard block for n points streamed in chunks of ``rows``: ``rows`` when every rank
    gets at least one full chunk (chunk boundaries then match a single process's, so the
    results are bit-identical), else ⌈n/W⌉ so that every rank gets a share."""
    return max(1, min(int(rows), -(-n // world_size())))


# --------------------------------------------------------------------------- collectives
def _backend_has(device_type: str) -> bool:
    backend = str(dist.get_backend()).lower()
    if device_type == "cuda":
        return "nccl" in backend or "cuda" in backend
    return "gloo" in backend or "cpu" in backend or "mpi" in backend


def _comm(t: Tensor) -> Tensor:
    """``t`` on a device the process group's backend can communicate, contiguous."""
    if t.is_cuda and not _backend_has("cuda"):
        t = t.cpu()
    elif not t.is_cuda and not _backend_has("cpu"):
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.contiguous()


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` naming the failing rank."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        who = failed_rank()
        culprit = f"rank {who} failed" if who is not None else "another rank failed or was killed"
        raise DistributedError(
            f"rank {dist.get_rank()}: {name} failed because {culprit} (see that rank's "
            f"output); {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (the same result, bit for bit, on every rank); ``t`` itself
    without a process group."""
    if not is_distributed():
        return t
    buf = _comm(t)
    with _collective("all_reduce"):
        dist.all_reduce(buf)
    return buf.to(t.device) if buf.device != t.device else buf


def agree(value: int | float, op: str = "min") -> int | float:
    """The minimum (``op="min"``) or maximum over ranks of a number, so that every rank makes
    the same decision (chunk sizes, loop lengths)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    red = dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX
    buf = _comm(t)
    with _collective(f"all_reduce({op})"):
        dist.all_reduce(buf, op=red)
    out = float(buf.item())
    return int(out) if isinstance(value, int) else out


def gather_numbers(value: float) -> list[float]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [float(value)]
    t = _comm(torch.tensor([float(value)], dtype=torch.float64))
    out = torch.empty(world_size(), dtype=torch.float64, device=t.device)
    with _collective("all_gather"):
        _gather_single(out, t)
    return [float(v) for v in out.cpu()]


def _gather_single(out: Tensor, t: Tensor) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t)


def all_gather_cat(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dimension 0 in rank order; the shares may differ
    in length (but not in their other dimensions). ``t`` itself without a process group."""
    if not is_distributed():
        return t
    buf = _comm(t)
    w = world_size()
    sizes = torch.tensor([buf.shape[0]], dtype=torch.int64, device=buf.device)
    all_sizes = torch.empty(w, dtype=torch.int64, device=buf.device)
    with _collective("all_gather (sizes)"):
        _gather_single(all_sizes, sizes)
    counts = [int(s) for s in all_sizes.cpu()]
    longest = max(counts)
    rest = tuple(buf.shape[1:])
    if buf.shape[0] < longest:  # pad to equal shares; the padding is dropped below
        pad = torch.zeros((longest - buf.shape[0], *rest), dtype=buf.dtype, device=buf.device)
        buf = torch.cat([buf, pad])
    out = torch.empty((w * longest, *rest), dtype=buf.dtype, device=buf.device)
    with _collective("all_gather"):
        _gather_single(out, buf)
    if any(c != longest for c in counts):
        out = torch.cat([out[i * longest : i * longest + c] for i, c in enumerate(counts)])
    return out.to(t.device) if out.device != t.device else out


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s tensor on every rank (shape and dtype may differ elsewhere: they are sent
    first). ``t`` itself without a process group."""
    if not is_distributed():
        return t
    meta = [tuple(t.shape), t.dtype]
    with _collective("broadcast"):
        dist.broadcast_object_list(meta, src=src, device=_object_device())
    shape, dtype = meta
    buf = _comm(t) if tuple(t.shape) == tuple(shape) and t.dtype == dtype else _comm(
        torch.empty(shape, dtype=dtype, device=t.device))
    with _collective("broadcast"):
        dist.broadcast(buf, src=src)
    return buf.to(t.device) if buf.device != t.device else buf


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def _object_device() -> torch.device | None:
    return None if _backend_has("cpu") else torch.device("cuda", torch.cuda.current_device())


def check_agree(what: str, fingerprint: str) -> None:
    """Raise ValueError on every rank unless all ranks hold the same ``fingerprint`` of
    ``what`` (their data, their options): a rank given other data or another seed would
    otherwise be overruled by rank 0's subset and weights, or mixed into its sums, silently."""
    if not is_distributed():
        return
    prints: list[Any] = [None] * world_size()
    with _collective(f"checking that the ranks agree on {what}"):
        dist.all_gather_object(prints, fingerprint)
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    if differ:
        ranks = ", ".join(map(str, differ))
        raise ValueError(
            f"rank(s) {ranks} hold other {what} than rank 0: every rank must be given the "
            "same data (same points, same order) and the same options, seed included; repif "
            "shards the work itself"
        )


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.copy_(broadcast(t.detach(), src))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        with _collective("barrier"):
            dist.barrier()


# --------------------------------------------------------------------------- life cycle
def launched_by_torchrun() -> bool:
    """Whether the environment describes a process of a multi-process launch (``torchrun`` or
    any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    env = os.environ
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return all(k in env for k in needed) and int(env["WORLD_SIZE"]) > 1


def default_backend() -> str:
    """``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are available and every process of this
    node has a GPU of its own (CPU tensors over gloo, GPU tensors over NCCL), else ``"gloo"``
    (NCCL refuses two ranks on one GPU; gloo stages GPU tensors through the CPU)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.device_count() >= local_world:
            return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from the launcher's environment (``torchrun``:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); on CUDA each process takes GPU
    LOCAL_RANK. Returns whether it initialised one (False: not launched so, or already done).
    ``timeout_s`` (default env REPIF_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S) bounds how long a
    collective waits for a rank that is gone or stuck."""
    if dist is None or not dist.is_available() or dist.is_initialized():
        return False
    if not launched_by_torchrun():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("REPIF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = backend or default_backend()
    if torch.cuda.is_available():  # "cuda" then means this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Barrier, then destroy the default process group (clean end of a run)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        with _collective("barrier"):
            dist.barrier()
    dist.destroy_process_group()


def abort(record: bool = True) -> None:
    """Leave a failing run: record this rank as the failed one (for the others' messages;
    ``record=False`` when another rank failed first) and tear the process group down at once,
    so that ranks waiting in a collective fail now instead of at the timeout."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if record:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(datetime.timedelta(seconds=STORE_PROBE_S))
            if not store.check([FAILED_KEY]):  # the first failure keeps its name
                store.set(FAILED_KEY, str(dist.get_rank()))
    aborter = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if aborter is not None:
            aborter()
        else:  # pragma: no cover - older torch
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway; the process exits next
        pass


def failed_rank() -> int | None:
    """The rank that reported a failure through the store (None if unknown or unreachable)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=STORE_PROBE_S))
        if not store.check([FAILED_KEY]):
            return None
        return int(store.get(FAILED_KEY))
    except Exception:  # noqa: BLE001 - best effort: the store host may be the failed rank
        return None


def run_launched(main: Callable[[], int]) -> int:
    """Run ``main`` (returning an exit code) inside a process group when launched by
    ``torchrun`` (see :func:`init_from_env`), else just run it. A clean end waits for every
    rank and destroys the group; a failure (a non-zero code or an exception) aborts it, so
    the other ranks stop at their next collective with a :class:`DistributedError` naming this
    rank, and the whole run exits non-zero."""
    if not init_from_env():
        return main()
    me = dist.get_rank()
    try:
        code = main()
    except DistributedError as err:  # another rank failed first
        print(f"repif: error: {err}", file=sys.stderr)
        abort(record=False)
        return 1
    except BaseException:
        print(f"repif: rank {me} failed; stopping the other ranks", file=sys.stderr)
        abort()
        raise
    if code:
        print(f"repif: rank {me} failed (exit code {code}); stopping the other ranks",
              file=sys.stderr)
        abort()
        return code
    try:
        shutdown()
    except DistributedError as err:
        print(f"repif: error: {err}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- output
#: Files rank 0 sends to the other ranks' private output folders so that every rank resumes
#: the same way: results (and their backups), stored estimates and cached models.
MIRRORED = ("results*.json", "vectors/**/*", "cache/**/*", "ground-truth/**/*")


def output_dir(out: Path) -> Path:
    """Where this rank writes: ``out`` on rank 0; on the others, a private temporary folder
    holding a copy of rank 0's results, estimates and cached models (sent by rank 0, so that
    every rank makes the same resume decisions, on one node or many), removed at exit. Only
    rank 0's files are the run's output."""
    out = Path(out)
    if not is_distributed():
        return out
    files: dict[str, bytes] = {}
    if rank() == 0 and out.is_dir():
        for pattern in MIRRORED:
            for path in sorted(out.glob(pattern)):
                if path.is_file() and not path.name.startswith("."):
                    files[str(path.relative_to(out))] = path.read_bytes()
    files = broadcast_object(files)
    if rank() == 0:
        return out
    private = Path(tempfile.mkdtemp(prefix=f"repif-rank{rank()}-"))
    atexit.register(shutil.rmtree, private, True)
    for rel, data in files.items():
        path = private / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return private
