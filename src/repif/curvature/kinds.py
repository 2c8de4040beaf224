"""Curvature kinds, registered by name: what a fit builds on the curvature subset.

* ``"ggn"`` and ``"hessian"``: the exact subset curvature as a
  :class:`~repif.curvature.operator.CurvatureOperator` (products through the model; any solver
  but ``eigen``).
* ``"kfac"`` and ``"ekfac"``: a :class:`~repif.curvature.kfac.KroneckerCurvature` fitted on the
  subset with the sampler's weights, inverted in its eigenbasis by ``solver="eigen"``; the same
  fit is the preconditioner of ``cg`` and ``lissa`` (``preconditioner="ekfac"``). Options:
  ``fisher`` ("exact": the GGN's output Hessian through C backward passes per point; "sampled":
  one backward at a label drawn from the model's predictive), ``other_layers`` ("error",
  "identity", "frozen"), ``basis_size`` (EK-FAC: its eigenbasis from that many uniform
  points of the pool, or "pool", and its eigenvalues from the subset), ``weight_sharing``
  ("expand", or "reduce": K-FAC-reduce, outer products after summing a layer's positions) and
  ``cache_dir`` (factors stored as safetensors, reused when their metadata match; None, the
  default: fits that took longer than
  :data:`~repif.curvature.kronecker_cache.LONG_FIT_S` are kept in the default cache,
  :func:`~repif.curvature.kronecker_cache.default_cache_dir`, so an error after them loses nothing;
  False: never cached). See docs/design.md, "Kronecker factors".

A kind is a small class with a ``name`` (registering it), its options as keyword arguments
(unknown ones are refused by name) and ``build(request)``: the fitter hands over a
:class:`CurvatureRequest` (the subset, its batch, the budget, the seed), so kinds never reach back
into the fitter (docs/design.md, "Parts").
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from repif.curvature import kfac
from repif.curvature import kronecker_cache as cache
from repif.curvature.operator import CurvatureOperator
from repif.memory import MemoryBudget
from repif.registry import Registry
from repif.validation import check_choice

if TYPE_CHECKING:
    from repif.samplers import Subset
    from repif.task import FunctionalModel


@dataclass(frozen=True)
class CurvatureRequest:
    """What a kind needs to build its curvature on a subset: the subset (m indices and their
    weights, summing to one), its inputs ``x`` and targets ``y`` gathered on ``fm``'s device,
    the model at the parameters to expand around, the memory budget, the fit's seed, whether to
    show progress, the shrinkage fill for exact subset curvatures (0: none), and the sampler
    that drew the subset (its name and scalar options; None for the whole pool), which a cache
    records; ``prior`` marks a Woodbury prior's fit on uniform points of the pool."""

    fm: FunctionalModel
    subset: Subset
    x: Any
    y: Any
    budget: MemoryBudget
    seed: int
    progress: bool | None = False
    shrinkage: float = 0.0
    sampler: str | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    #: A Woodbury prior's fit on points of the pool with equal weights (not the subset).
    prior: bool = False
    #: The points EK-FAC's eigenbasis is fitted on (``basis_size``), or None: the subset.
    basis: BasisPoints | None = None


@dataclass(frozen=True)
class BasisPoints:
    """Points of the pool drawn for an EK-FAC eigenbasis (their indices and equal weights as a
    subset) and their model inputs ``x`` and targets ``y`` on the model's device."""

    subset: Subset
    x: Any
    y: Any


def check_basis_size(value: Any) -> int | str | None:
    """``basis_size``: None (the basis from the subset), a positive int or "pool"."""
    if value is None or value == "pool":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"basis_size must be a positive number of pool points, 'pool' (all "
                         f"of it) or None (the subset's own basis), got {value!r}")
    return int(value)

REGISTRY: Registry[type[CurvatureKind]] = Registry("curvature")


class CurvatureKind(ABC):
    """Builds the curvature of one kind on a subset; subclasses set ``name`` to register."""

    name: ClassVar[str | None] = None
    #: Whether it is a Kronecker-factored curvature (inverted by ``solver="eigen"``).
    kronecker: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY.add(cls.name, cls)

    @abstractmethod
    def build(self, request: CurvatureRequest) -> Any:
        """The curvature on ``request.subset`` at ``request.fm``'s parameters."""


class GGN(CurvatureKind):
    name = "ggn"

    def build(self, request: CurvatureRequest) -> CurvatureOperator:
        r = request
        return CurvatureOperator(r.fm, r.x, r.y, r.subset.weights, kind=str(self.name),
                                 shrinkage=r.shrinkage, budget=r.budget)


class Hessian(GGN):
    name = "hessian"


