"""The rows of the class-removal study's ``results.json``, typed and checked when read.

``results.json`` holds ``config``, ``config_hash``, ``references`` (per removed class, the
full-pool update and retraining: :class:`ReferenceRow`) and ``cells`` (per removed class,
sampler, sample size and seed: :class:`CellRow`), then ``environment`` and ``num_params``
(docs/design.md, "Protocol"). A file with a row that is not of this shape, or a number outside
its range, is refused naming the file and the entry (:func:`check_results`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repif import io
from repif.studies.rows import Row, check_rows, finite_positive, optional
from repif.studies.rows import is_int as _is_int
from repif.studies.rows import is_number as _is_number
from repif.studies.runs import StudyError

#: Row fields that measure the machine (time, memory), not the numbers: a re-run or a resume
#: must agree on every other field.
MEASURED_FIELDS = ("time_s", "gradient_s", "peak_mem_bytes", "sample_time_s", "pool_pass_s",
                   "fit_s", "solve_step_s")

#: Fields every cell row carries, as numbers (or null: a NaN in strict JSON).
CELL_METRICS = ("f1", "forget", "consistency", "accuracy_remaining", "ihvp_rel_error",
                "ihvp_cosine", "time_s", "peak_mem_bytes")
#: Fields every reference row carries, as numbers or null.
REFERENCE_METRICS = ("f1", "forget", "consistency", "accuracy_remaining", "time_s",
                     "peak_mem_bytes")
_HASH = re.compile(r"^[0-9a-f]{1,64}$")

#: The values a stored metric can take: fractions of test points (forget, consistency,
#: accuracy) and the F1s made of them lie in [0, 1], a cosine in [−1, 1], errors, times and
#: bytes are ≥ 0. Anything else in a results file was edited or damaged.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "f1": (0.0, 1.0), "f1_literature": (0.0, 1.0), "forget": (0.0, 1.0),
    "consistency": (0.0, 1.0), "accuracy_remaining": (0.0, 1.0), "ihvp_cosine": (-1.0, 1.0),
    "ihvp_rel_error": (0.0, math.inf), "time_s": (0.0, math.inf),
    "peak_mem_bytes": (0.0, math.inf),
}


@dataclass(kw_only=True)
class CellRow(Row):
    """One cell: the update of a subset drawn by ``sampler`` (its spec, e.g.
    ``logit-importance+shrink``) of ``sample_size`` points with ``seed``, scored on the test
    set, its estimate v_T against the full-pool v_R, and what it cost (every pass it reads
    charged in full: docs/design.md, "Protocol"). Fields written by later versions are
    optional, so results of earlier ones resume."""

    removed_class: int
    sampler: str
    sample_size: int
    seed: int
    forget: float | None
    consistency: float | None
    accuracy_remaining: float | None
    f1: float | None
    f1_literature: float | None = optional()
    ihvp_rel_error: float | None
    ihvp_cosine: float | None
    time_s: float | None
    peak_mem_bytes: float | None
    pool_pass_s: float | None = optional()
    gradient_s: float | None = optional()
    sample_time_s: float | None = optional()
    fit_s: float | None = optional()
    solve_step_s: float | None = optional()
    scale: float | None = optional()
    memory_method: str = optional()


@dataclass(kw_only=True)
class ReferenceRow(Row):
    """A reference of one removed class: ``kind="full"`` the update with the whole pool's
    curvature (with its ``scale`` η and ``solver``), ``kind="retrain"`` the model retrained
    without the class."""

    removed_class: int
    kind: str
    scale: float | None = optional()
    solver: str = optional()
    time_s: float | None
    peak_mem_bytes: float | None
    forget: float | None
    consistency: float | None
    accuracy_remaining: float | None
    f1: float | None
    f1_literature: float | None = optional()


def cell_key(cell: dict[str, Any]) -> tuple[int, str, int, int]:
    return cell["removed_class"], cell["sampler"], cell["sample_size"], cell["seed"]


def ref_key(row: dict[str, Any]) -> tuple[int, str]:
    return row["removed_class"], row["kind"]



def _check_cell(c: dict[str, Any], what: str) -> str | None:
    """The cell checks :class:`CellRow`'s shape does not make, or makes with a vaguer message."""
    for k in ("removed_class", "sample_size", "seed"):
        if not _is_int(c.get(k)):
            return f"{what} has {k}={c.get(k)!r}, not an integer"
    if not isinstance(c.get("sampler"), str):
        return f"{what} has sampler={c.get('sampler')!r}, not a name"
    for k in CELL_METRICS:
        if k not in c or not _is_number(c[k]):
            return f"{what} has {k}={c.get(k, '(missing)')!r}, not a number or null"
    return None


def _check_reference(r: dict[str, Any], what: str) -> str | None:
    """A reference's kind, its metrics, and a full-pool reference's positive scale."""
    if not _is_int(r.get("removed_class")) or r.get("kind") not in ("full", "retrain"):
        return (f"{what} has removed_class={r.get('removed_class')!r}, kind={r.get('kind')!r}; "
                "expected an integer and 'full' or 'retrain'")
    for k in REFERENCE_METRICS:
        if k not in r or not _is_number(r[k]):
            return f"{what} has {k}={r.get(k, '(missing)')!r}, not a number or null"
    if r["kind"] == "full" and not finite_positive(r.get("scale")):
        return f"{what} has scale={r.get('scale')!r}, not a positive number"
    return None


def check_results(obj: Any, path: Path) -> dict[str, Any]:
    """``obj`` (read from ``path``) if it has the results schema; else StudyError naming the
    first bad entry. Catches damaged and hand-edited files before anything relies on them."""

    def bad(what: str) -> StudyError:
        return StudyError(
            f"{path}: {what}; the file was edited or damaged: restore it (results.<hash>.json "
            "may hold an earlier copy) or move it away to start the study afresh"
        )

    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {type(obj).__name__}, not an object")
    h = obj.get("config_hash")
    if not isinstance(h, str) or not _HASH.match(h):
        raise bad(f"'config_hash' is {h!r}, not a hexadecimal hash")
    for field in ("references", "cells"):
        if not isinstance(obj.get(field), list):
            raise bad(f"'{field}' is {type(obj.get(field)).__name__}, not a list")
    check_rows(obj["cells"], "cells", CellRow, METRIC_RANGES, cell_key, bad, _check_cell,
               "the grid point")
    check_rows(obj["references"], "references", ReferenceRow, METRIC_RANGES, ref_key, bad,
               _check_reference, "the reference")
    return obj


def read_results(path: Path) -> dict[str, Any]:
    """A results file, checked (:func:`check_results`); StudyError if unreadable."""
    try:
        obj = io.read_json(path)
    except ValueError as err:
        raise StudyError(
            f"{path} is corrupt or was not written by this version of repif ({err}); move it "
            "away or delete it to start the study afresh"
        ) from err
    return check_results(obj, path)

