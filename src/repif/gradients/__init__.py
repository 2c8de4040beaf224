"""The gradients wing: per-sample gradients and the streamed passes built on them.

* :mod:`repif.gradients.streaming`: per-sample gradients by ``torch.func.vmap(grad(...))``,
  streamed gradient sums and score contractions, each chunk sized by the memory budget.
* :mod:`repif.gradients.hooks`: the hook engine: one batched backward with closed-form
  per-layer rules (Linear, Conv, Embedding, normalisation), falling back to ``vmap`` per layer.

See docs/design.md, "Parts".
"""

from repif.gradients.streaming import (
    CostModel,
    per_sample_gradients,
    split_batch,
    stream_gradients,
    stream_scores,
    sum_gradient,
)

__all__ = ["CostModel", "per_sample_gradients", "split_batch", "stream_gradients",
           "stream_scores", "sum_gradient"]
