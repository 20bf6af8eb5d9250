"""``flexpbs.varlen_attention``: a packed batch of sequences of different lengths, in a few pipeline runs.

Serving engines pack the tokens of a batch into one tensor and describe the sequences by cumulative
offsets (flash-attn's varlen convention). Here the sequences are laid out as a frame, one row of L
positions per sequence (:mod:`flexpbs.lengths`; tokens moved by :mod:`flexpbs.rows`), and the PBS
pipeline runs once over the frame: importance, permutation, selection and the block lists cover every
sequence at once, and one FlexAttention call (per head chunk) computes them all. No tile spans two
sequences and no query sees another sequence's keys, since each sequence has its own frame row. When
the offsets are read, sequences of very different lengths get frames of their own lengths
(:func:`frame_groups`); a sequence alone in its group, or in the batch, needs no frame and runs as a
call on it alone, on views of the packed tensors. :func:`frame_attention` also serves padded batches
(:mod:`flexpbs.padding`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from flexpbs.config import PBSConfig, PBSStats
from flexpbs.dispatch import resolve
from flexpbs.lengths import SequenceLengths, frame_length
from flexpbs.limits import LIMITS
from flexpbs.permutation import identity_permutation
from flexpbs.pipeline import kv_heads_per_chunk_of_size, pbs_attention
from flexpbs.rows import copy_rows, copy_tensor_rows, frame_layout, packed_layout, to_frame
from flexpbs.sparse_attention import check_block_size
from flexpbs.tile_grid import cdiv, density
from flexpbs.validation import FLOAT_DTYPES


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    config: PBSConfig | None = None,
    return_stats: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[PBSStats]]:
    """PBS attention of a packed batch: flash-attn's varlen layout, bottom-right causal per sequence.

    Sequence b has ``N_b = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys and ``Nq_b`` queries, the LAST Nq_b
    of its key positions (Nq_b == N_b: a whole prompt; Nq_b < N_b: a chunk against its cache). It gets
    what ``flexpbs.attention`` gives on that sequence alone with the same options: the same selection
    (up to float32 ties between importances or block scores) and outputs equal within float32 rounding.
    Sequences that ``flexpbs.attention`` would run dense (at most ``segment_size`` keys, or fewer than
    ``min_seq_len``) run dense attention in the same call.

    Args:
        query: ``[total_q, Hq, D]`` float16, bfloat16 or float32.
        key: ``[total_k, Hkv, D]``, Hq a multiple of Hkv; value: ``[total_k, Hkv, Dv]``.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 on the query's device, starting at 0,
            non-decreasing, ending at total_q and total_k.
        max_seqlen_q, max_seqlen_k: the longest sequence's queries and keys. When both are given the
            offsets are trusted, not read (no host synchronisation: the call can be captured in a CUDA
            graph); when either is None the offsets are read and checked.
        config, **options: as :func:`flexpbs.attention` (a :class:`PBSConfig` or its fields, not both).
        return_stats: also return one :class:`PBSStats` per sequence, as a call on it alone returns.

    Returns:
        ``[total_q, Hq, Dv]`` in the query's dtype; with ``return_stats``, ``(output, stats)``.

    Raises:
        TypeError: a wrong type or dtype (offsets must be int32).
        ValueError: wrong ranks, heads, head dims or devices, offsets that do not start at 0, decrease,
            do not end at the totals or give a sequence more queries than keys (checked when they are
            read), or bad options.

    Eager only (inside ``torch.compile`` the call breaks the graph).
    """
    cfg = PBSConfig.resolve(config, options)
    _check_packed(query, key, value, cu_seqlens_q, cu_seqlens_k)
    check_block_size(query.device, cfg.block_size)
    offsets = None
    if max_seqlen_q is None or max_seqlen_k is None:
        offsets = _check_offsets(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0])
        max_seqlen_q, max_seqlen_k = max(offsets.n_queries, default=0), max(offsets.n_keys, default=0)
    for name, value_ in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value_, bool) or not isinstance(value_, int) or value_ < 0:
            raise TypeError(f"{name} must be a non-negative int or None, got {value_!r}")
    cfg = resolve(cfg, query, value)
    out = query.new_empty(query.shape[0], query.shape[1], value.shape[2])
    if cu_seqlens_q.shape[0] == 2:  # one sequence: its sizes are the totals, known without the offsets
        _check_queries_fit(0, query.shape[0], key.shape[0])
        stats = _alone(out, query, key, value, slice(None), slice(None), cfg, return_stats)
        return (out, stats) if return_stats else out
    groups = frame_groups(offsets.n_keys) if offsets is not None and query.shape[0] else []
    if len(groups) > 1:
        stats = _grouped(
            out, query, key, value, cu_seqlens_q, cu_seqlens_k, offsets, groups, cfg, return_stats
        )
    else:
        stats = _one_frame(
            out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, cfg, return_stats
        )
    return (out, stats) if return_stats else out


class _Offsets(NamedTuple):
    """The per-sequence sizes, read on the host from the offsets."""

    n_queries: list[int]
    n_keys: list[int]


def frame_groups(n_keys: list[int]) -> list[list[int]]:
    """The sequences (indices) laid out in each frame, longest first: a sequence joins the frame of the
    longest sequence not yet placed when it has at least ``LIMITS.frame_share`` of its keys or that one
    has at most ``LIMITS.frame_short_keys`` keys (:mod:`flexpbs.limits`); else it starts a new frame.

    A frame has L positions per sequence, L its longest sequence's keys, and its selection and block
    lists cost as much for each row as for the longest: one frame for sequences of very different
    lengths selects over mostly padding (8 sequences of 4K-96K: 4.8x the tiles of their own grids;
    in four frames: 1.06x)."""
    groups: list[list[int]] = []
    for b in sorted(range(len(n_keys)), key=lambda b: -n_keys[b]):
        longest = n_keys[groups[-1][0]] if groups else 0
        if groups and (n_keys[b] >= LIMITS.frame_share * longest or longest <= LIMITS.frame_short_keys):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _grouped(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    offsets: _Offsets,
    groups: list[list[int]],
    cfg: PBSConfig,
    return_stats: bool,
) -> list[PBSStats] | None:
    """:func:`_one_frame` per group of sequences (:func:`frame_groups`), :func:`_alone` for a sequence
    alone in its group, into ``out``.

    Each group's offsets and token rows are made on the device from ``cu_seqlens_q/k``: a blocking
    host-to-device copy would wait for the previous groups' kernels before this group's could be
    queued, idling the GPU for as long as the host takes to queue a pipeline run."""
    stats: list[PBSStats] = [None] * len(offsets.n_keys)  # type: ignore[list-item]
    # frame_groups takes the sequences longest first (a stable order), a group a run of that order
    n_keys = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    order = torch.sort(n_keys, descending=True, stable=True).indices
    q_starts, k_starts = ([0, *itertools.accumulate(sizes)] for sizes in (offsets.n_queries, offsets.n_keys))
    start = 0
    for group in groups:
        start += len(group)
        if len(group) == 1:  # a sequence alone needs no frame
            b = group[0]
            q_rows, k_rows = (slice(s[b], s[b + 1]) for s in (q_starts, k_starts))
            sequence_stats = _alone(out, query, key, value, q_rows, k_rows, cfg, return_stats)
            if return_stats:
                stats[b] = sequence_stats[0]
            continue
        ids = order[start - len(group) : start]
        (q_index, cu_q), (k_index, cu_k) = (
            _group_rows(cu, ids, sum(sizes[b] for b in group))
            for cu, sizes in ((cu_seqlens_q, offsets.n_queries), (cu_seqlens_k, offsets.n_keys))
        )
        max_k = max(offsets.n_keys[b] for b in group)
        group_stats = _one_frame(
            out, query, key, value, cu_q, cu_k, max_k, cfg, return_stats, (q_index, k_index)
        )
        for b, s in zip(group, group_stats or [], strict=False):
            stats[b] = s
    return stats if return_stats else None


def _alone(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_rows: slice,
    k_rows: slice,
    cfg: PBSConfig,
    return_stats: bool,
) -> list[PBSStats] | None:
    """One sequence of the batch, at packed rows ``q_rows`` and ``k_rows``, through the pipeline of a
    call on it alone, on ``[1, H, N, D]`` views of the packed tensors: no frame, so its keys and values
    are not copied (the attention stage copies the queries, :func:`flexpbs.rows.contiguous_rows`). Its
    output rows go into ``out``; returns ``[stats]`` with ``return_stats``."""
    q, k, v = (x[rows].transpose(0, 1)[None] for x, rows in ((query, q_rows), (key, k_rows), (value, k_rows)))
    result = pbs_attention(q, k, v, cfg, return_stats)
    sequence_out, stats = result if return_stats else (result, None)
    copy_tensor_rows(sequence_out, out[q_rows].transpose(0, 1)[None])
    return [stats] if return_stats else None


def _group_rows(cu_seqlens: torch.Tensor, ids: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows of sequences ``ids`` (``[G]`` int64, in order) and their own offsets.

    Args:
        cu_seqlens: ``[B + 1]`` int32 offsets of the packed batch.
        total: the sequences' rows together (read on the host already): sizes the result, no sync.

    Returns:
        ``[total]`` int64 packed rows, sequence by sequence; ``[G + 1]`` int32 offsets of the group.
    """
    starts, sizes = cu_seqlens[ids].long(), (cu_seqlens[ids + 1] - cu_seqlens[ids]).long()
    cu = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    shift = torch.repeat_interleave(starts - cu[:-1], sizes, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) + shift, cu.to(torch.int32)


