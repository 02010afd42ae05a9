"""Embeddings for training with 8-bit optimizers, as bitsandbytes' ``bnb.nn.StableEmbedding``
and ``bnb.nn.Embedding``: an ``nn.Embedding`` whose weight keeps 32-bit optimizer state
(registered with ``GlobalOptimManager``: rare tokens' rows get small, noisy updates that
8-bit state quantizes badly) and is initialized with Xavier-uniform; StableEmbedding adds a
LayerNorm, computed in the default float dtype. Input: int64 token ids of any shape;
output: (*ids.shape, embedding_dim) in the weight's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from .optim import GlobalOptimManager

__all__ = ["Embedding", "StableEmbedding"]


class Embedding(nn.Embedding):
    """``Embedding(num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
    norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None, device=None,
    dtype=None)``: nn.Embedding with Xavier-uniform initialization (the padding row zero) and
    32-bit optimizer state for its weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, max_norm=None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, device=device, dtype=dtype)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()


class StableEmbedding(Embedding):
    """``Embedding`` followed by a LayerNorm over the embedding dimension (``self.norm``, in
    the default float dtype, the result cast back to the weight's dtype): the stable
    embedding of the 8-bit optimizers paper."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, max_norm=None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = super().forward(ids).to(torch.get_default_dtype())
        return self.norm(emb).to(self.weight.dtype)
