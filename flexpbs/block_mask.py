"""Selected tiles -> FlexAttention ``BlockMask`` over permuted keys.

Tiles whose keys all precede the block's first query (every selected earlier-segment tile) are
FULL blocks: the kernel skips the mask there. The rest (own-segment tiles) are PARTIAL blocks,
where the kernel evaluates the mask_mod: the causal test on ORIGINAL key positions.
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
        tiles: ``[B, Hq, nb, nb]`` bool selected tiles.
        perm: ``[B, Hp, N]`` integer original position at each permuted slot; query head h reads
            permutation row ``h // (Hq / Hp)``.
    """
    group = tiles.shape[1] // perm.shape[1]

    def pbs_mask(b, h, q_idx, kv_idx):
        selected = tiles[b, h, q_idx // block_size, kv_idx // block_size]
        return selected & (perm[b, h // group, kv_idx] <= q_idx)

    return pbs_mask


def _ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[..., nb]`` bool rows -> (counts ``[...]``, indices ``[..., nb]``) int32.

    The first ``count`` indices of a row are its selected blocks in ascending order; the slots after
    them (never read by the kernel) are 0. A cumsum and a scatter: several times cheaper than an argsort.
    """
    n_blocks = dense.shape[-1]
    slot = torch.where(dense, dense.cumsum(dim=-1) - 1, n_blocks)  # unselected -> a spill column
    blocks = torch.arange(n_blocks, dtype=torch.int32, device=dense.device).expand(dense.shape)
    order = torch.zeros(*dense.shape[:-1], n_blocks + 1, dtype=torch.int32, device=dense.device)
    order.scatter_(-1, slot, blocks)
    return dense.sum(dim=-1, dtype=torch.int32), order[..., :n_blocks].contiguous()


def build_block_mask(tiles: torch.Tensor, perm: torch.Tensor, block_size: int) -> BlockMask:
    """BlockMask computing exactly ``tiles`` with the causal test on original positions.

    Args:
        tiles: ``[B, Hq, nb, nb]`` bool (query block, permuted key block).
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, Hq a multiple of Hp.

    Returns:
        A BlockMask for queries of length N in original order and keys in permuted order, with
        head dimension Hq (FlexAttention's GPU and CPU paths agree only for 1 or Hq heads).
    """
    n = perm.shape[-1]
    group = tiles.shape[1] // perm.shape[1]
    n_blocks = tiles.shape[-1]
    _, last_pos = block_position_bounds(perm, block_size)
    first_query = torch.arange(n_blocks, device=perm.device) * block_size
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
        mask_mod=pbs_mask_mod(tiles, perm.to(torch.int32), block_size),
        seq_lengths=(n, n),
        compute_q_blocks=False,
    )
