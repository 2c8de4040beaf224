"""Curvature kinds, registered by name: what a fit builds on the curvature subset.

* ``"ggn"`` and ``"hessian"``: the exact subset curvature as a
  :class:`~repif.curvature.CurvatureOperator` (products through the model; any solver but
  ``eigen``).
* ``"kfac"`` and ``"ekfac"``: a :class:`~repif.kfac.KroneckerCurvature` fitted on the subset
  with the sampler's weights, inverted in its eigenbasis by ``solver="eigen"``; the same fit is
  the preconditioner of ``cg`` and ``lissa`` (``preconditioner="ekfac"``). Options:
  ``fisher`` ("exact": the GGN's output Hessian through C backward passes per point; "sampled":
  one backward at a label drawn from the model's predictive), ``other_layers`` ("error",
  "identity", "frozen"), ``weight_sharing`` ("expand", or "reduce": K-FAC-reduce, outer products
  after summing a layer's positions) and ``cache_dir`` (factors stored as safetensors, reused
  when their metadata match). See docs/design.md, "Kronecker factors".

A kind is a small class with a ``name`` (registering it), its options as keyword arguments
(unknown ones are refused by name) and ``build(fitter, subset, fm)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from repif import kfac
from repif.registry import Registry
from repif.validation import check_choice

if TYPE_CHECKING:
    from repif.fitting import CurvatureFitter
    from repif.samplers import Subset
    from repif.task import FunctionalModel

REGISTRY: Registry[type[CurvatureKind]] = Registry("curvature")


class CurvatureKind(ABC):
    """Builds the curvature of one kind on a subset; subclasses set ``name`` to register."""

    name: ClassVar[str | None] = None
    #: Whether the curvature is positive semi-definite (solvers then bound their results).
    psd: ClassVar[bool] = True
    #: Whether it is a Kronecker-factored curvature (inverted by ``solver="eigen"``).
    kronecker: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY.add(cls.name, cls)

    @abstractmethod
    def build(self, fitter: CurvatureFitter, subset: Subset, fm: FunctionalModel) -> Any:
        """The curvature on ``subset`` at ``fm``'s parameters."""


class GGN(CurvatureKind):
    name = "ggn"

    def build(self, fitter: CurvatureFitter, subset: Subset, fm: FunctionalModel) -> Any:
        return fitter.operator(subset, fm)


class Hessian(GGN):
    name = "hessian"
    psd = False


class KFAC(CurvatureKind):
    """K-FAC fitted on the subset with the sampler's weights (see the module doc)."""

    name = "kfac"
    kronecker = True

    def __init__(self, fisher: str = "exact", other_layers: str = "error",
                 cache_dir: str | None = None, weight_sharing: str = "expand") -> None:
        check_choice(fisher, kfac.FISHER_MODES, "fisher")
        check_choice(other_layers, kfac.OTHER_LAYERS, "other_layers")
        check_choice(weight_sharing, kfac.WEIGHT_SHARING, "weight_sharing")
        self.fisher, self.other_layers, self.cache_dir = fisher, other_layers, cache_dir
        self.weight_sharing = weight_sharing

    def build(self, fitter: CurvatureFitter, subset: Subset, fm: FunctionalModel,
              prior: bool = False) -> kfac.KroneckerCurvature:
        """The factors on ``subset``; ``prior``: a Woodbury prior's fit on points of the pool
        with equal weights (cached by those points alone, whatever the subset's sampler)."""
        x, y = fitter.subset_batch(subset, fm)
        seed = fitter.options.seed

        def fit() -> kfac.KroneckerCurvature:
            return kfac.fit_kronecker(fm, x, y, subset.weights, kind=str(self.name),
                                      fisher=self.fisher, other_layers=self.other_layers,
                                      budget=fitter.budget, seed=seed, progress=fitter.progress,
                                      weight_sharing=self.weight_sharing)

        if self.cache_dir is None:
            return fit()
        sampler = fitter.options.sampler
        size = None if prior else fitter.options.sample_size
        meta = {
            "kind": self.name, "fisher": self.fisher, "other_layers": self.other_layers,
            # recorded only when not the default, so factors cached before the option stay valid
            **({"weight_sharing": self.weight_sharing} if self.weight_sharing != "expand" else {}),
            "model": kfac.model_digest(fm), "data": kfac.data_fingerprint(x, y),
            "subset": kfac._digest([subset.indices, subset.weights]),
            "sampler": getattr(sampler, "name", None) if size is not None else (
                "prior" if prior else "whole pool"),
            "sampler_options": _plain(vars(sampler)) if size is not None else {},
            "m": len(subset), "seed": None if prior and self.fisher == "exact" else seed,
            "weight_decay": fm.task.weight_decay,
            "dtype": str(fm.dtype), "device": fm.device.type,
        }
        return kfac.load_or_fit(self.cache_dir, meta, fm, fit, fitter.budget)


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
