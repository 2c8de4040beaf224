"""Small helpers over ``nn.Module`` shared by every room that looks inside a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: Callable[..., Any],
                  with_kwargs: bool = False) -> Iterator[None]:
    """``hook`` on the forward of every module in ``modules`` for the ``with`` block, and off
    again however the block ends (an error in the forward included). With ``with_kwargs`` the
    hook is called as hook(module, args, kwargs, output), else hook(module, args, output); a
    value it returns replaces the output."""
    handles = [m.register_forward_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
