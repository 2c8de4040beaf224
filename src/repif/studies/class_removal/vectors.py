"""The class-removal study's stored estimates: v_T of every cell (for the seed spread) and g,
v_R of every removed class (to resume without the full-pool solve), under
``DIR/vectors/<configuration hash>/``, each checked on read against its checksum and the
configuration that wrote it (docs/design.md, "Failure behaviour")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from repif import io
from repif.studies.runs import StudyEnvironmentError


class StoredVectors:
    """The stored estimates' part of :class:`~repif.studies.class_removal.study.Study` (a
    mixin: it reads the study's ``vector_dir``, ``config`` and ``_legacy``)."""

    def _vector_path(self, cls: int, spec: str, m: int, seed: int) -> Path:
        return self.vector_dir / f"c{cls}_{spec}_m{m}_s{seed}.safetensors"

    def _reference_path(self, cls: int) -> Path:
        return self.vector_dir / f"full_c{cls}.safetensors"

    def _vector_meta(self, key: tuple) -> dict[str, Any]:
        """What a stored vector records about itself, checked when it is read back."""
        return {"config_hash": self.config.cell_hash(), "key": list(key)}

    def _read_vectors(self, path: Path, key: tuple) -> tuple[dict[str, Tensor] | None, str]:
        """The tensors stored at ``path`` for grid point (or reference) ``key``, or None and why
        not: missing, damaged (unreadable or failing its checksum) or another run's."""
        try:
            tensors, meta = io.load_tensors(path)
        except FileNotFoundError:
            legacy = path.parent.parent / path.name  # written before vectors/<hash>/ existed
            if key in self._legacy and legacy.is_file():
                try:
                    tensors, meta = io.load_tensors(legacy)
                except (ValueError, OSError) as err:
                    return None, f"damaged ({err})"
                if meta == {}:
                    io.save_tensors_atomic(path, tensors, self._vector_meta(key))
                    return tensors, ""
            return None, "missing"
        except ValueError as err:
            return None, f"damaged ({err})"
        if meta != self._vector_meta(key):
            return None, f"written by another run (it records {meta})"
        return tensors, ""

    def vectors(self, cls: int, spec: str, m: int) -> list[Tensor]:
        """The stored v_T of every seed of one (class, sampler, size); StudyEnvironmentError if
        any is missing or damaged, so that no statistic is taken over fewer seeds."""
        out = []
        for seed in range(self.config.seeds):
            key = (cls, spec, m, seed)
            path = self._vector_path(*key)
            tensors, why = self._read_vectors(path, key)
            if tensors is None:
                raise StudyEnvironmentError(
                    f"the estimate of cell {key} ({path}) is {why}; re-run the command to "
                    "rebuild it (the seed spread is never computed from fewer seeds)"
                )
            out.append(tensors["v"])
        return out