def _one_frame(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    cfg: PBSConfig,
    return_stats: bool,
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[PBSStats] | None:
    """The sequences of ``cu_seqlens_q/k`` in one frame of ``max_seqlen_k`` positions (rounded up to
    whole blocks), their output rows written into ``out [total_q, Hq, Dv]``. ``tokens``: ``(q_index,
    k_index)`` int64, their rows of the packed tensors (a group of a batch, read in place); None: every
    row, in order. Returns the per-sequence stats with ``return_stats``."""
    q_index, k_index = tokens or (None, None)
    total_q = query.shape[0] if q_index is None else q_index.shape[0]
    total_k = key.shape[0] if k_index is None else k_index.shape[0]
    if total_q == 0:  # no query in the batch
        return _empty_stats(cu_seqlens_k, query, key, cfg) if return_stats else None
    n_keys = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    n_queries = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    frame = frame_length(max_seqlen_k, cfg.block_size)
    batch = n_keys.shape[0]
    # the frame slot (b * L + position) of each token, and the packed row of each slot (-1: zeros)
    key_slots = _slots(torch.zeros_like(n_keys), n_keys, total_k, frame)
    query_slots = _slots(n_keys - n_queries, n_queries, total_q, frame)
    key_source, query_source = (
        torch.full((batch * frame,), -1, dtype=torch.int64, device=query.device).index_put_(
            (slots,), torch.arange(total, device=query.device) if index is None else index
        )
        for slots, index, total in ((key_slots, k_index, total_k), (query_slots, q_index, total_q))
    )

    def frames(q_heads: slice, kv_heads: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = (
            (query[:, q_heads], query_source),
            (key[:, kv_heads], key_source),
            (value[:, kv_heads], key_source),
        )
        return tuple(to_frame(x, packed_layout(x), source, batch, frame) for x, source in parts)

    def unframe(frame_out: torch.Tensor, q_heads: slice) -> None:  # the query rows alone
        rows = out[:, q_heads]
        copy_rows(frame_out, frame_layout(frame_out), query_slots, rows, packed_layout(rows), q_index)

    shape = FrameShape(batch, query.shape[1], key.shape[1], frame, query.shape[2], value.shape[2])
    return frame_attention(frames, unframe, shape, query.dtype, n_keys, n_queries, cfg, return_stats)


class FrameShape(NamedTuple):
    """Sizes of a batch's frame: ``batch`` rows of ``frame`` positions, ``q_heads``/``kv_heads`` heads,
    ``head_dim`` (queries and keys) and ``value_dim``."""

    batch: int
    q_heads: int
    kv_heads: int
    frame: int
    head_dim: int
    value_dim: int


def frame_attention(
    frames: Callable[[slice, slice], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    unframe: Callable[[torch.Tensor, slice], None],
    shape: FrameShape,
    dtype: torch.dtype,
    n_keys: torch.Tensor,
    n_queries: torch.Tensor,
    cfg: PBSConfig,
    return_stats: bool,
) -> list[PBSStats] | None:
    """The pipeline over a batch laid out in frames, a few KV heads at a time, with ``cfg`` resolved.

    The frames are built per head chunk (:func:`flexpbs.pipeline.kv_heads_per_chunk` of the whole
    frames, built per chunk), so a chunk needs no copy of a head slice of a whole frame, and only one
    chunk's frames are alive at a time; each chunk's output goes straight to the caller's output.

    Args:
        frames: ``(query heads, KV heads) -> (q [B, h, L, D], k [B, hk, L, D], v [B, hk, L, Dv])``, the
            frames of those heads, zeros outside each sequence.
        unframe: ``(out [B, h, L, Dv], query heads)``: writes a chunk's frame output (rows holding no
            query are unspecified) into the caller's output.
        shape: the whole frame's sizes; dtype: the inputs'.
        n_keys, n_queries: ``[B]`` int64, each sequence's keys and queries.

    Returns:
        With ``return_stats``, one :class:`PBSStats` per sequence (reads the lengths on the host);
        else None.
    """
    dense = n_keys <= cfg.segment_size
    if cfg.min_seq_len is not None:
        dense |= n_keys < cfg.min_seq_len
    lengths = SequenceLengths(n_keys, n_queries, dense)
    per_query_head = cfg.gqa == "per_head"
    per_chunk = kv_heads_per_chunk_of_size(
        *shape, dtype, cfg.block_size, per_query_head, frames_built_per_chunk=True
    )
    group = shape.q_heads // shape.kv_heads
    parts = []
    for k0 in range(0, shape.kv_heads, per_chunk):
        q_heads = slice(k0 * group, (k0 + per_chunk) * group)
        q_frame, k_frame, v_frame = frames(q_heads, slice(k0, k0 + per_chunk))
        result = pbs_attention(q_frame, k_frame, v_frame, cfg, return_stats, lengths, chunk_heads=False)
        del q_frame, k_frame, v_frame
        out, stats = result if return_stats else (result, None)
        unframe(out, q_heads)
        del out
        parts.append(stats)
    if not return_stats:
        return None
    stats = parts[0]
    if len(parts) > 1:
        stats = dataclasses.replace(
            stats,
            tiles=torch.cat([s.tiles for s in parts], dim=1),
            key_positions=torch.cat([s.key_positions for s in parts], dim=1),
            density=torch.cat([s.density for s in parts], dim=1),
            sorted_rows=torch.cat([s.sorted_rows for s in parts], dim=1),
        )
    return _sequence_stats(stats, lengths, cfg)


def _sequence_stats(stats: PBSStats, lengths: SequenceLengths, cfg: PBSConfig) -> list[PBSStats]:
    """Each sequence's part of the frame's stats, shaped as a call on the sequence alone reports it."""
    per_sequence = []
    for b, (n, n_q, dense) in enumerate(zip(*(x.tolist() for x in lengths), strict=True)):
        n_blocks = cdiv(n, cfg.block_size)
        first = (n - n_q) // cfg.block_size if n_q else n_blocks
        one = slice(b, b + 1)
        if dense or n_q == 0:
            causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=stats.tiles.device).tril()[
                first:
            ]
            tiles = causal.expand(1, stats.tiles.shape[1], *causal.shape).contiguous()
            positions = identity_permutation(1, stats.key_positions.shape[1], n, stats.tiles.device)
            ones = torch.ones(1, stats.tiles.shape[1], device=stats.tiles.device)
            per_sequence.append(PBSStats(tiles=tiles, key_positions=positions, density=ones, dense=True))
            continue
        tiles = stats.tiles[one, :, first:n_blocks, :n_blocks].contiguous()
        per_sequence.append(
            dataclasses.replace(
                stats,
                tiles=tiles,
                key_positions=stats.key_positions[one, :, :n].contiguous(),
                density=density(tiles),
                sorted_rows=None if stats.sorted_rows is None else stats.sorted_rows[one],
            )
        )
    return per_sequence


def _empty_stats(
    cu_seqlens_k: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cfg: PBSConfig
) -> list[PBSStats]:
    """Per-sequence stats of a batch without queries: each a dense call's."""
    lengths = SequenceLengths(
        *(
            torch.tensor(x)
            for x in (
                (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().tolist(),
                [0] * (cu_seqlens_k.shape[0] - 1),
                [True] * (cu_seqlens_k.shape[0] - 1),
            )
        )
    )
    heads = query.shape[1] if cfg.gqa == "per_head" else key.shape[1]
    template = PBSStats(
        tiles=torch.zeros(1, query.shape[1], 0, 0, dtype=torch.bool, device=query.device),
        key_positions=torch.zeros(1, heads, 0, dtype=torch.int64, device=query.device),
        density=torch.ones(1, query.shape[1], device=query.device),
        dense=True,
    )
    return _sequence_stats(template, lengths, cfg)


def _slots(starts: torch.Tensor, lengths: torch.Tensor, total: int, frame: int) -> torch.Tensor:
    """``[total]`` int64: the frame slots ``b * frame + position`` of the positions ``starts[b]`` ..
    ``starts[b] + lengths[b] - 1`` of each row b, in order; ``total`` = ``lengths.sum()``, given so that
    nothing is read on the host (no synchronisation)."""
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    row = torch.repeat_interleave(rows, lengths, output_size=total)
    before = lengths.cumsum(0) - lengths  # positions of the earlier rows
    offset = torch.arange(total, device=lengths.device) - before[row]
    return row * frame + starts[row] + offset


def _check_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> None:
    tensors = {"query": query, "key": key, "value": value}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [total_tokens, heads, head_dim], got {list(x.shape)}")
        if x.dtype not in FLOAT_DTYPES or x.dtype != query.dtype:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 like query, got {x.dtype}")
        if x.device != query.device:
            raise ValueError(f"{name} device {x.device} does not match query device {query.device}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad: varlen_attention is inference-only; call it under "
                "torch.no_grad() or torch.inference_mode()"
            )
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"key head_dim {key.shape[2]} does not match query head_dim {query.shape[2]}")
    if value.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"value [total_k, Hkv] {list(value.shape[:2])} does not match key {list(key.shape[:2])}"
        )
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query heads {query.shape[1]} must be a positive multiple of key heads {key.shape[1]}"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must have shape [batch + 1], got {list(cu.shape)}")
        if cu.device != query.device:
            raise ValueError(f"{name} device {cu.device} does not match query device {query.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1} sequences"
        )


