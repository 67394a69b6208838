"""Multi-stream input embedding: a row of K ids is the sum of K rows of ONE table.

The table is megatron's ``VocabParallelEmbedding`` (rows split over TP); the lookup is
done here rather than through its forward so that the K streams are summed *before* the
tensor-parallel reduction (one all-reduce of [B, S, H] instead of K).

``<|pad|>`` (row 0) embeds to zero, by masking: ids equal to 0 get weight 0 in the sum,
so row 0 never receives a gradient. The row is also initialised to zero, so an exported
table shows the zero row the SPEC describes, and it stays zero under AdamW (a zero row
with a zero gradient is never updated, weight decay of zero is zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.tensor_parallel import VocabParallelEmbedding, reduce_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from megatron_ualm.formats.vocab import PAD, UnifiedVocab
from megatron_ualm.model.weights import weight_of


class MultiStreamEmbedding(MegatronModule):
    """tokens int [B, S, K] -> embeddings [S, B, H] (full sequence, reduced over TP).

    config: megatron TransformerConfig; vocab: the padded UnifiedVocab.
    """

    def __init__(self, config, vocab: UnifiedVocab, tp_group=None):
        super().__init__(config=config)
        self.vocab = vocab
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        init = config.embedding_init_method or config.init_method
        self.word_embeddings = VocabParallelEmbedding(
            num_embeddings=vocab.padded_size, embedding_dim=config.hidden_size, init_method=init,
            config=config, reduce_scatter_embeddings=False, tp_group=self.tp_group)
        emb = self.word_embeddings
        if emb.vocab_start_index <= PAD < emb.vocab_end_index:
            with torch.no_grad():
                emb.weight[PAD - emb.vocab_start_index].zero_()

    @property
    def weight(self) -> Tensor:
        return self.word_embeddings.weight

    def forward(self, tokens: Tensor) -> Tensor:
        B, S, K = tokens.shape
        emb = self.word_embeddings
        ids = tokens.reshape(B * S, K)
        use = (ids >= emb.vocab_start_index) & (ids < emb.vocab_end_index) & (ids != PAD)
        local = torch.where(use, ids - emb.vocab_start_index, torch.zeros_like(ids))
        # [B*S, H] = sum_k use_k * W[local_k]  (embedding_bag: no [B, S, K, H] intermediate)
        weight = weight_of(emb)
        out = F.embedding_bag(local, weight, mode="sum", per_sample_weights=use.to(weight.dtype))
        out = out.view(B, S, -1).transpose(0, 1).contiguous()
        if self.tp_group.size() > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out
