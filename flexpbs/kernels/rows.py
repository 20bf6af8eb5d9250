"""Triton kernel moving whole token rows between packed tensors and frames (:func:`flexpbs.rows.copy_rows`).

One program copies a tile of rows of one head: it reads the rows' indices, then each row's D contiguous
elements, and writes them to their destination rows, addressed as :class:`flexpbs.rows.RowLayout`
states; a negative source row writes zeros (a frame's padding). PyTorch's advanced indexing moves such
rows element by element, several times slower on the GPU (bench/RESULTS.md, session 9).

This module imports Triton at the top; callers import it only when Triton is available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexpbs.kernels import count_variants
from flexpbs.rows import RowLayout

_ROWS_PER_PROGRAM = 32


# Row counts and lengths change with every batch: not specialised on (a compile per value class).
# Strides are multiples of the head dim (a compile per divisibility class at most). Both directions
# (to a frame: destination rows in order; back: listed) share one compiled variant: dst_identity is
# a runtime flag, not specialised either.
@triton.jit(do_not_specialize=["n_rows", "src_len", "dst_len", "dst_identity"])
def _copy_rows_kernel(
    src,
    dst,
    src_rows,
    dst_rows,
    n_rows,
    src_len,
    src_sb,
    src_sl,
    src_sh,
    dst_len,
    dst_sb,
    dst_sl,
    dst_sh,
    dst_identity,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = i < n_rows
    s = tl.load(src_rows + i, mask=in_range, other=-1)
    if dst_identity != 0:
        r = i
    else:
        r = tl.load(dst_rows + i, mask=in_range, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    s_safe = tl.maximum(s, 0)
    src_off = (s_safe // src_len) * src_sb + (s_safe % src_len) * src_sl + head * src_sh
    dst_off = (r // dst_len) * dst_sb + (r % dst_len) * dst_sl + head * dst_sh
    load_ok = ((s >= 0) & in_range)[:, None] & d_ok[None, :]
    x = tl.load(src + src_off[:, None] + d[None, :], mask=load_ok, other=0)
    tl.store(dst + dst_off[:, None] + d[None, :], x, mask=in_range[:, None] & d_ok[None, :])


def triton_copy_rows(
    src: torch.Tensor,
    src_layout: RowLayout,
    src_rows: torch.Tensor,
    dst: torch.Tensor,
    dst_layout: RowLayout,
    dst_rows: torch.Tensor | None,
    heads: int,
    head_dim: int,
) -> None:
    """``dst`` row ``dst_rows[i]`` (``i`` when None) of every head = ``src`` row ``src_rows[i]``, zeros
    where it is negative. Rows int64 ``[n]`` on the tensors' device."""
    n = src_rows.shape[0]
    if n == 0 or heads == 0:
        return
    grid = (triton.cdiv(n, _ROWS_PER_PROGRAM), heads)
    _copy_rows_kernel[grid](
        src,
        dst,
        src_rows,
        src_rows if dst_rows is None else dst_rows,
        n,
        *src_layout[1:],
        *dst_layout[1:],
        int(dst_rows is None),
        HEAD_DIM=head_dim,
        BLOCK_R=_ROWS_PER_PROGRAM,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


def compiled_variants() -> int:
    """Compiled variants of the row-copy kernel in this process: counts what a call compiled."""
    return count_variants(_copy_rows_kernel)
