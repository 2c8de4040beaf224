"""The two benchmark architectures, with no repif dependency (peer venvs import only this).

Module layout and parameter names match ``repif.models`` ("mlp", "cnn") so a state dict saved
from repif loads here unchanged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

PROBLEM_DIR = Path(os.environ.get("PEER_PROBLEM_DIR", "/tmp/peer-problems"))
PROBLEMS = ("digits-mlp", "fashion-cnn")


class MLP(nn.Sequential):
    def __init__(self, input_shape, num_classes: int, hidden: int = 64) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Sequential):
    def __init__(self, input_shape, num_classes: int, hidden: int = 32) -> None:
        c, h, w = input_shape
        out_h, out_w = min(4, max(h // 4, 1)), min(4, max(w // 4, 1))
        super().__init__(
            nn.Conv2d(c, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d((out_h, out_w)),
            nn.Flatten(),
            nn.Linear(16 * out_h * out_w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


def load_problem(name: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, (x_train, y_train), (x_test, y_test), meta) for problem ``name``."""
    from safetensors.torch import load_file

    d = PROBLEM_DIR / name
    meta = json.loads((d / "meta.json").read_text())
    t = load_file(str(d / "problem.safetensors"))
    cls = {"mlp": MLP, "cnn": SmallCNN}[meta["arch"]]
    model = cls(tuple(meta["input_shape"]), meta["num_classes"], meta["hidden"])
    state = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    model.load_state_dict(state)
    model = model.to(dtype).eval()
    train = (t["x_train"].to(dtype), t["y_train"].long())
    test = (t["x_test"].to(dtype), t["y_test"].long())
    return model, train, test, meta


def save_scores(path: str | os.PathLike, scores: torch.Tensor, seconds: float, **info) -> None:
    """Write (n_test, n_train) scores (repif's sign convention) and the timed seconds."""
    from safetensors.torch import save_file

    save_file({"scores": scores.detach().to(torch.float64).contiguous()}, str(path),
              metadata={"time_s": repr(float(seconds)), "info": json.dumps(info)})
