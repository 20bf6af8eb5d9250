"""Exact selection for the last query block, from the importance pass (beyond the paper).

The importance pass already computes, for the last ``block_size`` queries, their exact mean
attention to every key of the complete segments. Summed over the keys of each (permuted) key
block, that is the exact attention mass of those queries per block, so the last query block,
which decides the next token, need not trust the mean-pooled estimate: it also keeps the smallest
set of earlier-segment key blocks, in descending exact mass, whose share of the candidates' mass
reaches the threshold. These tiles are added to the pooled selection (never removed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexpbs.lengths import SequenceLengths
from flexpbs.selection import candidate_tiles, threshold_tiles
from flexpbs.tile_grid import cdiv


def last_block_tiles(
    importance: torch.Tensor,
    perm: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    threshold: float,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Key blocks the last query block keeps by exact last-block attention mass.

    Args:
        importance: ``[B, Hp, Nc]`` float32 from the importance pass, one row per permutation
            row, Nc = floor(N / segment_size) * segment_size.
        perm: ``[B, Hp, N]`` int64, original position at each permuted slot.
        threshold: in (0, 1].
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`): each sequence's
            own last query block (:meth:`~flexpbs.lengths.SequenceLengths.last_query_block`).

    Returns:
        ``[B, Hp, nb]`` bool over permuted key blocks: the row of the last query block (the block of
        the last query). Only blocks of segments before that block's segment are candidates;
        none when it lies in the first segment.
    """
    batch, heads, n_complete = importance.shape
    n = perm.shape[-1]
    n_blocks = cdiv(n, block_size)
    if lengths is None:  # the row of the last query block (key block nb - 1)
        candidates = candidate_tiles(n_blocks, block_size, segment_size, perm.device, n_blocks - 1)[0][None]
    else:
        per_segment = segment_size // block_size
        last = lengths.last_query_block(block_size)[:, None]
        blocks = torch.arange(n_blocks, device=perm.device)
        candidates = blocks // per_segment < last // per_segment  # [B, nb]
    # all candidates lie in complete segments
    at_slot = importance.double().gather(-1, perm[..., :n_complete])
    mass = (
        F.pad(at_slot, (0, n_blocks * block_size - n_complete))
        .view(batch, heads, n_blocks, block_size)
        .sum(-1)
    )
    mass = mass.masked_fill(~candidates[:, None], 0.0)
    probs = (mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).float()
    return threshold_tiles(probs[:, :, None], candidates[:, None, None], threshold)[:, :, 0]
