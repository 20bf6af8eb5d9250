"""Selected tiles -> FlexAttention ``BlockMask`` over permuted keys.

Tiles whose keys all precede the block's first query (every selected earlier-segment tile) are
FULL blocks: the kernel skips the mask there. The rest (own-segment tiles) are PARTIAL blocks,
where the kernel evaluates the mask_mod: the causal test on ORIGINAL key positions. As keys move
only inside segments, partial tiles lie in the query block's own segment (a few columns per row,
listed from a gather of those columns) and full ones before its end (the lists of a band of query
blocks are sorted over the columns before the end of the band's last segment).

Chunks (queries at the last key positions): key positions are counted from the position of query
row 0 (``query_start``), so the causal test stays ``position <= q_idx`` for every offset. The mask_mod
captures no offset scalar (a captured Python scalar recompiles per value; see FLEX_NOTES.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

from flexpbs.limits import LIMITS
from flexpbs.permutation import block_last_positions
from flexpbs.tile_grid import TileGrid, row_bands, tile_grid


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


def causal_mask_mod(positions: torch.Tensor, group: int) -> _mask_mod_signature:
    """The causal test alone, for COMPILED kernels with :func:`block_lists`: they call a mask_mod
    only on listed partial blocks, which are selected tiles, so the tile lookup of
    :func:`pbs_mask_mod` is always true there. Uncompiled flex_attention needs the whole mask.

    Args:
        positions: ``[B, Hp, L]`` int32 original position at each permuted slot counted from the
            position of query row 0, L >= N (slots past N hold a position after every query).
        group: query heads per permutation row (Hq / Hp).
    """

    def causal_on_original_positions(b, h, q_idx, kv_idx):
        return positions[b, h // group, kv_idx] <= q_idx

    return causal_on_original_positions


def _full_lists(full: torch.Tensor, bands: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, H, nq, nb]`` bool rows -> (counts ``[B, H, nq]``, indices ``[B, H, nq, nb]``) int32.

    Each row's indices list its blocks first, in ascending order (a stable argsort of 8-bit keys,
    faster on the GPU than a cumsum and scatter), a few heads at a time. ``bands`` gives (first
    row, end row, end column): a band's rows hold no block at or past its end column, so only
    columns before it are sorted; entries past a row's count are never read and stay 0.
    """
    order = torch.zeros(full.shape, dtype=torch.int32, device=full.device)
    for r0, r1, c1 in bands:
        step = max(1, LIMITS.sort_tiles // (full.shape[0] * (r1 - r0) * c1))
        for h0 in range(0, full.shape[1], step):
            chunk = full[:, h0 : h0 + step, r0:r1, :c1].view(torch.uint8)  # a bool is one byte: no copy
            order[:, h0 : h0 + step, r0:r1, :c1] = torch.argsort(chunk, dim=-1, descending=True, stable=True)
    return full.sum(dim=-1, dtype=torch.int32), order


def _partial_lists(partial: torch.Tensor, grid: TileGrid, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial tiles, all in the query block's own segment -> (counts, indices) as :func:`_full_lists`.

    Args:
        partial: ``[B, H, nq, S]`` bool over ``grid.own_columns`` (False where not ``own_valid``).

    Returns:
        Indices ``[B, H, nq, n_blocks]``: a row's partial blocks first, ascending, then the rest of
        its own segment's blocks (never read), then 0.
    """
    order = torch.argsort(partial.view(torch.uint8), dim=-1, descending=True, stable=True)
    indices = torch.zeros(*partial.shape[:-1], n_blocks, dtype=torch.int32, device=partial.device)
    own = grid.own_columns.expand(partial.shape)
    indices[..., : partial.shape[-1]] = own.gather(-1, order)
    return partial.sum(dim=-1, dtype=torch.int32), indices


class BlockLists(NamedTuple):
    """FlexAttention's block lists of a selection (the tensors a ``BlockMask`` holds), all int32.

    ``partial_count [B, Hq, nbq]`` and ``partial_index [B, Hq, nbq, nb]``: the blocks the kernel
    masks; ``full_count`` and ``full_index``: the blocks it computes unmasked.
    """

    partial_count: torch.Tensor
    partial_index: torch.Tensor
    full_count: torch.Tensor
    full_index: torch.Tensor


def block_lists(
    tiles: torch.Tensor, perm: torch.Tensor, block_size: int, segment_size: int, *, query_start: int = 0
) -> BlockLists:
    """The block lists computing exactly ``tiles``, with the causal test on original positions.

    Args:
        tiles: ``[B, Hq, nbq, nb]`` bool (query block, permuted key block). Tiles in segments after
            the query block's own hold no key it may see: the block lists may omit them.
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, permuting only inside
            segments of ``segment_size``; Hq a multiple of Hp.
        query_start: original key position of query row 0, a multiple of ``block_size``; query row
            r sits at position ``query_start + r`` (0 for prefill; a block boundary for a chunk).
    """
    n = perm.shape[-1]
    batch, q_heads, q_blocks, n_blocks = tiles.shape
    first_block, blocks_per_segment = query_start // block_size, segment_size // block_size
    last_pos = block_last_positions(perm, block_size)
    grid = tile_grid(q_blocks, n_blocks, first_block, n, block_size, segment_size, perm.device)
    # Full: every key of the tile precedes the block's first query (every earlier-segment tile and
    # some own-segment ones). Partial: the other own-segment tiles; tiles of later segments hold no
    # visible key and are left out of both lists.
    by_perm_row = tiles.view(batch, perm.shape[1], q_heads // perm.shape[1], q_blocks, n_blocks)
    all_before = last_pos[:, :, None, None, :] <= grid.query_start
    full = (by_perm_row & all_before).view(tiles.shape)
    own_tiles = by_perm_row.gather(-1, grid.own_columns.expand(*by_perm_row.shape[:-1], -1))
    own_later = (last_pos[:, :, grid.own_columns] > grid.query_start)[:, :, None]
    partial = (own_tiles & own_later & grid.own_valid).view(batch, q_heads, q_blocks, -1)
    partial_count, partial_index = _partial_lists(partial, grid, n_blocks)
    bands = row_bands(q_blocks, n_blocks, first_block, blocks_per_segment, own_segment=True)
    full_count, full_index = _full_lists(full, bands)
    return BlockLists(partial_count, partial_index, full_count, full_index)


def build_block_mask(
    tiles: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    segment_size: int,
    *,
    query_start: int = 0,
    q_len: int | None = None,
) -> BlockMask:
    """BlockMask computing exactly ``tiles`` with the causal test on original positions, whose
    mask_mod states the whole mask (:func:`pbs_mask_mod`): uncompiled flex_attention gives the same.

    Args:
        tiles, perm, query_start: as :func:`block_lists`.
        q_len: query length, ``N - query_start`` when None; ``nbq = ceil(q_len / block_size)``.

    Returns:
        A BlockMask for queries in original order and keys in permuted order, with head
        dimension Hq (FlexAttention's GPU and CPU paths agree only for 1 or Hq heads).
    """
    n = perm.shape[-1]
    q_len = n - query_start if q_len is None else q_len
    lists = block_lists(tiles, perm, block_size, segment_size, query_start=query_start)
    # counted from query row 0, the causal test is ``position <= q_idx`` for any query_start
    positions = (perm - query_start if query_start else perm).to(torch.int32)
    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=block_size,
        mask_mod=pbs_mask_mod(tiles, positions, block_size),
        seq_lengths=(q_len, n),
        compute_q_blocks=False,
    )