class KFAC(CurvatureKind):
    """K-FAC fitted on the subset with the sampler's weights (see the module doc)."""

    name = "kfac"
    kronecker = True

    def __init__(self, fisher: str = "exact", other_layers: str = "error",
                 cache_dir: str | bool | None = None, weight_sharing: str = "expand",
                 eigh_dtype: str = "float64", basis_size: int | str | None = None) -> None:
        if not (cache_dir is None or cache_dir is False
                or isinstance(cache_dir, (str, os.PathLike))):
            raise ValueError(f"cache_dir must be a directory, None (keep long fits in the "
                             f"default cache) or False (never cache), got {cache_dir!r}")
        check_choice(fisher, kfac.FISHER_MODES, "fisher")
        check_choice(other_layers, kfac.OTHER_LAYERS, "other_layers")
        check_choice(weight_sharing, kfac.WEIGHT_SHARING, "weight_sharing")
        check_choice(eigh_dtype, tuple(kfac.EIGH_DTYPES), "eigh_dtype")
        self.fisher, self.other_layers, self.cache_dir = fisher, other_layers, cache_dir
        self.weight_sharing, self.eigh_dtype = weight_sharing, eigh_dtype
        self.basis_size = check_basis_size(basis_size)
        if self.basis_size is not None and self.name != "ekfac":
            raise ValueError(f"basis_size={basis_size!r} fits EK-FAC's eigenbasis on more "
                             f"points and its eigenvalues on the subset; {self.name!r} takes "
                             "its eigenvalues from the factors: use curvature='ekfac'")

    def build(self, request: CurvatureRequest) -> kfac.KroneckerCurvature:
        """The factors on the request's subset; a Woodbury prior's fit (``request.prior``) is
        cached by its points alone, whatever the subset's sampler."""
        r = request
        fm, x, y, subset, seed = r.fm, r.x, r.y, r.subset, r.seed
        if (self.basis_size is None) != (r.basis is None):
            raise ValueError(
                "basis_size needs the basis points drawn from the pool (the estimator draws "
                "them)" if r.basis is None else
                "basis points were given but basis_size is not set")
        basis = None if r.basis is None else (r.basis.x, r.basis.y, r.basis.subset.weights)

        def fit() -> kfac.KroneckerCurvature:
            return kfac.fit_kronecker(fm, x, y, subset.weights, kind=str(self.name),
                                      fisher=self.fisher, other_layers=self.other_layers,
                                      budget=r.budget, seed=seed, progress=r.progress,
                                      weight_sharing=self.weight_sharing,
                                      eigh_dtype=self.eigh_dtype, basis=basis)

        if self.cache_dir is False:
            return fit()
        meta = {
            "kind": self.name, "fisher": self.fisher, "other_layers": self.other_layers,
            # recorded only when not the default, so factors cached before the option stay valid
            **({"weight_sharing": self.weight_sharing} if self.weight_sharing != "expand" else {}),
            **({"eigh_dtype": self.eigh_dtype} if self.eigh_dtype != "float64" else {}),
            **({"basis": cache._digest([r.basis.subset.indices, r.basis.subset.weights]),
                "basis_data": cache.data_fingerprint(r.basis.x, r.basis.y)}
               if r.basis is not None else {}),
            "model": cache.model_digest(fm), "data": cache.data_fingerprint(x, y),
            "subset": cache._digest([subset.indices, subset.weights]),
            "sampler": "prior" if r.prior else (
                r.sampler if r.sampler is not None else "whole pool"),
            "sampler_options": {} if r.prior else _plain(r.sampler_options),
            "m": len(subset), "seed": None if r.prior and self.fisher == "exact" else seed,
            "weight_decay": fm.task.weight_decay,
            "dtype": str(fm.dtype), "device": fm.device.type,
        }
        if self.cache_dir is None:  # the default cache: read always, write only long fits
            return cache.load_or_fit(cache.default_cache_dir(), meta, fm, fit, r.budget,
                                     save_after_s=cache.LONG_FIT_S)
        return cache.load_or_fit(self.cache_dir, meta, fm, fit, r.budget)


class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbasis with eigenvalues re-fitted from per-point gradients."""

    name = "ekfac"


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able scalar entries of a sampler's attributes (its options)."""
    return {k: v for k, v in sorted(options.items())
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}


def names() -> list[str]:
    """Registered curvature names."""
    return REGISTRY.names()


def get(name: str) -> type[CurvatureKind]:
    return REGISTRY.get(name)


def accepted_options(name: str) -> list[str]:
    """The keyword options a registered curvature kind takes."""
    return REGISTRY.accepted_options(name)


def build(name: str, options: dict[str, Any] | None = None) -> CurvatureKind:
    """Instantiate a registered kind, rejecting options it does not take by name."""
    return REGISTRY.build(name, options)
