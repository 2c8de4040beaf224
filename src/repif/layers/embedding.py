"""The rule for ``nn.Embedding``: ∇E_i = Σ_t e_{id_it} g_itᵀ, a scatter-add of each token's
output gradient into its row (a point's gradient is as sparse as its tokens, but stored dense)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repif.layers.base import LayerBlock, LayerRule


class EmbeddingRule(LayerRule):
    name = "embedding"
    types = (nn.Embedding,)

    def parameters(self, m: nn.Module) -> tuple[str, ...]:
        return ("weight",)

    def per_sample(self, block: LayerBlock, a: Tensor, g: Tensor, state=None
                   ) -> dict[str, Tensor]:
        m, b = block.module, a.shape[0]
        ids = a.reshape(b, -1)
        g3 = g.reshape(b, ids.shape[1], -1)
        w = torch.zeros(b, m.num_embeddings, g3.shape[-1], dtype=g.dtype, device=g.device)
        w.scatter_add_(1, ids.unsqueeze(-1).expand_as(g3), g3)
        return {"weight": w}
