"""The attention stage: compiled FlexAttention over permuted keys, computing only selected tiles.

flex_attention is compiled once, with static shapes: on CPU, torch 2.13's inductor template fails
to compile any mask_mod that indexes a table by a block of a dynamic length. Lengths are padded
to buckets (8 per doubling) so a new prompt length recompiles only when it enters a new bucket.
Padded query blocks get no tiles and padded keys sit after every query, so padding adds no work
beyond copying the inputs when N is not already a bucket length.
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flexpbs.block_mask import build_block_mask

_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

# Every bucket, dtype, head shape and block size is one compiled graph; the default limit of 8
# would silently drop to eager flex_attention, which materialises all N x N scores.
_RECOMPILE_LIMIT = 512


def bucket_length(seq_len: int, block_size: int) -> int:
    """Smallest bucket length >= ``seq_len``: a multiple of ``block_size`` and of 1/16 of the
    enclosing power of two, so at most 8 buckets per doubling and at most 12.5% padding."""
    step = max(1, 1 << max((seq_len - 1).bit_length() - 4, 0))
    padded = -(-seq_len // step) * step
    return -(-padded // block_size) * block_size


def sparse_attention(
    query: torch.Tensor,
    key_p: torch.Tensor,
    value_p: torch.Tensor,
    tiles: torch.Tensor,
    perm: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attention of original-order queries over permuted keys, on the selected tiles only.

    Args:
        query: ``[B, Hq, N, D]``.
        key_p: ``[B, Hp, N, D]`` and value_p ``[B, Hp, N, Dv]`` in permuted order, Hq a multiple of Hp.
        tiles: ``[B, Hq, nb, nb]`` bool (query block, permuted key block) to compute.
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot.
        kernel_options: FlexAttention kernel options (tile sizes, warps, stages); each distinct
            value compiles its own kernel.

    Returns:
        ``[B, Hq, N, Dv]`` in ``query.dtype``.
    """
    n = query.shape[2]
    pad = bucket_length(n, block_size) - n
    if pad:
        query, key_p, value_p = (F.pad(x, (0, 0, 0, pad)) for x in (query, key_p, value_p))
        extra = torch.arange(n, n + pad, device=perm.device).expand(*perm.shape[:2], pad)
        perm = torch.cat([perm, extra], dim=-1)  # padded keys come after every real query
        block_pad = (n + pad) // block_size - tiles.shape[-1]
        tiles = F.pad(tiles, (0, block_pad, 0, block_pad), value=False)
    block_mask = build_block_mask(tiles, perm, block_size)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = _compiled_flex_attention(
            query,
            key_p,
            value_p,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=key_p.shape[1] != query.shape[1],
            kernel_options=kernel_options,
        )
    return out[:, :, :n] if pad else out
