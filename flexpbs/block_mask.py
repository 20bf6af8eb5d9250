"""Selected tiles -> FlexAttention ``BlockMask`` over permuted keys.

Tiles whose keys all precede the block's first query (every selected earlier-segment tile) are
FULL blocks: the kernel skips the mask there. The rest (own-segment tiles) are PARTIAL blocks,
where the kernel evaluates the mask_mod: the causal test on ORIGINAL key positions.

Chunks (queries at the last key positions): key positions are counted from the position of query
row 0 (``query_start``), so the causal test stays ``position <= q_idx`` for every offset. The mask_mod
captures no offset scalar (a captured Python scalar recompiles per value; see FLEX_NOTES.md).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

from flexpbs.permutation import block_position_bounds


def pbs_mask_mod(tiles: torch.Tensor, perm: torch.Tensor, block_size: int) -> _mask_mod_signature:
    """Token-level mask of PBS attention over permuted keys.

    Uncompiled flex_attention ignores the block lists and evaluates only the mask_mod over every
    (query, key) pair, so the mask_mod states the WHOLE mask: the tile is selected AND the key's
    original position is causal for the query. Compiled kernels call it on partial blocks only.

    Args:
        tiles: ``[B, Hq, nbq, nb]`` bool selected tiles.
        perm: ``[B, Hp, N]`` integer original position at each permuted slot, counted from the
            position of query row 0 (negative for keys before it); query head h reads
            permutation row ``h // (Hq / Hp)``.
    """
    group = tiles.shape[1] // perm.shape[1]

    def pbs_mask(b, h, q_idx, kv_idx):
        selected = tiles[b, h, q_idx // block_size, kv_idx // block_size]
        return selected & (perm[b, h // group, kv_idx] <= q_idx)

    return pbs_mask


# Tiles sorted per step of _ordered_blocks: bounds the int64 argsort temporaries (8 B per tile).
_TILES_PER_STEP = 2**24


def _ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, H, nq, nb]`` bool rows -> (counts ``[B, H, nq]``, indices ``[B, H, nq, nb]``) int32.

    Each row's indices list its selected blocks first, in ascending order (a stable argsort of
    8-bit keys, faster on the GPU than a cumsum and scatter), a few heads at a time.
    """
    counts = dense.sum(dim=-1, dtype=torch.int32)
    order = torch.empty(dense.shape, dtype=torch.int32, device=dense.device)
    tiles_per_head = dense.shape[0] * dense.shape[2] * dense.shape[3]
    step = max(1, _TILES_PER_STEP // tiles_per_head)
    for h0 in range(0, dense.shape[1], step):
        chunk = dense[:, h0 : h0 + step].to(torch.uint8)
        order[:, h0 : h0 + step] = torch.argsort(chunk, dim=-1, descending=True, stable=True)
    return counts, order


def build_block_mask(
    tiles: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    *,
    query_start: int = 0,
    q_len: int | None = None,
) -> BlockMask:
    """BlockMask computing exactly ``tiles`` with the causal test on original positions.

    Args:
        tiles: ``[B, Hq, nbq, nb]`` bool (query block, permuted key block).
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, Hq a multiple of Hp.
        query_start: original key position of query row 0; query row r sits at position
            ``query_start + r`` (0 for prefill; a block boundary for a chunk).
        q_len: query length, ``N - query_start`` when None; ``nbq = ceil(q_len / block_size)``.

    Returns:
        A BlockMask for queries in original order and keys in permuted order, with head
        dimension Hq (FlexAttention's GPU and CPU paths agree only for 1 or Hq heads).
    """
    n = perm.shape[-1]
    q_len = n - query_start if q_len is None else q_len
    group = tiles.shape[1] // perm.shape[1]
    _, last_pos = block_position_bounds(perm, block_size)
    first_query = query_start + torch.arange(tiles.shape[-2], device=perm.device) * block_size
    all_before = last_pos[:, :, None, :] <= first_query[:, None]
    full = tiles & all_before.repeat_interleave(group, dim=1)
    partial = tiles & ~full
    kv_num, kv_idx = _ordered_blocks(partial)
    full_num, full_idx = _ordered_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        # counted from query row 0, the causal test is ``position <= q_idx`` for any query_start
        mask_mod=pbs_mask_mod(tiles, (perm - query_start).to(torch.int32), block_size),
        seq_lengths=(q_len, n),
        compute_q_blocks=False,
    )
