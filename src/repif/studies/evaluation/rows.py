"""The rows of an evaluation's ``results.json``, typed and checked when read.

``results.json`` holds ``config``, ``config_hash``, ``ground_truth`` (retrain counts, the ground
truth's own noise) and ``cells`` (:class:`EvaluationRow`: one per method × sample size × seed ×
damping), then ``environment`` and ``num_params``. A file with a row that is not of this shape,
or a number outside its range, is refused naming the file and the entry (:func:`check_results`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repif import io
from repif.studies.evaluation.config import EvaluationError
from repif.studies.rows import Row, check_rows, is_int, is_number, optional, out_of_range

#: What a LOO cell reports besides the per-test correlation, under each convention.
LOO_EXTRAS = ("pooled", "slope", "median_rel_error")


@dataclass(kw_only=True)
class EvaluationRow(Row):
    """One cell: ``method`` (its spec) at ``sample_size`` (0: the whole training set), ``seed``
    and ``damping``; ``score`` the mean per-test LDS (Spearman) or LOO (Pearson) correlation,
    ``per_test`` each test point's (rounded to 5 digits; null where undefined). LOO rows add
    :data:`LOO_EXTRAS` under both conventions (``_reweight``). Fields written by later
    versions are optional, so results of earlier ones resume."""

    method: str
    curvature: str = optional()
    solver: str = optional()
    sampler: str | None = optional()
    sample_size: int
    seed: int
    damping: float
    score: float | None
    score_se: float | None
    n_test: int = optional()
    n_undefined: int = optional()
    per_test: list[float | None] = optional()
    pooled: float | None = optional()
    pooled_reweight: float | None = optional()
    slope: float | None = optional()
    slope_reweight: float | None = optional()
    median_rel_error: float | None = optional()
    median_rel_error_reweight: float | None = optional()
    time_s: float | None
    fit_time_s: float | None = optional()
    peak_mem_bytes: float | None
    memory_method: str = optional()


def cell_key(row: dict[str, Any]) -> tuple[str, int, int, float]:
    return row["method"], row["sample_size"], row["seed"], float(row["damping"])


_HASH_CHARS = set("0123456789abcdef")

#: The values a stored cell field can take: LDS (Spearman) and LOO (Pearson) scores are means
#: of correlations, in [−1, 1] like the pooled correlations; standard errors, dampings, times
#: and bytes are ≥ 0. Anything else in a results file was edited or damaged.
CELL_RANGES: dict[str, tuple[float, float]] = {
    "score": (-1.0, 1.0), "pooled": (-1.0, 1.0), "pooled_reweight": (-1.0, 1.0),
    "score_se": (0.0, math.inf), "damping": (0.0, math.inf), "time_s": (0.0, math.inf),
    "fit_time_s": (0.0, math.inf), "peak_mem_bytes": (0.0, math.inf),
}


def _check_cell(c: dict[str, Any], what: str) -> str | None:
    """The cell checks :class:`EvaluationRow`'s shape does not make, or makes with a vaguer
    message: a method name, integer size and seed, a damping, each per-test score in range."""
    if not isinstance(c.get("method"), str):
        return f"{what} has method={c.get('method')!r}, not a name"
    for k in ("sample_size", "seed"):
        if not is_int(c.get(k)):
            return f"{what} has {k}={c.get(k)!r}, not an integer"
    for k in ("damping", "score", "score_se", "time_s", "peak_mem_bytes"):
        v = c.get(k, "(missing)")
        if not is_number(v):
            return f"{what} has {k}={v!r}, not a number or null"
    if c["damping"] is None:
        return f"{what} has no damping"
    per_test = c.get("per_test", [])
    if not isinstance(per_test, list):
        return f"{what} has per_test={per_test!r}, not a list"
    for t, v in enumerate(per_test):
        if not is_number(v):
            return f"{what} has per_test[{t}]={v!r}, not a number or null"
        if v is not None and (problem := out_of_range({"score": v}, CELL_RANGES)):
            return f"{what} has per_test[{t}]: {problem}"
    return None


def check_results(obj: Any, path: Path) -> dict[str, Any]:
    """``obj`` if it has the evaluation results schema, else EvaluationError naming the first
    bad entry (a damaged or hand-edited file is refused, never half-used)."""

    def bad(what: str) -> EvaluationError:
        return EvaluationError(f"{path}: {what}; the file was edited or damaged: restore it "
                               "(results.<hash>.json may hold an earlier copy) or move it away "
                               "to start afresh")

    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {type(obj).__name__}, not an object")
    h = obj.get("config_hash")
    if not isinstance(h, str) or not h or not set(h) <= _HASH_CHARS:
        raise bad(f"'config_hash' is {h!r}, not a hexadecimal hash")
    if not isinstance(obj.get("cells"), list):
        raise bad("'cells' is not a list")
    check_rows(obj["cells"], "cells", EvaluationRow, CELL_RANGES, cell_key, bad, _check_cell,
               "the cell")
    return obj


def read_results(path: Path) -> dict[str, Any]:
    """A results file, checked (:func:`check_results`); EvaluationError if unreadable."""
    try:
        obj = io.read_json(path)
    except ValueError as err:
        raise EvaluationError(f"{path} is corrupt ({err}); move it away or delete it to start "
                              "afresh") from err
    return check_results(obj, path)


def merge_results(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Cells of both (same hash), ``newer``'s winning where both have one."""
    cells = {cell_key(c): c for c in older["cells"]}
    cells.update({cell_key(c): c for c in newer["cells"]})
    merged = {**older, **newer}
    merged["cells"] = list(cells.values())
    return merged
