"""Selected tiles -> FlexAttention ``BlockMask`` over permuted keys.

Tiles whose keys all precede the block's first query (every selected earlier-segment tile) are
FULL blocks: the kernel skips the mask there. The rest (own-segment tiles) are PARTIAL blocks,
where the kernel evaluates the mask_mod: the causal test on ORIGINAL key positions. As keys move
only inside segments, partial tiles lie in the query block's own segment and full ones before its
end: the lists of a band of query blocks are sorted over that band's window of columns only.

Chunks (queries at the last key positions): key positions are counted from the position of query
row 0 (``query_start``), so the causal test stays ``position <= q_idx`` for every offset. The mask_mod
captures no offset scalar (a captured Python scalar recompiles per value; see FLEX_NOTES.md).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

from flexpbs.permutation import block_last_positions
from flexpbs.selection import row_bands
from flexpbs.tile_grid import tile_grid


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


def _ordered_blocks(
    dense: torch.Tensor, bands: list[tuple[int, int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, H, nq, nb]`` bool rows -> (counts ``[B, H, nq]``, indices ``[B, H, nq, nb]``) int32.

    Each row's indices list its selected blocks first, in ascending order (a stable argsort of
    8-bit keys, faster on the GPU than a cumsum and scatter), a few heads at a time. ``bands``
    gives (first row, end row, first column, end column): only a band's column window is counted
    and sorted; entries past a row's count are never read and stay 0.
    """
    counts = torch.zeros(dense.shape[:-1], dtype=torch.int32, device=dense.device)
    order = torch.zeros(dense.shape, dtype=torch.int32, device=dense.device)
    for r0, r1, c0, c1 in bands:
        step = max(1, _TILES_PER_STEP // (dense.shape[0] * (r1 - r0) * (c1 - c0)))
        for h0 in range(0, dense.shape[1], step):
            chunk = dense[:, h0 : h0 + step, r0:r1, c0:c1]
            counts[:, h0 : h0 + step, r0:r1] = chunk.sum(dim=-1, dtype=torch.int32)
            listed = order[:, h0 : h0 + step, r0:r1, : c1 - c0]
            listed.copy_(torch.argsort(chunk.to(torch.uint8), dim=-1, descending=True, stable=True))
            if c0:
                listed += c0
    return counts, order


def _bands(
    q_blocks: int, n_blocks: int, first_block: int, blocks_per_segment: int, own_segment_only: bool
) -> list[tuple[int, int, int, int]]:
    """Column windows of the :func:`row_bands` of the query blocks (query block r lies in key block
    ``first_block + r``): up to the end of the segment of a band's last row, and, for partial tiles
    (``own_segment_only``), from the start of the segment of its first row."""
    bands = []
    for r0, r1 in row_bands(0, q_blocks):
        end = ((first_block + r1 - 1) // blocks_per_segment + 1) * blocks_per_segment
        start = (first_block + r0) // blocks_per_segment * blocks_per_segment if own_segment_only else 0
        bands.append((r0, r1, start, min(end, n_blocks)))
    return bands


def build_block_mask(
    tiles: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    segment_size: int,
    *,
    query_start: int = 0,
    q_len: int | None = None,
) -> BlockMask:
    """BlockMask computing exactly ``tiles`` with the causal test on original positions.

    Args:
        tiles: ``[B, Hq, nbq, nb]`` bool (query block, permuted key block). Tiles in segments after
            the query block's own hold no key it may see: the block lists may omit them.
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, permuting only inside
            segments of ``segment_size``; Hq a multiple of Hp.
        query_start: original key position of query row 0, a multiple of ``block_size``; query row
            r sits at position ``query_start + r`` (0 for prefill; a block boundary for a chunk).
        q_len: query length, ``N - query_start`` when None; ``nbq = ceil(q_len / block_size)``.

    Returns:
        A BlockMask for queries in original order and keys in permuted order, with head
        dimension Hq (FlexAttention's GPU and CPU paths agree only for 1 or Hq heads).
    """
    n = perm.shape[-1]
    q_len = n - query_start if q_len is None else q_len
    batch, q_heads, q_blocks, n_blocks = tiles.shape
    first_block, blocks_per_segment = query_start // block_size, segment_size // block_size
    last_pos = block_last_positions(perm, block_size)
    grid = tile_grid(q_blocks, n_blocks, first_block, n, block_size, segment_size, perm.device)
    all_before = last_pos[:, :, None, :] <= grid.query_start
    by_perm_row = tiles.view(batch, perm.shape[1], -1, q_blocks, n_blocks)
    full = (by_perm_row & all_before[:, :, None]).view(tiles.shape)
    bands = (q_blocks, n_blocks, first_block, blocks_per_segment)
    kv_num, kv_idx = _ordered_blocks(tiles & ~full, _bands(*bands, own_segment_only=True))
    full_num, full_idx = _ordered_blocks(full, _bands(*bands, own_segment_only=False))
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        # counted from query row 0, the causal test is ``position <= q_idx`` for any query_start
        mask_mod=pbs_mask_mod(tiles, (perm - query_start if query_start else perm).to(torch.int32), block_size),
        seq_lengths=(q_len, n),
        compute_q_blocks=False,
    )
