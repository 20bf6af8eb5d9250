"""Triton kernel for antidiagonal tile scores (PBS-Attn+).

Computes what :func:`flexpbs.antidiagonal.tile_scores` defines without holding any strided logits in
memory. One program takes a KV head, the query heads of its group (with several query blocks when the
group is small) and streams the candidate key blocks once, a tile of several key blocks at a time
(rows x columns of strided logits, from ``TILES``). A tile's logits are S dot products, one per offset t
of the antidiagonal, of the rows' queries at S-1-t with the columns' keys at t.

1. For each strided row, the running max and sum of ``exp2`` of its logits (online softmax), and for
   each key block the log-sum-exp of the row's logits over the block's strided columns, stored in the
   program's scratch (``[rows, key blocks]`` float32, R = B / S times fewer values than the logits).
2. With the row's normaliser known, each block's share is ``exp2(block lse - row lse)``; averaged over
   the strided rows that hold a query, one score per (query block, key block), written to the output.
   No second pass over the keys (the kernel before this one recomputed every logit for it).

The scratch of a launch is bounded by ``LIMITS.step_bytes``: query blocks go in several launches when
the programs of all of them would need more.

Candidates are a prefix of the key blocks (the blocks of earlier segments), so each program loops up to
the largest count of its query blocks; columns past a block's own count stay 0. Logits are in base 2
(``exp2``). This module imports Triton at the top; callers import it only when Triton is available.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flexpbs.kernels import count_variants
from flexpbs.kernels.strides import kernel_strides
from flexpbs.lengths import SequenceLengths
from flexpbs.limits import LIMITS

_LOG2E = math.log2(math.e)
# Read once, like triton.jit does when it decides whether to interpret the kernels below.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_logits(
    j0,
    kb,
    h,
    n_cand,
    n_cand_max,
    q_rows_ptr,
    q_rows,
    row_ok,
    q_first,
    q_end,
    k_base,
    n_keys,
    stride_qn,
    stride_kn,
    logit_scale,
    BLOCK: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` base-2 strided logits of the tile of key blocks from ``j0``: row m pairs
    aligned rows ``q_rows[m] + S-1-t`` (pointers ``q_rows_ptr[m]`` to aligned row 0 of its head) with
    the keys ``j * BLOCK + h * S + t`` of column n (key block ``j = j0 + kb[n]``, strided column
    ``h[n]``), t < S, over the D features. Rows outside ``[q_first, q_end)`` and keys past ``n_keys``
    count as zeros; -inf where the column is not a candidate of the row's query block."""
    j = j0 + kb
    col_ok = (h < R) & (j < n_cand_max)
    k_rows = j * BLOCK + h * S
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    CHUNKS: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    # one loop over (offset t, feature chunk): Triton pipelines a single loop, each of its loads in
    # num_stages buffers (an unrolled inner loop over chunks would buffer every chunk's loads)
    for step in range(0, S * CHUNKS):
        t = step // CHUNKS
        d0 = (step % CHUNKS) * BLOCK_D
        x = q_rows + (S - 1 - t)
        q_ok = row_ok & (x >= q_first) & (x < q_end)
        y = k_rows + t
        k_ok = col_ok & (y < n_keys)
        # int64 offsets: row * stride passes 2^31 at 512K keys in a [B, N, H, D] layout
        q_off = x.to(tl.int64) * stride_qn
        k_off = y.to(tl.int64) * stride_kn
        d_ok = (d0 + d) < D
        q_mask = q_ok[:, None] & d_ok[None, :]
        k_mask = k_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows_ptr[:, None] + q_off[:, None] + (d0 + d)[None, :], mask=q_mask, other=0.0)
        k = tl.load(k_base + k_off[:, None] + (d0 + d)[None, :], mask=k_mask, other=0.0)
        if UPCAST:
            q, k = q.to(tl.float32), k.to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    valid = col_ok[None, :] & (j[None, :] < n_cand[:, None])
    return tl.where(valid, acc * logit_scale, float("-inf"))


