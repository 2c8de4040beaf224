"""The class-removal study's configuration: a typed dataclass saved as JSON beside results."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from repif import samplers, solvers
from repif.curvature import kfac
from repif.curvature import kinds as curvature_kinds
from repif.memory import MemoryBudget
from repif.unlearning import SCALE_GRID as _SCALE_GRID
from repif.validation import check_choice, dataclass_from_dict

#: Suffix on a sampler name that turns on the diagonal shrinkage fill (``shrinkage="auto"``).
SHRINK_SUFFIX = "+shrink"
#: Sampler-spec suffix ``+candN``: two-phase sampling from N·m uniform candidates.
CANDIDATES_PREFIX = "cand"

#: Grid for ``scale="auto"`` (one grid for the API and the study: see repif.unlearning).
SCALE_GRID = _SCALE_GRID

#: What a run computes besides its cells: "all" the full-pool update (v_R, η, the inverse-HVP
#: error) and the retrained model; "none" neither (η must be given; the cells' inverse-HVP error
#: is then null), for a model whose references an earlier run measured and the hours they take
#: are better spent on cells (docs/design.md, "Protocol"). "none" holds out the validation split
#: as a scale="auto" run does, so the model is the one whose η is reused.
REFERENCES = ("all", "none")

#: Fields that do not change a cell's numbers (only which cells exist, or how they are shown;
#: the memory budget only how the streamed passes are chunked).
_GRID_FIELDS = ("remove", "samplers", "sizes", "seeds", "max_memory")


@dataclass
class StudyConfig:
    """Everything a class-removal run depends on. ``seeds`` is a count (seeds 0…seeds−1)."""

    dataset: str = "digits"
    model: str = "mlp"
    width: int | None = None  # model size (see repif.models.build); None: the model's default
    remove: list[int] = field(default_factory=lambda: [0])
    samplers: list[str] = field(default_factory=lambda: ["random", "logit-importance"])
    sizes: list[int] = field(default_factory=lambda: [16, 64, 256])
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
    #: Options of a Kronecker-factored curvature ("kfac"/"ekfac"; repif.curvature.kinds.KFAC):
    #: None keeps the library's default ("exact" output Hessian; other layers an error).
    fisher: str | None = None
    other_layers: str | None = None
    weight_sharing: str | None = None
    #: Precision of the Kronecker factors' eigendecompositions (repif.curvature.kfac), None: the
    #: library's default (float64).
    eigh_dtype: str | None = None
    #: EK-FAC's eigenbasis from this many uniform points of the retained pool, or "pool" (its
    #: eigenvalues from the subset; repif.curvature.kinds); None: from the subset.
    basis_size: int | str | None = None
    #: REFERENCES: "all" (default) or "none".
    references: str = "all"
    #: Bytes each estimator may use per streamed chunk (repif.memory.MemoryBudget); None: a
    #: quarter of the free RAM (at most 1 GiB) or GPU memory.
    max_memory: int | None = None

    def kronecker_options(self) -> dict[str, Any]:
        """The estimator's ``kronecker_options`` for this configuration (empty: defaults)."""
        return {k: v for k, v in (("fisher", self.fisher), ("other_layers", self.other_layers),
                                  ("weight_sharing", self.weight_sharing),
                                  ("eigh_dtype", self.eigh_dtype),
                                  ("basis_size", self.basis_size)) if v is not None}

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and the fix."""
        if not self.remove:
            raise ValueError("--remove needs at least one class")
        if not all(_is_int(k) for k in self.remove):
            raise ValueError(f"--remove takes class numbers, got {self.remove}")
        if len(set(self.remove)) != len(self.remove):
            raise ValueError(f"--remove lists a class twice: {self.remove}; list each once")
        if not self.samplers:
            raise ValueError(
                "--samplers names no sampler; pass at least one, e.g. --samplers "
                "random,logit-importance"
            )
        for s in self.samplers:
            samplers.REGISTRY.get(parse_sampler(s)[0])
        _once(self.samplers, "--samplers", "sampler")
        solvers.REGISTRY.get(self.solver)
        if self.curvature not in curvature_kinds.names():
            known = ", ".join(curvature_kinds.names())
            raise ValueError(f"unknown curvature {self.curvature!r}; known: {known}")
        kronecker = curvature_kinds.get(self.curvature).kronecker
        solvers.check_curvature(self.curvature, self.solver, _flag)
        if self.kronecker_options() and not kronecker:
            raise ValueError("--fisher, --other-layers, --weight-sharing, --eigh-dtype and "
                             "--basis-size configure --curvature kfac/ekfac; leave them out with "
                             f"--curvature {self.curvature}")
        if self.basis_size is not None:
            try:
                curvature_kinds.check_basis_size(self.basis_size)
            except ValueError:
                raise ValueError(f"--basis-size must be a positive number of points or 'pool', "
                                 f"got {self.basis_size!r}") from None
            if self.curvature != "ekfac":
                raise ValueError(f"--basis-size re-fits EK-FAC's eigenvalues on the subset; "
                                 f"use --curvature ekfac (got --curvature {self.curvature})")
        if self.max_memory is not None:
            MemoryBudget(self.max_memory)  # a bad figure fails here, naming the fix
        for value, choices, flag in ((self.fisher, kfac.FISHER_MODES, "--fisher"),
                                     (self.other_layers, kfac.OTHER_LAYERS, "--other-layers"),
                                     (self.weight_sharing, kfac.WEIGHT_SHARING,
                                      "--weight-sharing"),
                                     (self.eigh_dtype, kfac.EIGH_DTYPES, "--eigh-dtype")):
            if value is not None:
                check_choice(value, choices, flag)
        if self.width is not None and (not _is_int(self.width) or self.width < 1):
            raise ValueError(
                f"width must be a positive integer, got {self.width!r}; pass e.g. --width 16, or "
                "leave it out for the model's default"
            )
        if not self.sizes or any(not _is_int(m) or m <= 0 for m in self.sizes):
            raise ValueError(f"sizes must be positive integers, got {self.sizes}")
        _once(self.sizes, "--sizes", "size")
        if not _is_int(self.seeds) or self.seeds <= 0:
            raise ValueError(f"seeds must be a positive count, got {self.seeds}")
        if not _is_int(self.steps) or self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.scale != "auto" and not (_is_finite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be 'auto' or a positive number, got {self.scale!r}")
        _number(self.damping, "--damping", "≥ 0, e.g. 0.01", lambda v: v >= 0)
        _number(self.weight_decay, "--weight-decay", "≥ 0, e.g. 1e-3", lambda v: v >= 0)
        if self.lr is not None:
            _number(self.lr, "--lr", "> 0, e.g. 0.01 (or leave it out)", lambda v: v > 0)
        if not _is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"--epochs must be a whole number ≥ 0, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for flag, value in (("--limit-train", self.limit_train),
                            ("--limit-test", self.limit_test)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{flag} must be a positive number of points, got {value!r}; "
                                 "leave it out to use all of them")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        check_choice(self.references, REFERENCES, "--references")
        if self.references == "none" and self.scale == "auto":
            raise ValueError("--references none needs a step scale: pass --scale η (e.g. the "
                             "scale of an earlier run's full-pool reference), since η is picked "
                             "along the full-pool update")
        if (self.scale == "auto" or self.references == "none") and not (
            _is_finite(self.validation_fraction) and 0 < self.validation_fraction < 1
        ):
            raise ValueError("scale='auto' needs a validation_fraction in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """The configuration stored in a results file; an unknown key is a ValueError naming
        it."""
        return dataclass_from_dict(cls, d, "the study configuration")

    def cell_hash(self) -> str:
        """Hash of the fields that change a cell's numbers; cells are reused only if it matches."""
        d = {k: v for k, v in self.to_dict().items() if k not in _GRID_FIELDS}
        for key in ("width", "fisher", "other_layers", "weight_sharing", "eigh_dtype",
                    "basis_size"):
            if d[key] is None:  # left out when unset, so results written before they existed
                del d[key]  # resume
        if d["references"] == "all":  # likewise
            del d["references"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _flag(name: str, value: str) -> str:
    """An option as the command line spells it: ``--curvature ggn``."""
    return f"--{name} {value}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(value: Any, flag: str, wanted: str, ok: Callable[[float], bool]) -> None:
    if not _is_finite(value) or not ok(value):
        raise ValueError(f"{flag} must be a finite number {wanted}, got {value!r}")


def _once(values: list[Any], flag: str, what: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(
                f"{flag} lists {what} {v!r} twice ({','.join(map(str, values))}); list each once"
            )
        seen.add(v)


def parse_sampler(spec: str) -> tuple[str, float | str, float | None]:
    """A sampler spec → (name, shrinkage, candidates). ``"logit-importance"`` is the sampler
    on the whole pool; ``+shrink`` adds the shrinkage fill ("auto"); ``+candN`` picks from N·m
    uniform candidates (two-phase sampling, the estimator's ``candidates=N``), e.g.
    ``"logit-importance+cand8+shrink"``. An unknown suffix is a ValueError naming it."""
    name, *parts = spec.split("+")
    shrinkage: float | str = 0.0
    candidates: float | None = None
    for part in parts:
        if "+" + part == SHRINK_SUFFIX:
            shrinkage = "auto"
            continue
        factor = part.removeprefix(CANDIDATES_PREFIX)
        try:
            candidates = float(factor) if part.startswith(CANDIDATES_PREFIX) else None
        except ValueError:
            candidates = None
        if candidates is None or not (math.isfinite(candidates) and candidates >= 1):
            raise ValueError(
                f"sampler {spec!r}: unknown suffix +{part}; write {SHRINK_SUFFIX} for the "
                f"shrinkage fill or +{CANDIDATES_PREFIX}N (N ≥ 1) for N·m uniform candidates"
            )
    return name, shrinkage, candidates


def split_sampler(spec: str) -> tuple[str, float | str]:
    """``"logit-importance+shrink"`` → ("logit-importance", "auto"); plain names → (name, 0.0)
    (see :func:`parse_sampler`, which also reads ``+candN``)."""
    name, shrinkage, _ = parse_sampler(spec)
    return name, shrinkage
