"""Index vectors of the (query block, key block) grid that depend only on shapes, cached per shape.

Each is a few kernel launches, and below ~32K tokens a call is bound by the host time of its
launches, so they are built once per shape (a few vectors of nb int64 each, and the own segment's
nbq x blocks-per-segment columns) and reused. Query block
i lies in key block ``first_query_block + i`` (see :mod:`flexpbs.selection`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from flexpbs.limits import LIMITS


class TileGrid(NamedTuple):
    """Read-only; shapes for ``nbq`` query blocks and ``nb`` key blocks."""

    key_segment: torch.Tensor  # [nb] int64: segment of each key block
    query_segment: torch.Tensor  # [nbq, 1] int64: segment of each query block
    query_start: torch.Tensor  # [nbq, 1] int64: first position of each query block's key block
    query_end: torch.Tensor  # [nbq, 1] int64: its last position, at most N - 1
    columns: torch.Tensor  # [nb] int64: 0..nb-1
    # [nbq, S] int64: the key blocks of each query block's segment (< nb), S = min(blocks per segment, nb)
    own_columns: torch.Tensor
    own_valid: torch.Tensor  # [nbq, S] bool: False past the end of a short last segment


def tile_grid(
    q_blocks: int,
    n_blocks: int,
    first_query_block: int,
    n_keys: int,
    block_size: int,
    segment_size: int,
    device: torch.device,
) -> TileGrid:
    """The :class:`TileGrid` of ``q_blocks`` query blocks over ``n_blocks`` key blocks of ``n_keys`` keys.

    Cached, except while a CUDA graph is being captured (a tensor made there gets its values only
    when the graph is replayed) or while torch.compile traces.
    """
    args = (q_blocks, n_blocks, first_query_block, n_keys, block_size, segment_size, torch.device(device))
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if capturing or torch.compiler.is_compiling():
        return build_tile_grid(*args)
    return cached_tile_grid(*args)


def build_tile_grid(
    q_blocks: int,
    n_blocks: int,
    first_query_block: int,
    n_keys: int,
    block_size: int,
    segment_size: int,
    device: torch.device,
) -> TileGrid:
    """The :class:`TileGrid`, built anew (:func:`tile_grid` caches it)."""
    per_segment = segment_size // block_size
    columns = torch.arange(n_blocks, device=device)
    rows = torch.arange(first_query_block, first_query_block + q_blocks, device=device)[:, None]
    start = rows * block_size
    own = rows // per_segment * per_segment + torch.arange(min(per_segment, n_blocks), device=device)
    return TileGrid(
        key_segment=columns // per_segment,
        query_segment=rows // per_segment,
        query_start=start,
        query_end=(start + block_size).clamp_max(n_keys) - 1,
        columns=columns,
        own_columns=own.clamp_max(n_blocks - 1),
        own_valid=own < n_blocks,
    )


# A handful of recent shapes; each entry holds a few vectors of at most nb x (blocks per segment) int64.
# ``cached_tile_grid.cache_info()`` / ``.cache_clear()`` inspect and empty it.
cached_tile_grid = functools.lru_cache(maxsize=32)(build_tile_grid)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def row_bands(
    q_blocks: int, n_blocks: int, first_query_block: int, blocks_per_segment: int, *, own_segment: bool
) -> list[tuple[int, int, int]]:
    """Query blocks split into up to ``LIMITS.max_bands`` bands of at least 128 rows, with the
    columns each band needs: causal rows grow with their index, so a band's work can stop at the
    columns of its last row (about 56% of the work of whole rows with 8 bands, for a few more launches).

    Query block r lies in key block ``first_query_block + r``. ``own_segment=False``: the candidate
    columns (blocks of earlier segments), and only rows that have any; ``True``: every row, through the
    end of its own segment.

    Returns:
        ``(first row, end row, end column)`` per band.
    """
    first_row = 0 if own_segment else max(0, blocks_per_segment - first_query_block)
    rows = q_blocks - first_row
    if rows <= 0:
        return []
    step = cdiv(rows, max(1, min(LIMITS.max_bands, rows // 128)))
    bands = []
    for r0 in range(first_row, q_blocks, step):
        r1 = min(r0 + step, q_blocks)
        last_segment = (first_query_block + r1 - 1) // blocks_per_segment
        end = (last_segment + 1 if own_segment else last_segment) * blocks_per_segment
        bands.append((r0, r1, min(end, n_blocks)))
    return bands


def density(tiles: torch.Tensor) -> torch.Tensor:
    """``[..., nbq, nb]`` bool tiles -> ``[...]`` float32: computed tiles over the causal tiles of the
    rectangle; query block i (aligned to key block nb - nbq + i) has nb - nbq + i + 1 causal key blocks."""
    q_blocks, n_blocks = tiles.shape[-2:]
    causal = q_blocks * (n_blocks - q_blocks) + q_blocks * (q_blocks + 1) / 2
    return tiles.sum(dim=(-2, -1), dtype=torch.float32) / causal
