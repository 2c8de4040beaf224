"""What the estimator is built on, prepared and checked once: its own copy of the model and the
training data source, with the model's output size (docs/design/architecture.md, "Parts").

Every check here fails when the estimator is built, with one error naming the bad value and the
fix, rather than deep inside a later pass.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from repif import distributed
from repif.data import DataSource
from repif.gradients.streaming import split_batch
from repif.task import FunctionalModel, Task
from repif.validation import check_finite


def copy_model(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """The estimator's own copy of ``model`` in eval mode on ``device`` (default: where its
    parameters are), with rank 0's weights over several processes; non-finite weights refused.
    The caller's model is never touched."""
    params = list(model.parameters())
    dev = torch.device(device) if device is not None else (
        params[0].device if params else torch.device("cpu"))
    mine = copy.deepcopy(model).to(dev).eval()
    distributed.broadcast_module(mine)  # over several processes: rank 0's weights
    for name, p in mine.named_parameters():
        check_finite(p.detach(), f"model parameter {name!r}")
    return mine


def training_source(fm: FunctionalModel, train: Any, **source_options: Any
                    ) -> tuple[DataSource, int, Any]:
    """(the training :class:`DataSource`, the model's output size C, the first chunk's model
    inputs), after checking that every process holds the same data, that the model runs on it
    and gives one finite loss per point, and that the targets fit C."""
    source = DataSource(train, **source_options)
    if source.tensors is not None:
        check_finite(source.tensors[0], "training inputs")
    distributed.check_agree("training data", source.fingerprint())
    inputs, targets = split_batch(fm, source.first())
    output_dim = fm.output_dim(inputs)  # a model that fails on the data: one error
    task = fm.task
    if source.tensors is not None and type(task).split is Task.split:
        task.check_targets(source.tensors[-1], output_dim)
    else:
        task.check_targets(targets, output_dim)
    fm.check_task(inputs, targets)  # one loss per point, finite: else one error
    return source, output_dim, inputs