# Integer arguments that change with the prompt's length, the launch or the batch size are not
# specialised (Triton would compile a variant per divisibility by 16, or value 1, of each: a compile at
# the first call of a new length after the warm-up). The strides of q and K are: multiples of the head
# dim in any layout, or 0 for a dim of size 1, they let the loads vectorise and pipeline (unspecialised,
# every load was element-wise: 64 instead of 10 ms of selection at 128K on an H100).
_RUNTIME_ARGS = [
    "n_columns", "n_keys", "lead", "first_block", "n_blocks", "block_offset", "stride_ob", "stride_oh",
    "stride_or", "stride_fb",
]  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _antidiagonal_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    scratch_ptr,
    n_columns,
    candidates_ptr,
    first_ptr,
    end_ptr,
    n_keys,
    lead,
    first_block,
    n_blocks,
    block_offset,
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
    KV_HEADS: tl.constexpr,
    BLOCK: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    R_PAD: tl.constexpr,
    HEADS: tl.constexpr,
    QB: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    R: tl.constexpr = BLOCK // S
    BLOCK_M: tl.constexpr = QB * HEADS * R_PAD
    BLOCK_N: tl.constexpr = KB * R_PAD
    CHUNKS: tl.constexpr = (GROUP + HEADS - 1) // HEADS
    # the longest rows (most candidates) first: they bound the kernel's time
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (KV_HEADS * CHUNKS)
    kvh = (bh // CHUNKS) % KV_HEADS
    chunk = bh % CHUNKS

    # row m: query block i (QB per program), head g of the group (HEADS per program), strided row r
    m = tl.arange(0, BLOCK_M)
    i = pid * QB + m // (HEADS * R_PAD)
    g = chunk * HEADS + (m // R_PAD) % HEADS
    r = m % R_PAD
    row_ok = (i < n_blocks) & (g < GROUP) & (r < R)
    n_cand = tl.load(candidates_ptr + block_offset + i, mask=i < n_blocks, other=0)
    n_cand_max = tl.max(n_cand, 0)
    q_first = tl.load(first_ptr + b * stride_fb)
    q_end = tl.load(end_ptr + b * stride_fb)
    block_start = (first_block + i) * BLOCK
    q_rows = block_start + r * S  # aligned rows; aligned row x is query x - lead
    heads = (kvh * GROUP + g).to(tl.int64)
    q_rows_ptr = q_ptr + b.to(tl.int64) * stride_qb + heads * stride_qh - lead * stride_qn
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh

    # weight of a row: 1 / (rows of its block that hold a query), 0 for rows without one
    rr = tl.arange(0, R_PAD)
    starts = block_start[:, None] + rr[None, :] * S
    held_all = (rr < R)[None, :] & (starts + S > q_first) & (starts < q_end)
    n_held = tl.sum(held_all.to(tl.float32), 1)
    held = row_ok & (q_rows + S > q_first) & (q_rows < q_end)

    # column n: key block j0 + kb, strided column h
    n = tl.arange(0, BLOCK_N)
    kb = n // R_PAD
    h = n % R_PAD

    # this program's scratch: [BLOCK_M, n_columns] float32, one base-2 log-sum-exp per (row, key block)
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    scratch_rows = scratch_ptr + (program.to(tl.int64) * BLOCK_M + m.to(tl.int64)) * n_columns
    kbs = tl.arange(0, KB)

    for j0 in range(0, n_cand_max, KB):
        s = _tile_logits(
            j0, kb, h, n_cand, n_cand_max, q_rows_ptr, q_rows, row_ok, q_first, q_end, k_base, n_keys,
            stride_qn, stride_kn, logit_scale, BLOCK, S, D, R, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
        )  # fmt: skip
        # each key block's strided columns as one log-sum-exp: the row's normaliser is known only at
        # the end, and these stand for the logits then (R times fewer values, no second pass over keys);
        # the normaliser itself comes from them below (one exp2 per logit here, not two)
        blocks = tl.reshape(s, (BLOCK_M, KB, R_PAD))
        block_max = tl.max(blocks, 2)
        safe_block = tl.where(block_max == float("-inf"), 0.0, block_max)
        block_sum = tl.sum(tl.exp2(blocks - safe_block[:, :, None]), 2)
        # block_sum >= 1 where the block has a finite logit (its max contributes exp2(0)), else 0
        block_lse = safe_block + tl.log2(tl.maximum(block_sum, 1.0))
        lse = tl.where(block_max == float("-inf"), float("-inf"), block_lse)
        jj = j0 + kbs
        tl.store(scratch_rows[:, None] + jj[None, :], lse, mask=(jj < n_columns)[None, :])
    tl.debug_barrier()  # the loads below read what other threads of this program stored

    # each row's normaliser: the log-sum-exp of its blocks' log-sum-exps (R times fewer values than logits)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, n_cand_max, KB):
        jj = j0 + kbs
        lse = tl.load(
            scratch_rows[:, None] + jj[None, :], mask=(jj < n_cand_max)[None, :], other=float("-inf")
        )
        new_max = tl.maximum(row_max, tl.max(lse, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(lse - safe_max[:, None]), 1)
        row_max = new_max
    row_lse = tl.where(row_max == float("-inf"), 0.0, row_max + tl.log2(tl.maximum(row_sum, 1e-30)))
    weight = tl.where(held, 1.0 / tl.maximum(n_held, 1.0), 0.0)
    # output row (query block, head in group) of each (QB, HEADS) pair
    o = tl.arange(0, QB * HEADS)
    o_i = pid * QB + o // HEADS
    o_g = chunk * HEADS + o % HEADS
    o_cand = tl.load(candidates_ptr + block_offset + o_i, mask=o_i < n_blocks, other=0)
    o_ok = (o_i < n_blocks) & (o_g < GROUP)
    out_rows = (
        out_ptr
        + b.to(tl.int64) * stride_ob
        + kvh.to(tl.int64) * stride_oh
        + ((block_offset + o_i) * GROUP + o_g).to(tl.int64) * stride_or
    )
    for j0 in range(0, n_cand_max, KB):
        jj = j0 + kbs
        lse = tl.load(
            scratch_rows[:, None] + jj[None, :], mask=(jj < n_cand_max)[None, :], other=float("-inf")
        )
        p = tl.exp2(lse - row_lse[:, None]) * weight[:, None]  # exp2(-inf) = 0 off the candidates
        per_tile = tl.sum(tl.reshape(p, (QB * HEADS, R_PAD, KB)), 1)  # [QB * HEADS, KB]
        mask = o_ok[:, None] & (jj[None, :] < o_cand[:, None])
        tl.store(out_rows[:, None] + jj[None, :], per_tile, mask=mask)


# Programs per SM a launch gets at least (query blocks go in several launches to bound the scratch).
_MIN_PROGRAMS_PER_SM = 4

# Tile targets, largest first, the first whose loads fit the device's shared memory: rows (strided rows
# x heads x query blocks) and columns (strided columns x key blocks) of one program's logit tile, the
# feature chunk, the pipeline depth and the warps. More rows mean fewer passes over the keys, more
# columns fewer reloads of the query rows; 64-wide feature chunks leave room for 256 columns in 4 stages.
# At 128K on an H100 (bench/RESULTS.md, session 13), strides 32 / 16 / 8: 128 x 256 / 64 / 4 stages / 16
# warps 5.90 / 13.40 / 25.03 ms; in 3 stages 6.18 / 13.45 / 25.42 (fits an A100's 163 KB); 128 x 128 /
# 128 / 3 / 8, the tiles before, 8.80 / 16.77 / 28.75. 512 columns failed in ptxas. The last fits ~100 KB.
TILES = ((128, 256, 64, 4, 16), (128, 256, 64, 3, 16), (128, 128, 128, 2, 8), (64, 128, 64, 2, 4))


def tile_shape(group: int, per_block: int, head_dim: int, elem_bytes: int, shared_bytes: int | None) -> dict:
    """Constexprs, warps and stages of the kernel; ``shared_bytes``: the device's shared memory per
    block (None: no limit, the interpreter)."""
    r_pad = triton.next_power_of_2(per_block)
    g_pad = triton.next_power_of_2(group)
    for tile_rows, tile_columns, chunk, stages, target_warps in TILES:
        heads = min(g_pad, max(1, tile_rows // r_pad))
        query_blocks = max(1, tile_rows // (heads * r_pad)) if heads == g_pad else 1
        if query_blocks * heads * r_pad < 16:  # tl.dot needs 16 rows
            query_blocks = 16 // (heads * r_pad)
        columns = tile_columns if elem_bytes <= 2 else tile_columns // 2
        key_blocks = max(1, columns // r_pad, 16 // r_pad)
        rows, cols = query_blocks * heads * r_pad, key_blocks * r_pad
        block_d = max(16, min(triton.next_power_of_2(head_dim), chunk if elem_bytes <= 2 else chunk // 2))
        # each stage holds a [rows, BLOCK_D] query tile and a [cols, BLOCK_D] key tile
        # a tile smaller than its target (fp32, small groups) gets fewer warps, at least 4
        warps = max(4, min(target_warps, target_warps * rows * cols // (tile_rows * tile_columns)))
        if shared_bytes is None or stages * (rows + cols) * block_d * elem_bytes <= shared_bytes:
            break
    return dict(
        R_PAD=r_pad,
        HEADS=heads,
        QB=query_blocks,
        KB=key_blocks,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=stages,
    )


class LaunchPlan(NamedTuple):
    tile: dict  # tile_shape's constexprs, warps and stages
    head_programs: int  # programs per query-block group: batch x KV heads x head chunks of the group
    per_launch: int  # query blocks per launch
    scratch_elements: int  # float32 log-sum-exps of the scratch all launches reuse


def launch_plan(
    batch: int,
    q_heads: int,
    perm_heads: int,
    blocks: int,
    columns: int,
    block_size: int,
    stride: int,
    head_dim: int,
    elem_bytes: int,
    shared_bytes: int | None,
    sms: int | None,
) -> LaunchPlan:
    """How :func:`launch` splits ``blocks`` query blocks over ``columns`` key blocks into launches,
    on a device with ``shared_bytes`` of shared memory per block and ``sms`` SMs (None: the interpreter).

    Each program keeps one log-sum-exp per (row, key block) in a scratch of its own, so the query
    blocks go in launches whose scratch stays within ``LIMITS.step_bytes``, reused by the next launch;
    a launch still gets a few programs per SM (its scratch then passes the step: long prompts)."""
    group = q_heads // perm_heads
    tile = tile_shape(group, block_size // stride, head_dim, elem_bytes, shared_bytes)
    rows = tile["QB"] * tile["HEADS"] * tile["R_PAD"]
    head_programs = batch * perm_heads * triton.cdiv(group, tile["HEADS"])
    program_bytes = rows * max(columns, 1) * 4
    groups = LIMITS.step_bytes // (head_programs * program_bytes)
    if sms is not None:
        groups = max(groups, triton.cdiv(_MIN_PROGRAMS_PER_SM * sms, head_programs))
    per_launch = min(max(1, groups) * tile["QB"], triton.cdiv(blocks, tile["QB"]) * tile["QB"])
    scratch = triton.cdiv(per_launch, tile["QB"]) * head_programs * rows * max(columns, 1)
    return LaunchPlan(tile, head_programs, per_launch, scratch)


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
    if query.is_cuda:
        props = torch.cuda.get_device_properties(query.device)
        shared, sms = props.shared_memory_per_block_optin, props.multi_processor_count
    else:
        shared, sms = None, None
    plan = launch_plan(
        batch,
        q_heads,
        perm_heads,
        blocks,
        columns,
        block_size,
        stride,
        head_dim,
        query.element_size(),
        shared,
        sms,
    )
    tile, per_launch = plan.tile, plan.per_launch
    scratch = torch.empty(plan.scratch_elements, dtype=torch.float32, device=query.device)
    q_strides, k_strides, out_strides = (kernel_strides(x)[:3] for x in (query, key_p, out))
    for b0 in range(0, blocks, per_launch):
        b1 = min(b0 + per_launch, blocks)
        grid = (triton.cdiv(b1 - b0, tile["QB"]), plan.head_programs)
        # whole tensors and the launch's first block: slices would change the pointers' alignment
        _antidiagonal_kernel[grid](
            query, key_p, out, scratch, max(columns, 1), candidates, first_query, end_query,
            key_p.shape[2], lead, first_block + b0, b1 - b0, b0, scale / stride * _LOG2E,
            *q_strides, *k_strides, *out_strides,
            0 if first_query.shape[0] == 1 else first_query.stride(0),
            GROUP=group, KV_HEADS=perm_heads, BLOCK=block_size, S=stride, D=head_dim, **tile,
            UPCAST=_INTERPRETED or query.device.type != "cuda",
            PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32",
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


def compiled_variants() -> int:
    """Compiled variants of the antidiagonal kernel in this process (Triton compiles one per
    specialisation of its arguments): counts what a call at a new shape compiled."""
    return count_variants(_antidiagonal_kernel)
