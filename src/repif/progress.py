"""Progress bars for long passes over data (tqdm), shown by one process only."""

from __future__ import annotations

from tqdm.auto import tqdm

from repif import distributed


def bar(total: int, desc: str, enabled: bool | None, unit: str = "pt") -> tqdm:
    """A bar of ``total`` ``unit`` s. ``enabled``: True shows it, False hides it, None lets tqdm
    decide (shown on a terminal only). Over several processes only rank 0 shows it. The bar
    disappears when closed (``leave=False``): a finished pass leaves no clutter."""
    disable = None if enabled is None else not enabled
    if not distributed.is_main():
        disable = True
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
