"""Triton kernel for the last-block importance pass.

Computes exactly what :func:`flexpbs.importance.last_block_importance` defines, without ever holding
the ``[rows, N]`` probability matrix: two fused passes over the keys of each (batch, KV head).

1. ``_row_stats_kernel``: for every query row of the last block, the running max and the sum of
   ``exp2`` of its logits over the keys of the complete segments (online softmax). The keys are
   split into a few contiguous ranges so that short batches still fill the GPU; the partial
   statistics are merged into one log2-sum-exp per row.
2. ``_column_mass_kernel``: for each key tile, the sum over rows (and over the query heads of the
   KV group when the importance is shared) of ``exp2(s - lse)``, i.e. of the softmax probability,
   divided by the number of summed rows.

Logits are handled in base 2 (``s = scale * log2(e) * q . k``) so that ``exp2`` replaces ``exp``.
This module imports Triton at the top; callers import it only when Triton is available. CPU tensors
run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flexpbs.kernels import count_variants
from flexpbs.kernels.strides import kernel_strides
from flexpbs.lengths import SequenceLengths, last_queries
from flexpbs.validation import check_inputs

_LOG2E = math.log2(math.e)
# Read once, like triton.jit does when it decides whether to interpret the kernels below.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_HEAD_DIM = 256


@triton.jit
def _stats_update(
    q,
    k_ptrs,
    load_mask,
    col_ok,
    row_max,
    row_sum,
    scale_log2,
    MASK_COLS: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update of (row_max, row_sum) by one key tile; row_max is in base-2 units."""
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # The max of the raw products, scaled afterwards: one multiply per row for the max.
    if MASK_COLS:
        if POSITIVE_SCALE:
            tile_max = tl.max(tl.where(col_ok[None, :], s, float("-inf")), 1)
        else:
            tile_max = tl.min(tl.where(col_ok[None, :], s, float("inf")), 1)
    else:
        if POSITIVE_SCALE:
            tile_max = tl.max(s, 1)
        else:
            tile_max = tl.min(s, 1)
    # Every tile holds at least one valid key, so new_max is finite and no inf - inf appears.
    new_max = tl.maximum(row_max, tile_max * scale_log2)
    # The launch disables FMA contraction: s * scale_log2 is then rounded as in new_max, so the row
    # max gets exponent exactly 0 (an unrounded product differs by up to half an ulp of the logit,
    # hundreds at 1e10: exp2 then overflowed, or flushed every term of the row to 0).
    p = tl.exp2(s * scale_log2 - new_max[:, None])
    if MASK_COLS:
        p = tl.where(col_ok[None, :], p, 0.0)
    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(p, 1)
    return new_max, row_sum


# Integer arguments that change with the lengths or the head chunk are not specialised (Triton would
# compile a variant per divisibility by 16, or value 1, of each: a JIT compile at a new prompt length,
# or at the first length whose head chunks hold one KV head). The strides are (``kernel_strides``: one
# variant serves every length; unspecialised, every q/K load was element-wise and unpipelined, 2.2
# instead of ~0.7 ms at 128K on an H100).
_LENGTH_ARGS = ["kv_heads", "n_queries", "n_complete", "rows"]


