"""kronfluence: the EK-FAC, K-FAC, diagonal and identity (gradient dot product) strategies.

Convention mapping: kronfluence tracks every nn.Linear and nn.Conv2d (weight and bias), which
covers all parameters of both benchmark models. `compute_train_loss` returns the *summed*
cross-entropy of a batch, so the per-example gradients seen by kronfluence's hooks are ∇l(z_i).
Every factor (activation and output-gradient covariances, the EK-FAC/diagonal Lambda of squared
per-sample gradients) is a sum over examples divided by the count processed, so it is the
curvature of the *mean* training loss, as in repif (a mean-reduced batch loss would instead
shrink the gradient factors by 1/batch²). The factors are fitted with `sample=True`
(`use_empirical_fisher=False`, the default): labels are drawn from the model's softmax, so the
curvature estimates the true Fisher, which for softmax cross-entropy equals repif's GGN. The
draws use torch's global generator, which common.main seeds. `damping_factor` is an absolute
value added to the (K-FAC products of) eigenvalues, the EK-FAC Lambda or the diagonal before
inverting (only None selects the 0.1·mean-eigenvalue heuristic), so it is set to λ + wd; the
identity strategy takes no damping. Scores are an (n_query, n_train) matrix of
∇f(z_test)ᵀ P⁻¹ ∇l(z_train) with f the summed test cross-entropy (positive = helpful): repif's
score is its negative. Plain K-FAC averages both conv factors over examples × spatial positions,
so its conv blocks come out orders of magnitude below the true curvature and the damping
dominates them; EK-FAC re-fits the eigenvalues from per-example gradients and is unaffected.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from common import main
from torch.utils.data import TensorDataset


def strategy(name: str, batch_size: int = 256):
    def method(model, train, test, meta):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs

        class Classification(Task):
            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                if sample:  # true Fisher: labels drawn from the model's predictive distribution
                    with torch.no_grad():
                        y = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        task = Classification()
        model = prepare_model(model, task)
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer("peer", model, task, cpu=True, disable_tqdm=True, output_dir=out)
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
            analyzer.fit_all_factors(
                "factors", TensorDataset(*train), per_device_batch_size=batch_size,
                factor_args=FactorArguments(strategy=name, use_empirical_fisher=False),
            )
            analyzer.compute_pairwise_scores(
                "scores", "factors", query_dataset=TensorDataset(*test),
                train_dataset=TensorDataset(*train),
                per_device_query_batch_size=len(test[1]),
                per_device_train_batch_size=batch_size,
                score_args=ScoreArguments(damping_factor=meta["damping"] + meta["weight_decay"]),
            )
            scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        return -scores
    return method


METHODS = {
    "ekfac": strategy("ekfac"),
    "kfac": strategy("kfac"),
    "diagonal": strategy("diagonal"),
    "identity": strategy("identity"),
}

if __name__ == "__main__":
    main(METHODS, "kronfluence")
