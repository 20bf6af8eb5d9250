"""Triton kernel for antidiagonal tile scores (PBS-Attn+).

Computes what :func:`flexpbs.antidiagonal.tile_scores` defines without holding any strided logits in
memory: one program per (batch, query head, query block) makes two passes over the block's candidate
key blocks.

1. For each strided row of the block, the running max and sum of ``exp2`` of its strided logits
   (online softmax). A strided logit is one ``tl.dot`` of the row's S queries, concatenated in reverse
   order, with a strided column's S keys, over the ``S * D`` concatenated features.
2. The logits again, as probabilities, summed over each key block's strided columns and averaged over
   the strided rows that hold a query: one score per (query block, key block), written to the output.

Candidates are a prefix of the key blocks (the blocks of earlier segments), so each program loops over
its own count of them; columns past it stay 0. Logits are in base 2 (``exp2``). This module imports
Triton at the top; callers import it only when Triton is available.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from flexpbs.lengths import SequenceLengths

_LOG2E = math.log2(math.e)
# Read once, like triton.jit does when it decides whether to interpret the kernels below.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _strided_logits(
    q_base,
    k_base,
    q_row0,
    q_first,
    q_end,
    k_row0,
    n_keys,
    stride_qn,
    stride_kn,
    logit_scale,
    S: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``[BLOCK_R, BLOCK_R]`` base-2 logits of the block's strided rows (aligned rows from ``q_row0``;
    only rows in ``[q_first, q_end)`` hold queries) with the strided columns of the key block starting
    at key ``k_row0``."""
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, T_CHUNK * BLOCK_D)
    t_in, d = e // BLOCK_D, e % BLOCK_D
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for t0 in tl.static_range(0, S, T_CHUNK):
        t = t0 + t_in
        # strided row g takes aligned rows g*S + S-1-t; strided column h takes keys h*S + t
        q_rows = q_row0 + r[:, None] * S + (S - 1 - t)[None, :]
        q_ok = (r[:, None] < R) & (t < S)[None, :] & (d < D)[None, :] & (q_rows >= q_first) & (q_rows < q_end)
        # int64 offsets: row * stride passes 2^31 at 512K keys in a [B, N, H, D] layout
        q = tl.load(q_base + q_rows.to(tl.int64) * stride_qn + d[None, :], mask=q_ok, other=0.0)
        k_rows = k_row0 + r[:, None] * S + t[None, :]
        k_ok = (r[:, None] < R) & (t < S)[None, :] & (d < D)[None, :] & (k_rows < n_keys)
        k = tl.load(k_base + k_rows.to(tl.int64) * stride_kn + d[None, :], mask=k_ok, other=0.0)
        if UPCAST:
            q, k = q.to(tl.float32), k.to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return acc * logit_scale


