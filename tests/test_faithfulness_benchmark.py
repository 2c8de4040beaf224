"""benchmarks/faithfulness.py: its sampler specs and the merge guard, in well under a second (the
benchmark itself runs for minutes and has its own ``--quick`` mode)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _faithfulness():
    spec = importlib.util.spec_from_file_location(
        "faithfulness_benchmark", ROOT / "benchmarks" / "faithfulness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampler_specs_carry_their_options():
    f = _faithfulness()
    s = f.sampler_of("logit-importance+proxy=leverage+ridge=0.1")
    assert (s.name, s.proxy, s.ridge) == ("logit-importance", "leverage", 0.1)
    assert f.sampler_of("random").name == "random"
    with pytest.raises(ValueError, match="leave \\+shrink out"):
        f.sampler_of("random+shrink")
    with pytest.raises(ValueError, match="ridge configures proxy='leverage'"):
        f.sampler_of("logit-importance+ridge=0.1")


def test_a_merge_refuses_another_model_and_adds_a_new_dataset():
    f = _faithfulness()
    old = {"datasets": {"digits": {"reference": {"v_norm": 0.0539}}}}
    f.check_mergeable(old, "digits", {"reference": {"v_norm": 0.0539}})
    f.check_mergeable(old, "fashion-mnist", {"reference": {"v_norm": 2.19}})  # added
    with pytest.raises(SystemExit, match="differs from the earlier"):
        f.check_mergeable(old, "digits", {"reference": {"v_norm": 0.05391}})


def test_a_merge_refuses_another_grid_before_its_cells():
    f = _faithfulness()
    old = {"config": {"seeds": 20, "sizes": [16, 32], "damping": 0.01}}
    f.check_merge_grid(old, {"seeds": 20, "sizes": [16, 32], "damping": 0.01})
    with pytest.raises(SystemExit, match="seeds = 5 differs"):
        f.check_merge_grid(old, {"seeds": 5, "sizes": [16, 32], "damping": 0.01})
