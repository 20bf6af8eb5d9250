"""Sequences of different lengths in one batch: the frame layout the pipeline runs them in.

A batch of B sequences is laid out as a frame of L positions per sequence (:mod:`flexpbs.varlen`
builds it from packed tensors, :mod:`flexpbs.padding` from padded ones). Sequence b's N_b keys sit at
frame positions ``0..N_b-1`` and its Nq_b queries at ``N_b-Nq_b..N_b-1`` (bottom-right, as for one
sequence alone); every other row of the frame is zero. Positions count from each sequence's own start,
so segments, blocks and the sink lie where they lie for the sequence alone, and each stage computes for
sequence b what a call on it alone computes, with the lengths below masking what lies outside it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flexpbs.tile_grid import cdiv


class SequenceLengths(NamedTuple):
    """Per-sequence lengths of a frame (all ``[B]`` tensors on the frame's device).

    Attributes:
        n_keys: int64, N_b: the sequence's keys at frame positions ``0..N_b-1``.
        n_queries: int64, Nq_b <= N_b: its queries at ``N_b-Nq_b..N_b-1``.
        dense: bool: the sequence runs dense causal attention (too short for PBS): all causal tiles,
            keys in their original order.
    """

    n_keys: torch.Tensor
    n_queries: torch.Tensor
    dense: torch.Tensor

    def complete_keys(self, segment_size: int) -> torch.Tensor:
        """``[B]`` int64: keys of the complete segments, the importance pass's columns (none when dense)."""
        return torch.where(self.dense, 0, self.n_keys // segment_size * segment_size)

    def query_rows(self, frame: int) -> torch.Tensor:
        """``[B, L]`` bool: the frame rows holding a query."""
        rows = torch.arange(frame, device=self.n_keys.device)
        first = (self.n_keys - self.n_queries)[:, None]
        return (rows >= first) & (rows < self.n_keys[:, None])

    def rows_per_block(self, frame: int, block_size: int, *, queries: bool) -> torch.Tensor:
        """``[B, L / block_size, 1]`` float32: real rows (queries, or else keys) in each frame block."""
        start = torch.arange(0, frame, block_size, device=self.n_keys.device)[None]
        end = self.n_keys[:, None]
        begin = (self.n_keys - self.n_queries)[:, None] if queries else torch.zeros_like(end)
        count = (torch.minimum(start + block_size, end) - torch.maximum(start, begin)).clamp_min(0)
        return count.to(torch.float32)[..., None]

    def query_blocks(self, n_blocks: int, block_size: int) -> torch.Tensor:
        """``[B, nb]`` bool: blocks of the frame holding a query of the sequence (its query blocks)."""
        blocks = torch.arange(n_blocks, device=self.n_keys.device)
        first = ((self.n_keys - self.n_queries) // block_size)[:, None]
        has_queries = (self.n_queries > 0)[:, None]
        return (blocks >= first) & (blocks < cdiv_tensor(self.n_keys, block_size)[:, None]) & has_queries

    def last_query_block(self, block_size: int) -> torch.Tensor:
        """``[B]`` int64: the block of each sequence's last query (its last key block)."""
        return (cdiv_tensor(self.n_keys, block_size) - 1).clamp_min(0)


def last_queries(query: torch.Tensor, lengths: SequenceLengths, block_size: int) -> torch.Tensor:
    """The importance pass's queries of a frame ``query [B, Hq, L, D]``: each sequence's last
    ``min(block_size, Nq_b)`` queries, in order, first; zero rows after them. ``[B, Hq, rows, D]``,
    rows = min(block_size, L)."""
    rows = min(block_size, query.shape[2])
    used = lengths.n_queries.clamp(max=block_size)
    offsets = torch.arange(rows, device=query.device)
    row_ok = offsets < used[:, None]  # [B, rows]
    index = torch.where(row_ok, (lengths.n_keys - used)[:, None] + offsets, 0)
    picked = query.gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))
    return picked * row_ok[:, None, :, None]


def cdiv_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    """Elementwise ``ceil(a / b)`` of a non-negative integer tensor (:func:`flexpbs.tile_grid.cdiv`)."""
    return torch.div(a + (b - 1), b, rounding_mode="floor")


def frame_length(max_keys: int, block_size: int) -> int:
    """Positions per sequence in a frame: the longest sequence's keys, in whole blocks (at least one)."""
    return max(1, cdiv(max_keys, block_size)) * block_size