@triton.jit(do_not_specialize=[*_LENGTH_ARGS, "tiles_per_split", "stats_per_split", "varlen"])
def _row_stats_kernel(
    q_ptr,
    k_ptr,
    max_ptr,
    sum_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    kv_heads,
    n_queries,
    n_complete,
    rows,
    head_dim,
    tiles_per_split,
    stats_per_split,
    scale_log2,
    rows_ptr,
    complete_ptr,
    varlen,
    GROUP: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial softmax statistics of one tile of query rows over one range of keys.

    Program ``(row tile, split, batch * kv_heads + kv head)``; row tiles of one key range run next
    to each other and share its key tiles in L2. The rows of a KV group are flattened head-major:
    flat row ``m`` is row ``m % rows`` of the last block of query head ``kv * GROUP + m // rows``,
    which is also its offset in the ``[B, Hq, rows]`` statistics.
    Writes ``max_ptr/sum_ptr[split, b, h, r]`` (float32, base-2 logits). ``varlen`` (a runtime flag:
    one compiled variant serves frames and single sequences): sequence b uses its
    first ``rows_ptr[b]`` rows and ``complete_ptr[b]`` keys (a split past them stays empty: -inf, 0).
    """
    row_tile = tl.program_id(0)
    split = tl.program_id(1)
    bkv = tl.program_id(2)
    batch = bkv // kv_heads
    kv = bkv % kv_heads
    group_rows = GROUP * rows

    offs_m = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < group_rows
    if varlen != 0:
        n_complete = tl.load(complete_ptr + batch)
        row_ok = row_ok & (offs_m % rows < tl.load(rows_ptr + batch))
    d_ok = offs_d < head_dim

    # int64 bases: batch/head strides times indices overflow int32 past ~2G elements.
    q_head = (kv * GROUP + offs_m // rows).to(tl.int64)
    q_row = n_queries - rows + offs_m % rows
    q_ptrs = (
        q_ptr
        + batch.to(tl.int64) * stride_qb
        + q_head[:, None] * stride_qh
        + q_row[:, None] * stride_qn
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = (
        k_ptr
        + batch.to(tl.int64) * stride_kb
        + kv.to(tl.int64) * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd
    )

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    start = split * tiles_per_split * BLOCK_N
    end = tl.maximum(tl.minimum(start + tiles_per_split * BLOCK_N, n_complete), start)
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    # Whole tiles skip the column mask; only the ragged last tile of the last split needs it.
    for n0 in range(start, full_end, BLOCK_N):
        row_max, row_sum = _stats_update(
            q, k_ptrs + n0 * stride_kn, d_ok[None, :], offs_n, row_max, row_sum, scale_log2,
            MASK_COLS=False, POSITIVE_SCALE=POSITIVE_SCALE, UPCAST=UPCAST, PRECISION=PRECISION,
        )  # fmt: skip
    if full_end < end:
        col_ok = full_end + offs_n < end
        tail_mask = col_ok[:, None] & d_ok[None, :]
        row_max, row_sum = _stats_update(
            q, k_ptrs + full_end * stride_kn, tail_mask, col_ok, row_max, row_sum, scale_log2,
            MASK_COLS=True, POSITIVE_SCALE=POSITIVE_SCALE, UPCAST=UPCAST, PRECISION=PRECISION,
        )  # fmt: skip

    stat_offs = split * stats_per_split + bkv * group_rows + offs_m
    tl.store(max_ptr + stat_offs, row_max, mask=row_ok)
    tl.store(sum_ptr + stat_offs, row_sum, mask=row_ok)


@triton.jit(do_not_specialize=["n_stats", "splits"])
def _merge_stats_kernel(max_ptr, sum_ptr, lse_ptr, n_stats, splits, BLOCK: tl.constexpr):
    """``lse[i] = log2(sum_s sum[s, i] * 2^(max[s, i]))`` over the key splits of pass 1."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_stats
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for split in range(splits):
        top = tl.maximum(top, tl.load(max_ptr + split * n_stats + offs, mask=ok, other=0.0))
    # A row without keys (a sequence of a frame without complete segments) has top -inf: keep its
    # arithmetic finite (lse -inf) rather than computing -inf - -inf.
    finite_top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(splits):
        part_max = tl.load(max_ptr + split * n_stats + offs, mask=ok, other=0.0)
        total += tl.load(sum_ptr + split * n_stats + offs, mask=ok, other=1.0) * tl.exp2(
            part_max - finite_top
        )
    tl.store(lse_ptr + offs, top + tl.log2(tl.maximum(total, 1.0)), mask=ok)


@triton.jit(do_not_specialize=[*_LENGTH_ARGS, "stride_ob", "stride_oh", "varlen"])
def _column_mass_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_ob,
    stride_oh,
    kv_heads,
    n_queries,
    n_complete,
    rows,
    head_dim,
    scale_log2,
    inv_count,
    rows_ptr,
    complete_ptr,
    varlen,
    GROUP: tl.constexpr,
    HEADS_PER_OUT: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Mean softmax probability of one tile of keys, for every output head of one KV head.

    Program ``(key tile, batch * kv_heads + kv head)``. The key tile is loaded once and meets the
    last-block rows of all ``GROUP`` query heads of its KV group. Output head ``o`` averages the
    ``HEADS_PER_OUT`` query heads ``o * HEADS_PER_OUT ...`` (all of the group when shared, one per
    query head otherwise). Writes ``out[b, o, tile]`` (float32). ``varlen``: as in
    :func:`_row_stats_kernel`; columns past a sequence's ``complete_ptr[b]`` are not written.
    """
    out_per_kv = GROUP // HEADS_PER_OUT
    key_tile = tl.program_id(0)
    bkv = tl.program_id(1)
    batch = bkv // kv_heads
    kv = bkv % kv_heads

    offs_m = tl.arange(0, BLOCK_M)
    cols = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    used_rows = rows
    if varlen != 0:
        n_complete = tl.load(complete_ptr + batch)
        used_rows = tl.load(rows_ptr + batch)
        inv_count = 1.0 / (HEADS_PER_OUT * used_rows).to(tl.float32)
    col_ok = cols < n_complete
    d_ok = offs_d < head_dim

    k = tl.load(
        k_ptr
        + batch.to(tl.int64) * stride_kb
        + kv.to(tl.int64) * stride_kh
        + cols[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    k_t = tl.trans(k)

    out_rows = HEADS_PER_OUT * rows
    q_base = q_ptr + batch.to(tl.int64) * stride_qb
    for o in range(out_per_kv):
        out_head = kv * out_per_kv + o
        # Statistics of the output head's rows are contiguous in [B, Hq, rows].
        lse_base = lse_ptr + (batch * kv_heads * GROUP + out_head * HEADS_PER_OUT) * rows
        # Summing over rows once per head keeps the cross-thread reduction out of the row loop.
        mass = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for m0 in range(0, out_rows, BLOCK_M):
            flat = m0 + offs_m
            row_ok = (flat < out_rows) & (flat % rows < used_rows)
            q_head = (out_head * HEADS_PER_OUT + flat // rows).to(tl.int64)
            q_row = n_queries - rows + flat % rows
            q_ptrs = q_base + q_head[:, None] * stride_qh + q_row[:, None] * stride_qn
            q_ptrs += offs_d[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            # +inf for padding rows makes their probabilities exactly 0; padding columns are not stored.
            lse = tl.load(lse_base + flat, mask=row_ok, other=float("inf"))
            s = tl.dot(q, k_t, input_precision=PRECISION)
            # <= 0 in exact arithmetic; recomputed logits of ~1e9 can exceed the lse by rounding
            # (fp32 spacing ~1e2 there), and exp2 of that overflows: clamp, keeping NaN.
            exponent = tl.minimum(s * scale_log2 - lse[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
            mass += tl.exp2(exponent)
        out_ptrs = out_ptr + batch.to(tl.int64) * stride_ob + out_head.to(tl.int64) * stride_oh + cols
        tl.store(out_ptrs, tl.sum(mass, 0) * inv_count, mask=col_ok)


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _row_tile(rows: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(rows)))


def _stats_tiles(rows: int, d_pad: int, fp32: bool) -> _Tiles:
    """Pass-1 tiling for ``rows`` flattened query rows of a KV group (tuned on an H100, bf16)."""
    if fp32:
        # tf32x3 operands take about four times the shared memory of bf16 ones.
        return _Tiles(_row_tile(rows, 64), 64 if d_pad <= 64 else 32, 4, 2)
    return _Tiles(_row_tile(rows, 128), 64, 8, 3)


def _mass_tiles(rows: int, d_pad: int, per_query_head: bool, fp32: bool) -> _Tiles:
    """Pass-2 tiling for ``rows`` flattened query rows of one output head (tuned on an H100, bf16)."""
    if fp32:
        return _Tiles(_row_tile(rows, 32), 64 if d_pad <= 128 else 32, 4, 2)
    if d_pad > 128:
        return _Tiles(_row_tile(rows, 64), 256, 8, 2)
    # Per query head, each head's short row loop is followed by a cross-warp column sum; thinner
    # row tiles measured faster there.
    return _Tiles(_row_tile(rows, 32 if per_query_head else 64), 128, 4, 2)


# Programs per SM that the key split of pass 1 aims for: many short programs even out the waves.
_STATS_WAVES = 8


def _common(query: torch.Tensor) -> dict:
    fp32_inputs = query.dtype == torch.float32
    return dict(
        # Half inputs on the GPU go to tl.dot as they are: bf16/fp16 products are exact in its float32
        # accumulator, so this equals upcasting first (and measured ~2x faster than tf32 on upcast
        # tiles). The interpreter gets float32 tiles: its bf16 arithmetic is wrong.
        UPCAST=_INTERPRETED or query.device.type != "cuda",
        # Float32 operands would be rounded to tf32 by default. "tf32x3" (three tf32 products) is close
        # to float32 at tensor-core speed; "ieee" measured ~500x slower on an H100.
        PRECISION="tf32x3" if fp32_inputs else "tf32",
    )


def _row_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    rows: int,
    n_complete: int,
    scale_log2: float,
    tiles: _Tiles,
    splits: int | None,
    varlen: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Pass 1: ``[B * Hq * rows]`` float32 log2-sum-exp2 of each last-block row's base-2 logits.
    ``varlen``: per-sequence ``(rows, complete keys)`` int32 ``[B]`` (see :func:`launch`)."""
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    row_tiles = triton.cdiv(group * rows, tiles.block_m)
    key_tiles = triton.cdiv(n_complete, tiles.block_n)
    if splits is None:
        splits = 1
        if query.device.type == "cuda":
            programs = _STATS_WAVES * _sm_count(query.device.index or 0)
            wanted = triton.cdiv(programs, batch * kv_heads * row_tiles)
            # Each split keeps a long loop so that the merge below stays negligible.
            splits = max(1, min(wanted, key_tiles // 8))
    tiles_per_split = triton.cdiv(key_tiles, max(1, min(splits, key_tiles)))
    splits = triton.cdiv(key_tiles, tiles_per_split)  # no empty split: every row max stays finite
    rows_ptr, complete_ptr = varlen if varlen is not None else (_unused(query.device),) * 2

    stats_per_split = batch * q_heads * rows
    if varlen is None:
        part_max = torch.empty(splits, stats_per_split, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:  # rows past a sequence's own are never written: give them an empty split's statistics
        part_max = torch.full((splits, stats_per_split), float("-inf"), device=query.device)
        part_sum = torch.zeros_like(part_max)
    _row_stats_kernel[(row_tiles, splits, batch * kv_heads)](
        query,
        key,
        part_max,
        part_sum,
        *kernel_strides(query),
        *kernel_strides(key),
        kv_heads,
        n_queries,
        n_complete,
        rows,
        head_dim,
        tiles_per_split,
        stats_per_split,
        scale_log2,
        rows_ptr,
        complete_ptr,
        int(varlen is not None),
        GROUP=group,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        POSITIVE_SCALE=scale_log2 >= 0,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        enable_fp_fusion=False,  # see _stats_update
        **_common(query),
    )
    # One small kernel rather than a chain of torch ops: short inputs are bound by launch overhead.
    lse = torch.empty(stats_per_split, dtype=torch.float32, device=query.device)
    merge_grid = (triton.cdiv(stats_per_split, 1024),)
    _merge_stats_kernel[merge_grid](part_max, part_sum, lse, stats_per_split, splits, BLOCK=1024)
    return lse


def _column_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    *,
    rows: int,
    scale_log2: float,
    tiles: _Tiles,
    varlen: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Pass 2: fills ``out [B, Hp, Nc]`` with the mean probability of each key (``varlen``: within each
    sequence's complete keys)."""
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    n_complete = out.shape[-1]
    heads_per_out = group if out.shape[1] == kv_heads else 1
    _column_mass_kernel[(triton.cdiv(n_complete, tiles.block_n), batch * kv_heads)](
        query,
        key,
        lse,
        out,
        *kernel_strides(query),
        *kernel_strides(key),
        kernel_strides(out)[0],
        out.stride(1),
        kv_heads,
        n_queries,
        n_complete,
        rows,
        head_dim,
        scale_log2,
        1.0 / (heads_per_out * rows),
        *(varlen if varlen is not None else (_unused(query.device),) * 2),
        int(varlen is not None),
        GROUP=group,
        HEADS_PER_OUT=heads_per_out,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        **_common(query),
    )


@functools.cache
def _unused(device: torch.device) -> torch.Tensor:
    """An int32 tensor for the per-sequence pointers of a call without them (never read)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def launch(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Runs both passes; ``block_m``/``block_n``/``splits`` override the tiling (tests use them).

    Args:
        query: ``[B, Hq, Nq, D]``.
        key: ``[B, Hkv, N, D]``, N >= Nq.
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`): each sequence's
            last ``min(block_size, Nq_b)`` queries (gathered first, here) and complete segments.

    Returns:
        ``[B, Hp, Nc]`` float32 (see :func:`triton_last_block_importance`); with ``lengths``, 0 past
        each sequence's complete segments.
    """
    varlen = None
    if lengths is not None:
        query = last_queries(query, lengths, block_size)
        rows_used = lengths.n_queries.clamp(max=block_size)
        complete = lengths.complete_keys(segment_size) * (rows_used > 0)
        varlen = (rows_used.clamp_min(1).to(torch.int32), complete.to(torch.int32))
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    n_complete = key.shape[2] // segment_size * segment_size
    rows = min(block_size, n_queries)
    out_heads = q_heads if per_query_head else kv_heads
    # a sequence's columns past its complete keys are not written: zeros
    empty = torch.zeros if lengths is not None else torch.empty
    out = empty(batch, out_heads, n_complete, dtype=torch.float32, device=query.device)
    if n_complete == 0 or out.numel() == 0:
        return out

    d_pad = max(16, triton.next_power_of_2(head_dim))
    fp32 = query.dtype == torch.float32
    # Tiles sized for a whole last block, whatever the chunk's queries: a tile that shrank with a short
    # chunk would be a kernel variant of its own, a compile at the first such chunk after the warm-up.
    stats_tiles = _stats_tiles(group * block_size, d_pad, fp32)
    mass_tiles = _mass_tiles(block_size * (1 if per_query_head else group), d_pad, per_query_head, fp32)
    if block_m:
        stats_tiles, mass_tiles = stats_tiles._replace(block_m=block_m), mass_tiles._replace(block_m=block_m)
    if block_n:
        stats_tiles, mass_tiles = stats_tiles._replace(block_n=block_n), mass_tiles._replace(block_n=block_n)
    scale_log2 = float(scale) * _LOG2E
    lse = _row_lse(
        query,
        key,
        rows=rows,
        n_complete=n_complete,
        scale_log2=scale_log2,
        tiles=stats_tiles,
        splits=splits,
        varlen=varlen,
    )
    _column_mass(query, key, lse, out, rows=rows, scale_log2=scale_log2, tiles=mass_tiles, varlen=varlen)
    return out


def _check_kernel_inputs(query: torch.Tensor, key: torch.Tensor, block_size: int, segment_size: int) -> None:
    check_inputs(query, key)
    if query.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim must be at most {_MAX_HEAD_DIM} for the Triton importance kernel, "
            f"got {query.shape[-1]}"
        )
    if block_size < 1 or segment_size < 1:
        raise ValueError(f"block_size and segment_size must be positive, got {block_size} and {segment_size}")


@torch.library.custom_op("flexpbs::last_block_importance", mutates_args=())
def _importance_op(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    n_keys: torch.Tensor | None = None,
    n_queries: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    # An opaque op: torch.compile neither traces nor re-launches the kernels, and under the
    # interpreter a bare @triton.jit call inside a compiled function would fail.
    device = torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext()
    with device:
        return launch(
            query,
            key,
            block_size=block_size,
            segment_size=segment_size,
            scale=scale,
            per_query_head=per_query_head,
            lengths=None if n_keys is None else SequenceLengths(n_keys, n_queries, dense),
        )


@_importance_op.register_fake
def _importance_op_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    n_keys: torch.Tensor | None = None,
    n_queries: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, q_heads = query.shape[:2]
    out_heads = q_heads if per_query_head else key.shape[1]
    n_complete = key.shape[2] // segment_size * segment_size
    return query.new_empty((batch, out_heads, n_complete), dtype=torch.float32)


def triton_last_block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Importance of every key of the complete segments, computed by the Triton kernels.

    Same contract as :func:`flexpbs.importance.last_block_importance`; callable inside
    ``torch.compile`` (a ``torch.library`` custom op, ``flexpbs::last_block_importance``).

    Args:
        query: ``[B, Hq, Nq, D]`` float16, bfloat16 or float32, D <= 256; CUDA, or CPU under the
            Triton interpreter. The queries sit at the last Nq key positions (Nq = N for prefill).
        key: ``[B, Hkv, N, D]``, Hq = G * Hkv, N >= Nq, same dtype and device.
        block_size: rows of the last query block used as the proxy (``min(block_size, Nq)`` rows).
        segment_size: only the first ``Nc = floor(N / segment_size) * segment_size`` keys are scored.
        scale: logit scale.
        per_query_head: one importance row per query head instead of per KV head.
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`).

    Returns:
        ``[B, Hp, Nc]`` float32, Hp = Hq if ``per_query_head`` else Hkv. Each row sums to 1
        (when Nc > 0); with ``lengths``, 0 past each sequence's complete segments.

    Raises:
        TypeError: dtypes are not float16/bfloat16/float32 or differ.
        ValueError: ranks or shapes do not match, D > 256, or block/segment size is not positive.
    """
    _check_kernel_inputs(query, key, block_size, segment_size)
    return _importance_op(
        query,
        key,
        int(block_size),
        int(segment_size),
        float(scale),
        bool(per_query_head),
        *(lengths or (None,) * 3),
    )


def compiled_variants() -> int:
    """Compiled variants of the importance kernels in this process (Triton compiles one per
    specialisation of their arguments): counts what a call at a new shape compiled."""
    return count_variants(_row_stats_kernel, _merge_stats_kernel, _column_mass_kernel)