def _check_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int) -> _Offsets:
    """Reads the offsets (one host synchronisation for both) and checks them."""
    both = torch.stack((cu_q, cu_k)).tolist()
    offsets = {"cu_seqlens_q": (both[0], total_q), "cu_seqlens_k": (both[1], total_k)}
    for name, (cu, total) in offsets.items():
        if cu[0] != 0:
            raise ValueError(f"{name} must start at 0, got {cu[0]}")
        if any(b < a for a, b in itertools.pairwise(cu)):
            raise ValueError(f"{name} must be non-decreasing, got {cu}")
        if cu[-1] != total:
            raise ValueError(f"{name} must end at the number of tokens {total}, got {cu[-1]}")
    q_lens, k_lens = ([b - a for a, b in itertools.pairwise(cu)] for cu, _ in offsets.values())
    for b, (n_q, n) in enumerate(zip(q_lens, k_lens, strict=True)):
        _check_queries_fit(b, n_q, n)
    return _Offsets(q_lens, k_lens)


def _check_queries_fit(b: int, n_q: int, n: int) -> None:
    """Raises ValueError when sequence ``b`` has more queries ``n_q`` than keys ``n``."""
    if n_q > n:
        raise ValueError(
            f"sequence {b} has {n_q} queries but {n} keys: the queries are the last keys' positions"
        )
