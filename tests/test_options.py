"""Every option of every solver and sampler arrives at its component, and none is taken by the
wrong one (an option Python binds to the estimator, such as LiSSA's ``batch_size``, used to
vanish silently)."""

from __future__ import annotations

import pytest
import torch

import repif
from repif import samplers, solvers
from repif.samplers.base import REGISTRY as SAMPLERS

N, SUBSET = 200, 48


def _monitor(step, residual):  # a named callable, so the test can check it arrived
    return None


#: One valid, non-default value per solver option, and the attribute where the solver keeps
#: it (a dotted path: a named preconditioner arrives fitted, as a Kronecker curvature of that
#: kind). A new option without an entry fails ``test_every_solver_option_is_listed``.
SOLVER_VALUES: dict[str, dict[str, tuple[object, str]]] = {
    "arnoldi": {"rank": (5, "rank"), "krylov_dim": (17, "krylov_dim"), "seed": (7, "seed")},
    "cg": {"tol": (1e-6, "tol"), "max_iter": (77, "max_iter"), "block_size": (3, "block_size"),
           "preconditioner": ("kfac", "preconditioner.kind"), "monitor": (_monitor, "monitor")},
    "direct": {"max_params": (123_456, "max_params")},
    "eigen": {},
    "identity": {},
    "lissa": {"depth": (9, "depth"), "repeats": (2, "repeats"), "batch_size": (16, "batch_size"),
              "scale": (500.0, "scale_option"), "tol": (1e-5, "tol"),
              "power_iters": (4, "power_iters"), "seed": (7, "seed"),
              "block_size": (3, "block_size"), "preconditioner": ("kfac", "preconditioner.kind"),
              "monitor": (_monitor, "monitor")},
    "woodbury": {"max_rows": (99_999, "max_rows"), "prior": ("kfac", "prior.kind"),
                 "prior_mode": ("blend", "prior_mode"), "prior_weight": (0.3, "prior_weight"),
                 "prior_size": (50, "prior_size"), "prior_points": ("subset", "prior_points")},
}

#: Options that configure another one and are refused without it (the prior's mode, weight and
#: size need a prior): what each is given with.
COMPANIONS: dict[tuple[str, str], dict[str, object]] = {
    ("woodbury", o): {"prior": "kfac"}
    for o in ("prior_mode", "prior_weight", "prior_size", "prior_points")}

#: One valid, non-default value per sampler option (kept under the option's own name).
SAMPLER_VALUES: dict[str, dict[str, object]] = {
    "random": {}, "stratified": {}, "first": {},
    "feature-kmeans": {"n_clusters": 5, "pick": "nearest"},
    "feature-herding": {"n_features": 7},
    "logit-stratified": {"statistic": "entropy", "n_bins": 3},
    "logit-importance": {"proxy": "gini-feature", "self_normalize": False, "ridge": 0.05},
}
#: Options that configure another one, with the value that one needs.
SAMPLER_COMPANIONS: dict[tuple[str, str], dict[str, object]] = {
    ("logit-importance", "ridge"): {"proxy": "leverage"}}


@pytest.fixture(scope="module")
def problem(digits_mlp):
    model, (x, y), _ = digits_mlp
    return model, (x[:N], y[:N])


def _estimator(problem, solver, **kw):
    model, train = problem
    kronecker = {"curvature": "kfac"} if solver == "eigen" else {}
    return repif.InfluenceEstimator(model, train, solver=solver, damping=0.1,
                                    sample_size=SUBSET, **kronecker, **kw)


def test_every_solver_and_option_is_listed():
    assert set(SOLVER_VALUES) == set(solvers.names())
    for name, values in SOLVER_VALUES.items():
        assert set(values) == set(solvers.accepted_options(name)), name
    assert set(SAMPLER_VALUES) == set(samplers.names())
    for name, values in SAMPLER_VALUES.items():
        assert set(values) == set(SAMPLERS.accepted_options(name)), name


@pytest.mark.parametrize("route", ["dict", "loose"])
@pytest.mark.parametrize("solver,option", [(s, o) for s, opts in SOLVER_VALUES.items()
                                           for o in opts])
def test_each_solver_option_arrives(problem, solver, option, route):
    value, attribute = SOLVER_VALUES[solver][option]
    if route == "loose" and option == "batch_size":
        pytest.skip("a loose batch_size is the estimator's; covered by the ambiguity test")
    given = {option: value, **COMPANIONS.get((solver, option), {})}
    kw = {"solver_options": given} if route == "dict" else given
    est = _estimator(problem, solver, **kw)
    if option == "seed" and route == "loose":  # the estimator's seed, handed to the solver
        assert est.seed == value
    built = est.draw()
    got = built.solver
    for part in attribute.split("."):
        got = getattr(got, part)
    assert got == value


def test_loose_batch_size_with_lissa_is_refused_not_swallowed(problem):
    with pytest.raises(TypeError, match=r"ambiguous.*solver_options=\{'batch_size': 16\}"):
        _estimator(problem, "lissa", batch_size=16)
    # both given: the estimator's caps the chunks, LiSSA's is its mini-batch
    est = _estimator(problem, "lissa", batch_size=8, solver_options={"batch_size": 16},
                     depth=5, tol=0.0)
    assert est.source.batch_size == 8 and est.draw().solver.batch_size == 16
    # a solver without a batch_size of its own: batch_size is the estimator's, as before
    assert _estimator(problem, "cg", batch_size=8).source.batch_size == 8


def test_an_option_given_twice_or_to_the_wrong_solver_names_it(problem):
    with pytest.raises(TypeError, match="both loose and in solver_options"):
        _estimator(problem, "cg", tol=1e-5, solver_options={"tol": 1e-6})
    with pytest.raises(TypeError, match=r"solver 'cg' does not take option\(s\) depth"):
        _estimator(problem, "cg", solver_options={"depth": 5})
    with pytest.raises(TypeError, match="solver_options must be a dict"):
        _estimator(problem, "cg", solver_options=[("tol", 1e-6)])


@pytest.mark.parametrize("sampler,option", [(s, o) for s, opts in SAMPLER_VALUES.items()
                                            for o in opts])
def test_each_sampler_option_arrives(problem, sampler, option):
    value = SAMPLER_VALUES[sampler][option]
    given = {option: value, **SAMPLER_COMPANIONS.get((sampler, option), {})}
    est = _estimator(problem, "cg", sampler=sampler, sampler_options=given)
    assert getattr(est.sampler, option) == value
    assert len(est.draw().subset.indices) == SUBSET  # and the sampler runs with it


def test_a_misspelt_sampler_option_names_the_sampler(problem):
    with pytest.raises(TypeError, match=r"sampler 'logit-importance' does not take .*proxi"):
        _estimator(problem, "cg", sampler="logit-importance", sampler_options={"proxi": "x"})
    for bad in (0, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="n_features"):
            _estimator(problem, "cg", sampler="feature-herding",
                       sampler_options={"n_features": bad})
    with pytest.raises(TypeError, match="self_normalize"):
        _estimator(problem, "cg", sampler="logit-importance",
                   sampler_options={"self_normalize": "no"})


def test_solver_seed_option_overrides_the_estimator_seed(problem):
    est = _estimator(problem, "lissa", seed=3, solver_options={"seed": 11, "batch_size": 8},
                     depth=5, tol=0.0)
    assert est.seed == 3 and est.draw().solver.seed == 11
    torch.manual_seed(0)  # the global RNG plays no part
