"""The class-removal study's configuration: a typed dataclass saved as JSON beside results."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from repif import samplers, solvers
from repif.curvature import CURVATURES

#: Suffix on a sampler name that turns on the diagonal shrinkage fill (``shrinkage="auto"``).
SHRINK_SUFFIX = "+shrink"

#: Grid for ``scale="auto"``: η is picked on the validation split, never on the test set.
SCALE_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)

#: Fields that do not change a cell's numbers (only which cells exist, or how they are shown).
_GRID_FIELDS = ("remove", "samplers", "sizes", "seeds")


@dataclass
class StudyConfig:
    """Everything a class-removal run depends on. ``seeds`` is a count (seeds 0…seeds−1)."""

    dataset: str = "digits"
    model: str = "mlp"
    width: int | None = None  # model size (see repif.models.build); None: the model's default
    remove: list[int] = field(default_factory=lambda: [0])
    samplers: list[str] = field(default_factory=lambda: ["random"])
    sizes: list[int] = field(default_factory=lambda: [64])
    seeds: int = 3
    solver: str = "cg"
    curvature: str = "ggn"
    damping: float = 0.01
    scale: float | str = "auto"
    steps: int = 1
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    epochs: int = 30
    lr: float | None = None
    weight_decay: float = 1e-3
    batch_size: int = 64
    train_seed: int = 0
    validation_fraction: float = 0.1
    dtype: str = "float64"
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and the fix."""
        if not self.remove:
            raise ValueError("--remove needs at least one class")
        if len(set(self.remove)) != len(self.remove):
            raise ValueError(f"--remove lists a class twice: {self.remove}; list each once")
        for s in self.samplers:
            samplers.REGISTRY.get(s.removesuffix(SHRINK_SUFFIX))
        solvers.REGISTRY.get(self.solver)
        if self.curvature not in CURVATURES:
            known = ", ".join(CURVATURES)
            raise ValueError(f"unknown curvature {self.curvature!r}; known: {known}")
        if self.width is not None and (
            isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1
        ):
            raise ValueError(
                f"width must be a positive integer, got {self.width!r}; pass e.g. --width 16, or "
                "leave it out for the model's default"
            )
        if not self.sizes or any(m <= 0 for m in self.sizes):
            raise ValueError(f"sizes must be positive integers, got {self.sizes}")
        if self.seeds <= 0:
            raise ValueError(f"seeds must be a positive count, got {self.seeds}")
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.scale != "auto" and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"scale must be 'auto' or a positive number, got {self.scale!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.scale == "auto" and not 0 < self.validation_fraction < 1:
            raise ValueError("scale='auto' needs a validation_fraction in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def cell_hash(self) -> str:
        """Hash of the fields that change a cell's numbers; cells are reused only if it matches."""
        d = {k: v for k, v in self.to_dict().items() if k not in _GRID_FIELDS}
        if d["width"] is None:  # leave it out, so results written before ``width`` existed resume
            del d["width"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def split_sampler(spec: str) -> tuple[str, float | str]:
    """``"logit-importance+shrink"`` → ("logit-importance", "auto"); plain names → (name, 0.0)."""
    if spec.endswith(SHRINK_SUFFIX):
        return spec.removesuffix(SHRINK_SUFFIX), "auto"
    return spec, 0.0
