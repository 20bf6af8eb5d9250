"""Dense causal attention: the path for inputs too short for PBS to pay off.

On CUDA it asks SDPA for cuDNN's kernel first: SDPA's own default order starts with FlashAttention-2,
which ran 1.7x slower than cuDNN on Hopper (bench/RESULTS.md). Other backends remain as fallbacks
for inputs cuDNN does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def dense_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA with the causal mask aligned bottom-right (query i at key position N - Nq + i).

    Args:
        query: ``[B, Hq, Nq, D]``; key: ``[B, Hkv, N, D]``; value: ``[B, Hkv, N, Dv]``; Nq <= N.

    Returns:
        ``[B, Hq, Nq, Dv]``. With Nq < N the mask is materialised (``Nq x N`` bool).
    """
    n_queries, n_keys = query.shape[2], key.shape[2]
    if n_queries == n_keys:
        kwargs = dict(is_causal=True)
    else:  # SDPA's is_causal is aligned top-left when Nq != N: state the mask instead
        mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device)
        kwargs = dict(attn_mask=mask.tril(diagonal=n_keys - n_queries))
    if query.device.type != "cuda":
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True, **kwargs)
    with sdpa_kernel(_CUDA_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True, **kwargs)
