"""The run machinery both studies share (class removal, evaluation): one run at a time per
output directory, temporaries of killed writes cleared by the lock holder, results of an
earlier configuration backed up by their hash rather than lost (docs/design.md, "Protocol"),
and the errors a study raises (with the exit code the command line gives them) and its checks of
the output directory and the device.

One study at a time per output directory: a lock file holding the owner's PID and host.

The lock is ``DIR/.repif.lock``. Where the OS offers ``flock`` (Linux, macOS) the kernel holds
the lock and drops it when its process dies, however it dies; the file's content (PID, host,
start time, command) only names the owner in the error a second run gets. Elsewhere the file's
existence is the lock, and a lock whose PID no longer runs on this host is stale. Either way a
lock left behind by a killed run is taken over with a warning, and a clean exit deletes the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from repif import io

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("repif.study")

LOCK_NAME = ".repif.lock"


class OutputLockedError(RuntimeError):
    """Another live process holds the output directory's lock."""


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (its lock file names none yet)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, (int, float)) else "?"
    return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')} (started {when}: "
            f"{info.get('command', '?')})")


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = b""
        while chunk := os.read(fd, 65536):
            text += chunk
        info = json.loads(text.decode("utf-8")) if text.strip() else {}
        return info if isinstance(info, dict) else {"content": str(info)}
    except (OSError, ValueError):
        return {"content": "unreadable"}


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """``with OutputLock(folder):`` holds ``folder``'s lock or raises OutputLockedError."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _info(self) -> dict[str, Any]:
        prog = os.path.basename(sys.argv[0] or "python")
        if prog == "__main__.py":
            prog = "python -m repif"
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([prog, *sys.argv[1:]])}

    def _in_use(self, info: dict[str, Any], by_pid: bool = False) -> OutputLockedError:
        # with flock only a live process can hold the lock; without it, a crashed run on
        # another host cannot be told from a live one
        hint = f" (if no such process runs, delete {self.path})" if by_pid else ""
        return OutputLockedError(
            f"output directory {self.folder} is in use by another repif run: {_describe(info)}; "
            f"wait for it to finish or pass another --out{hint}"
        )

    def _stale(self, info: dict[str, Any]) -> None:
        log.warning("taking over the lock of %s left by a run that no longer holds it: %s",
                    self.folder, _describe(info))

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        info = _read(fd)
                        os.close(fd)
                        raise self._in_use(info) from None
                    os.close(fd)  # flock unsupported here (some network file systems)
                    break
                try:  # the holder may have deleted the file between our open and flock
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = _read(fd)
                if previous:
                    self._stale(previous)
                self._own(fd)
                return
        self._acquire_by_pid()

    def _acquire_by_pid(self) -> None:
        """Without flock: the file's existence is the lock; a dead PID on this host is stale."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    rfd = os.open(self.path, os.O_RDONLY)
                    info = _read(rfd)
                    os.close(rfd)
                    if info.get("host") != socket.gethostname() or _pid_alive(info.get("pid")):
                        raise self._in_use(info, by_pid=True) from None
                    self._stale(info)
                    self.path.unlink()
                continue
            self._own(fd)
            return
        raise self._in_use({}, by_pid=True)

    def _own(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(self._info()) + "\n").encode("utf-8"))
            os.fsync(fd)
        except OSError as err:  # a full disk or read-only file system: name the file
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it, so no one else's file is removed
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked_run(lock: OutputLock, out: Path, temporaries: list[tuple[Path, bool]],
               busy: type[Exception]) -> Iterator[None]:
    """Hold ``lock`` (re-entrant) over ``out``; on taking it, remove the temporary files that
    killed writes left in each ``(folder, recursive)`` of ``temporaries`` (only the holder may).
    Another live owner is raised as ``busy`` (the study's environment error)."""
    if lock.held:
        yield
        return
    try:
        lock.acquire()
    except OutputLockedError as err:
        raise busy(str(err)) from None
    try:
        removed = [p for folder, recursive in temporaries
                   for p in io.remove_temporaries(folder, recursive=recursive)]
        if removed:
            log.warning("removed %d temporary file(s) that interrupted writes left in %s: %s",
                        len(removed), out, ", ".join(p.name for p in removed))
        yield
    finally:
        lock.release()


def back_up(out: Path, stale: dict[str, Any], read: Callable[[Path], dict[str, Any]],
            merge: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
            unreadable: type[Exception]) -> Path:
    """Merge results of another configuration into ``out/results.<their hash>.json`` (a backup
    only grows); a backup that ``read`` cannot read (raising ``unreadable``) is kept as it is and
    the rows go to the next free name. Returns the backup's path."""
    h = stale["config_hash"]
    path = out / f"results.{h}.json"
    merged = stale
    if path.exists():
        try:
            merged = merge(read(path), stale)
        except unreadable as err:
            log.warning("keeping the unreadable backup %s as it is (%s)", path, err)
            n = 1
            while (out / f"results.{h}.{n}.json").exists():
                n += 1
            path = out / f"results.{h}.{n}.json"
    io.write_json_atomic(path, merged)
    log.warning("configuration changed: the earlier results (%d cells) are kept in %s",
                len(merged["cells"]), path)
    return path


class StudyError(RuntimeError):
    """A study cannot run as configured; the message says why and what to do. ``exit_code``:
    what the command line exits with (2: bad input)."""

    exit_code = 2


class StudyEnvironmentError(StudyError):
    """The machine, not the configuration, stops the study: no GPU, the output directory in use
    by another run, a stored file damaged after the run (exit code 1)."""

    exit_code = 1


def check_output_dir(out: Path) -> None:
    """Raise StudyError (bad input) if ``out`` is a file, StudyEnvironmentError if it cannot be
    written to (permissions, a read-only or full file system: the environment)."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"output directory {out} is a file; pass a directory with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=out)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    except OSError as err:
        raise StudyEnvironmentError(
            f"output directory {out} is not writable ({err.strerror}); make it writable or pass "
            "another --out"
        ) from err


def check_device(name: str) -> torch.device:
    """The torch device for ``--device name``; a name torch does not know is bad input
    (StudyError), a CUDA device this machine lacks an environment problem."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise StudyError(
            f"unknown device {name!r}; use --device cpu or --device cuda (cuda:N for GPU N)"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise StudyError(f"--device {name}: only cpu and cuda are supported; use one of them")
    if not torch.cuda.is_available():
        build = ("a build without CUDA" if torch.version.cuda is None
                 else f"CUDA {torch.version.cuda}, but no usable GPU or driver")
        raise StudyEnvironmentError(
            f"--device {name}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
            f"{build}); use --device cpu, or run on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise StudyEnvironmentError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0…cuda:{count - 1}; "
            "pass one of them"
        )
    return dev
