"""Ground truth by retraining: linear datamodeling score (LDS) and leave-one-out (LOO).

``evaluate`` (or ``repif evaluate`` on the command line) trains the ground-truth models — for LDS
S random subsets holding a fraction α of the training set, K seeds each; for LOO one model per
left-out training point — caches them, then scores every attribution method against them:
repif's solvers × curvatures × samplers × sample sizes × seeds, and the gradient dot product
(``grad-dot``: no curvature; TracIn at the final checkpoint). See docs/design.md, "Protocol".

>>> results = evaluate(out="runs/lds", dataset="digits", model="mlp",
...                    methods=["ggn:direct", "ggn:woodbury@logit-importance", "grad-dot"],
...                    sizes=[64, 256], seeds=3)          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from repif.studies.evaluation.cells import MarginTask
from repif.studies.evaluation.config import EvaluationConfig, EvaluationError
from repif.studies.evaluation.ground_truth import (
    MIN_SUBSETS,
    ModelStore,
    Recipe,
    lds_subsets,
    margin,
)
from repif.studies.evaluation.methods import BASELINES, Method, parse_method
from repif.studies.evaluation.report import format_table, table, write_report
from repif.studies.evaluation.rows import EvaluationRow
from repif.studies.evaluation.runner import Evaluation
from repif.studies.evaluation.scores import (
    LOO_CONVENTIONS,
    lds,
    loo_predicted,
    loo_scores,
    orient,
    spearman_rows,
)

__all__ = [
    "BASELINES",
    "LOO_CONVENTIONS",
    "MIN_SUBSETS",
    "Evaluation",
    "EvaluationConfig",
    "EvaluationError",
    "EvaluationRow",
    "MarginTask",
    "Method",
    "ModelStore",
    "Recipe",
    "evaluate",
    "format_table",
    "lds",
    "lds_subsets",
    "loo_predicted",
    "loo_scores",
    "margin",
    "orient",
    "parse_method",
    "spearman_rows",
    "table",
    "write_report",
]


def evaluate(out: str | Path, *, train: tuple[Tensor, Tensor] | None = None,
             test: tuple[Tensor, Tensor] | None = None, recipe: Recipe | None = None,
             progress: bool = True, report: bool = True, **config: Any) -> dict[str, Any]:
    """Run (or resume) an evaluation into ``out`` and return its results (this grid's cells).

    ``config`` holds :class:`EvaluationConfig` fields (``metric``, ``target``, ``subsets``,
    ``fraction``, ``gt_seeds``, ``methods``, ``sizes``, ``seeds``, ``dampings``, …). Without
    ``train``/``test`` the data come from ``repif.datasets.load(config["dataset"], …)``; without
    ``recipe`` the models from ``Recipe.builtin`` with the config's training fields. With
    ``report`` the table's plots and ``report.html`` are written beside ``results.json``.
    """
    if (train is None) != (test is None):
        raise ValueError("pass both train and test (as (x, y) tensors), or neither")
    cfg = EvaluationConfig(**config)
    data = (train, test) if train is not None else None
    run = Evaluation(cfg, out, data=data, recipe=recipe, progress=progress)
    with run.locked():
        results = run.run()
        if report:
            write_report(results, Path(out))
    return results
