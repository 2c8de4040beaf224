"""Typed result rows (repif.studies.rows): the JSON written is the rows' to_dict, and a results
file is read back through from_dict, so an unknown key or a mistyped field is refused naming the
field and the file."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from repif.studies.class_removal.rows import CellRow, ReferenceRow, read_results
from repif.studies.evaluation.config import EvaluationError
from repif.studies.evaluation.rows import EvaluationRow
from repif.studies.evaluation.rows import read_results as read_evaluation
from repif.studies.rows import ABSENT
from repif.studies.runs import StudyError

SCORES = dict(forget=0.95, consistency=0.85, accuracy_remaining=0.8, f1=0.9, f1_literature=0.88)


def _cell(**extra) -> dict:
    return CellRow(removed_class=0, sampler="random", sample_size=8, seed=0, **SCORES,
                   ihvp_rel_error=0.3, ihvp_cosine=0.95, time_s=0.1, peak_mem_bytes=1024,
                   scale=2.0, memory_method="CPU RSS growth", **extra).to_dict()


def _study(tmp_path, cell: dict):
    refs = [ReferenceRow(removed_class=0, kind="full", scale=2.0, solver="cg", time_s=1.0,
                         peak_mem_bytes=10, **SCORES).to_dict(),
            ReferenceRow(removed_class=0, kind="retrain", time_s=1.0, peak_mem_bytes=10,
                         **SCORES).to_dict()]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {}, "config_hash": "0123abcd", "references": refs,
                                "cells": [cell]}))
    return path


def test_rows_write_their_fields_in_order_and_leave_absent_ones_out():
    cell = _cell()
    assert list(cell)[:9] == ["removed_class", "sampler", "sample_size", "seed", "forget",
                              "consistency", "accuracy_remaining", "f1", "f1_literature"]
    assert "pool_pass_s" not in cell and "fit_s" not in cell  # not given: not written
    assert CellRow.from_dict(cell).to_dict() == cell
    retrain = ReferenceRow(removed_class=1, kind="retrain", time_s=1.0, peak_mem_bytes=0,
                           forget=1.0, consistency=1.0, accuracy_remaining=1.0, f1=1.0)
    assert list(retrain.to_dict()) == ["removed_class", "kind", "time_s", "peak_mem_bytes",
                                       "forget", "consistency", "accuracy_remaining", "f1"]
    # the absent marker survives copies and pickling (rows are deep-copied by callers)
    assert copy.deepcopy(retrain).scale is ABSENT and pickle.loads(pickle.dumps(retrain)) == retrain


def test_a_good_results_file_reads(tmp_path):
    assert read_results(_study(tmp_path, _cell()))["cells"][0]["scale"] == 2.0


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(colour="red"), "cells[0] has unknown key(s) ['colour']"),
    (lambda c: c.update(memory_method=5), "cells[0] has memory_method=5, not a name"),
    (lambda c: c.update(scale="auto"), "cells[0] has scale='auto', not a number or null"),
    (lambda c: c.update(pool_pass_s=True), "cells[0] has pool_pass_s=True, not a number"),
])
def test_a_study_row_with_an_unknown_or_mistyped_field_is_refused(tmp_path, edit, words):
    cell = _cell()
    edit(cell)
    path = _study(tmp_path, cell)
    with pytest.raises(StudyError) as err:
        read_results(path)
    assert str(err.value).startswith(f"{path}: {words}")


def test_missing_fields_are_named():
    cell = _cell()
    del cell["ihvp_cosine"]
    with pytest.raises(ValueError, match="cells\\[2\\] has no ihvp_cosine"):
        CellRow.from_dict(cell, "cells[2]")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(solvr="cg"), "cells[0] has unknown key(s) ['solvr']"),
    (lambda c: c.update(n_test=2.5), "cells[0] has n_test=2.5, not an integer"),
    (lambda c: c.update(sampler=3), "cells[0] has sampler=3, not a name or null"),
])
def test_an_evaluation_row_with_an_unknown_or_mistyped_field_is_refused(tmp_path, edit, words):
    row = EvaluationRow(method="ggn:direct", curvature="ggn", solver="direct", sampler=None,
                        sample_size=0, seed=0, damping=0.01, score=0.4, score_se=0.05,
                        n_test=3, n_undefined=1, per_test=[0.3, None, 0.5], time_s=0.2,
                        fit_time_s=0.1, peak_mem_bytes=10, memory_method="m").to_dict()
    assert row["sampler"] is None and "pooled" not in row  # null written, absent left out
    assert EvaluationRow.from_dict(row).to_dict() == row
    edit(row)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {}, "config_hash": "0123abcd", "cells": [row]}))
    with pytest.raises(EvaluationError) as err:
        read_evaluation(path)
    assert str(err.value).startswith(f"{path}: {words}")
