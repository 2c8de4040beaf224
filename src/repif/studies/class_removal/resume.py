"""Resuming the class-removal study: earlier results of the same configuration are read back
(``results.json``, and the backup ``results.<hash>.json`` of this configuration) and merged by
grid point, so nothing finished is lost (docs/design.md, "Failure behaviour")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from repif.studies.class_removal.config import StudyConfig
from repif.studies.class_removal.rows import cell_key, read_results, ref_key
from repif.studies.runs import StudyError

log = logging.getLogger("repif.study")


def merge_results(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """The rows of both (same configuration hash), by grid point; ``newer``'s row wins where
    both have one. Nothing either holds is lost."""
    cells = {cell_key(c): c for c in older["cells"]}
    cells.update({cell_key(c): c for c in newer["cells"]})
    refs = {ref_key(r): r for r in older["references"]}
    refs.update({ref_key(r): r for r in newer["references"]})
    merged = {**older, **newer}
    merged["cells"], merged["references"] = list(cells.values()), list(refs.values())
    return merged



def load_previous(out: Path, config: StudyConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Earlier results of this configuration — ``results.json`` if its hash matches, merged
    with the backup ``results.<hash>.json`` of this hash if there is one — or an empty skeleton;
    and, if ``results.json`` holds another configuration, its content, which the caller backs up
    before its first write."""
    path = out / "results.json"
    h = config.cell_hash()
    stored: dict[str, Any] = {"config": config.to_dict(), "config_hash": h,
                              "references": [], "cells": []}
    current = read_results(path) if path.exists() else None
    stale = None
    if current is not None and current["config_hash"] == h:
        stored = current
    else:
        stale = current
    backup = out / f"results.{h}.json"
    if backup.exists():
        try:
            stored = merge_results(read_results(backup), stored)
        except StudyError as err:
            log.warning("ignoring the unreadable backup %s (%s); it is kept as it is", backup,
                        err)
    stored["config"], stored["config_hash"] = config.to_dict(), h
    return stored, stale