@triton.jit(do_not_specialize=["n_keys", "lead", "first_block"])
def _antidiagonal_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    candidates_ptr,
    first_ptr,
    end_ptr,
    n_keys,
    lead,
    first_block,
    logit_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_ob,
    stride_oh,
    stride_or,
    stride_fb,
    GROUP: tl.constexpr,
    Q_HEADS: tl.constexpr,
    BLOCK: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i = tl.program_id(0)  # query block, relative to first_block
    bh = tl.program_id(1)
    b, hq = bh // Q_HEADS, bh % Q_HEADS
    R: tl.constexpr = BLOCK // S
    n_candidates = tl.load(candidates_ptr + i)
    # aligned query rows: row x is query x - lead; the rows holding queries are [first, end)
    q_first = tl.load(first_ptr + b * stride_fb)
    q_end = tl.load(end_ptr + b * stride_fb)
    q_row0 = (first_block + i) * BLOCK
    # aligned row x at q_base + x * stride_qn
    q_base = q_ptr + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh - lead * stride_qn
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (hq // GROUP).to(tl.int64) * stride_kh
    r = tl.arange(0, BLOCK_R)
    row_start = q_row0 + r * S
    held = (r < R) & (row_start + S > q_first) & (row_start < q_end)
    n_held = tl.sum(held.to(tl.float32), 0)

    row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    col_ok = r < R
    for j in range(0, n_candidates):
        s = _strided_logits(
            q_base, k_base, q_row0, q_first, q_end, j * BLOCK, n_keys, stride_qn, stride_kn, logit_scale,
            S, D, R, BLOCK_R, BLOCK_D, T_CHUNK, UPCAST, PRECISION,
        )  # fmt: skip
        s = tl.where(col_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        row_max = new_max

    # each held row's probabilities, weighted 1 / (held rows); rows without a query weigh 0
    weight = tl.where(held, 1.0 / (row_sum * tl.maximum(n_held, 1.0)), 0.0)
    out_row = (
        out_ptr
        + b.to(tl.int64) * stride_ob
        + (hq // GROUP).to(tl.int64) * stride_oh
        + (i * GROUP + hq % GROUP).to(tl.int64) * stride_or
    )
    for j in range(0, n_candidates):
        s = _strided_logits(
            q_base, k_base, q_row0, q_first, q_end, j * BLOCK, n_keys, stride_qn, stride_kn, logit_scale,
            S, D, R, BLOCK_R, BLOCK_D, T_CHUNK, UPCAST, PRECISION,
        )  # fmt: skip
        p = tl.where(col_ok[None, :], tl.exp2(s - row_max[:, None]), 0.0)
        tl.store(out_row + j, tl.sum(tl.sum(p, 1) * weight, 0))


def launch(
    query: torch.Tensor,
    key_p: torch.Tensor,
    *,
    first_block: int,
    end_block: int,
    columns: int,
    candidates: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    lead: int,
    first_query: torch.Tensor,
    end_query: torch.Tensor,
) -> torch.Tensor:
    """The kernel on contiguous-last-dim inputs; ``candidates [blocks]`` int32 count of each query
    block's candidate key blocks, ``first_query`` / ``end_query`` ``[B or 1]`` int64 aligned rows."""
    batch, q_heads, _, head_dim = query.shape
    perm_heads = key_p.shape[1]
    group = q_heads // perm_heads
    blocks = end_block - first_block
    out = torch.zeros(batch, perm_heads, blocks * group, columns, dtype=torch.float32, device=query.device)
    if blocks == 0 or batch == 0 or q_heads == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    key_p = key_p if key_p.stride(-1) == 1 else key_p.contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    per_block = block_size // stride
    block_r = max(16, triton.next_power_of_2(per_block))
    # about 2^12 elements per operand tile of one dot: several dots over the S * D features
    t_chunk = min(triton.next_power_of_2(stride), max(1, 4096 // (block_r * block_d)))
    fp32_inputs = query.dtype == torch.float32
    grid = (blocks, batch * q_heads)
    _antidiagonal_kernel[grid](
        query, key_p, out, candidates, first_query, end_query,
        key_p.shape[2], lead, first_block, scale / stride * _LOG2E,
        *query.stride()[:3], *key_p.stride()[:3], *out.stride()[:3],
        0 if first_query.shape[0] == 1 else first_query.stride(0),
        GROUP=group, Q_HEADS=q_heads, BLOCK=block_size, S=stride, D=head_dim,
        BLOCK_R=block_r, BLOCK_D=block_d, T_CHUNK=t_chunk,
        UPCAST=_INTERPRETED or query.device.type != "cuda",
        PRECISION="tf32x3" if fp32_inputs else "tf32",
        num_warps=4,
    )  # fmt: skip
    return out


@torch.library.custom_op("flexpbs::antidiagonal_scores", mutates_args=())
def _scores_op(
    query: torch.Tensor,
    key_p: torch.Tensor,
    candidates: torch.Tensor,
    first_query: torch.Tensor,
    end_query: torch.Tensor,
    first_block: int,
    end_block: int,
    columns: int,
    block_size: int,
    stride: int,
    scale: float,
    lead: int,
) -> torch.Tensor:
    # An opaque op: torch.compile neither traces nor re-launches the kernel, and under the
    # interpreter a bare @triton.jit call inside a compiled function would fail.
    device = torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext()
    with device:
        return launch(
            query,
            key_p,
            first_block=first_block,
            end_block=end_block,
            columns=columns,
            candidates=candidates,
            block_size=block_size,
            stride=stride,
            scale=scale,
            lead=lead,
            first_query=first_query,
            end_query=end_query,
        )


@_scores_op.register_fake
def _scores_op_fake(query, key_p, candidates, first_query, end_query, first_block, end_block, columns,
                    block_size, stride, scale, lead):  # fmt: skip
    group = query.shape[1] // key_p.shape[1]
    rows = (end_block - first_block) * group
    return query.new_empty(query.shape[0], key_p.shape[1], rows, columns, dtype=torch.float32)


def triton_tile_scores(
    query: torch.Tensor,
    key_p: torch.Tensor,
    *,
    first_block: int,
    end_block: int,
    columns: int,
    bias: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    lead: int,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """:func:`flexpbs.antidiagonal.tile_scores` by the fused kernel; same arguments and result."""
    candidates = (bias == 0).sum(-1, dtype=torch.int32)
    if lengths is None:
        first = torch.full((1,), lead, dtype=torch.int64, device=query.device)
        end = first + query.shape[2]
    else:
        first, end = lengths.n_keys - lengths.n_queries, lengths.n_keys
    return _scores_op(
        query, key_p, candidates, first, end, first_block, end_block, columns, block_size, stride,
        float(scale), lead,
    )  # fmt: skip
