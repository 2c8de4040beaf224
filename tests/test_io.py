import json
import os

import pytest
import torch

from repif import io


def test_json_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.write_json_atomic(path, {"a": 1, "b": [1.5, "x"]})
    assert io.read_json(path) == {"a": 1, "b": [1.5, "x"]}
    io.write_json_atomic(path, {"a": 2})
    assert io.read_json(path) == {"a": 2}
    assert sorted(os.listdir(path.parent)) == ["a.json"]


def test_failed_serialisation_leaves_old_file_and_no_partial(tmp_path):
    path = tmp_path / "a.json"
    io.write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        io.write_json_atomic(path, {"bad": object()})
    assert io.read_json(path) == {"ok": True}
    assert os.listdir(tmp_path) == ["a.json"]
    new = tmp_path / "new.json"
    with pytest.raises(TypeError):
        io.write_json_atomic(new, {"bad": object()})
    assert not new.exists()


def test_failure_while_writing_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_tensors_atomic(path, {"w": torch.ones(3)}, {"k": 1})
    assert os.listdir(tmp_path) == []


def test_tensors_roundtrip(tmp_path):
    path = tmp_path / "t.safetensors"
    w = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    io.save_tensors_atomic(path, {"w": w, "n": torch.tensor(3)}, {"seed": 1, "nested": {"a": [1]}})
    tensors, meta = io.load_tensors(path)
    assert torch.equal(tensors["w"], w) and tensors["w"].is_contiguous()
    assert tensors["n"].item() == 3
    assert meta == {"seed": 1, "nested": {"a": [1]}}


def test_corrupt_files_raise_value_error_naming_path(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors"):
        io.load_tensors(bad)
    for data in (b"\x01\x02", b"\xff" * 8 + b"{}", b""):  # short, header past the end, empty
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="bad.safetensors"):
            io.load_tensors(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(bad))  # a valid file written by another program
    with pytest.raises(ValueError, match="without repif metadata"):
        io.load_tensors(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{truncated")
    with pytest.raises(ValueError, match="bad.json"):
        io.read_json(badj)
    with pytest.raises(FileNotFoundError):
        io.load_tensors(tmp_path / "missing.safetensors")


def test_environment_metadata():
    env = io.environment_metadata()
    assert env["torch"] == torch.__version__
    assert set(env) == {"repif", "torch", "python"}
    json.dumps(env)
