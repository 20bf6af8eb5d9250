"""Token rows between packed tensors and frames: the copies that lay out a packed batch.

A packed tensor ``[T, H, D]`` holds one token per row; a frame ``[B, H, L, D]`` holds sequence b's
tokens at rows ``b * L + position`` (:mod:`flexpbs.lengths`). :func:`copy_rows` copies whole rows (D
contiguous elements per head) from listed source rows to listed destination rows; on CUDA with the
Triton kernel of :mod:`flexpbs.kernels.rows`, elsewhere with advanced indexing (the reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flexpbs.importance import triton_importable
from flexpbs.kernels.strides import kernel_strides


class RowLayout(NamedTuple):
    """How row r of head h of a tensor is addressed, in elements: ``(r // length) * stride_b + (r %
    length) * stride_l + h * stride_h``, the D elements of a row contiguous; ``batch`` blocks of
    ``length`` rows."""

    batch: int
    length: int
    stride_b: int
    stride_l: int
    stride_h: int


def packed_layout(x: torch.Tensor) -> RowLayout:
    """``[T, H, D]`` (any row and head strides, D contiguous): one block of T rows."""
    stride_t, stride_h, _ = kernel_strides(x)
    return RowLayout(1, max(1, x.shape[0]), 0, stride_t, stride_h)


def frame_layout(x: torch.Tensor) -> RowLayout:
    """``[B, H, L, D]`` (D contiguous): rows ``b * L + l``. The strides of size-1 dims are 0
    (:func:`flexpbs.kernels.strides.kernel_strides`): a batch of one past 2^31 elements would otherwise
    pass the row kernel a 64-bit stride, a compiled variant of its own."""
    stride_b, stride_h, stride_l, _ = kernel_strides(x)
    return RowLayout(x.shape[0], max(1, x.shape[2]), stride_b, stride_l, stride_h)


def copy_rows(
    src: torch.Tensor,
    src_layout: RowLayout,
    src_rows: torch.Tensor,
    dst: torch.Tensor,
    dst_layout: RowLayout,
    dst_rows: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
) -> None:
    """``dst`` row ``dst_rows[i]`` (row ``i`` when None) = ``src`` row ``src_rows[i]`` for every head,
    zeros where ``src_rows[i]`` is negative.

    Args:
        src, dst: tensors of the same dtype and device whose last dim (D) is contiguous, laid out as
            their layouts state (:func:`packed_layout`, :func:`frame_layout`), heads on dim -2 of a
            packed tensor and dim 1 of a frame, as many in both.
        src_rows, dst_rows: ``[n]`` int64 on their device; destination rows are distinct.
        kernel: ``"auto"`` (the Triton kernel on CUDA), ``"triton"`` (on CPU it needs the Triton
            interpreter) or ``"torch"``.
    """
    heads, head_dim = src.shape[1], src.shape[-1]  # heads on dim 1 of both layouts
    rows_contiguous = src.stride(-1) == 1 and dst.stride(-1) == 1
    if kernel == "triton" or (kernel == "auto" and src.is_cuda and rows_contiguous and triton_importable()):
        from flexpbs.kernels.rows import triton_copy_rows

        triton_copy_rows(src, src_layout, src_rows, dst, dst_layout, dst_rows, heads, head_dim)
        return
    source, existing = _blocks(src, src_layout, heads, head_dim), src_rows.clamp_min(0)
    picked = source[existing // src_layout.length, existing % src_layout.length]
    picked = picked.masked_fill((src_rows < 0)[:, None, None], 0)
    target = _blocks(dst, dst_layout, heads, head_dim)
    rows = torch.arange(src_rows.shape[0], device=dst.device) if dst_rows is None else dst_rows
    target[rows // dst_layout.length, rows % dst_layout.length] = picked


def to_frame(
    src: torch.Tensor, src_layout: RowLayout, source: torch.Tensor, batch: int, frame: int
) -> torch.Tensor:
    """A new ``[batch, H, frame, D]`` frame of ``src``'s rows (``src``: heads on dim 1, as
    :func:`copy_rows` takes it): slot ``b * frame + p`` holds row ``source[b * frame + p]``, zeros where
    it is -1. Each slot is written once (no zero fill first)."""
    out = src.new_empty(batch, src.shape[1], frame, src.shape[-1])
    copy_rows(src, src_layout, source, out, frame_layout(out))
    return out


def copy_tensor_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[...] = src`` for ``[B, H, L, D]`` tensors of any strides whose D is contiguous: on CUDA by
    :func:`copy_rows`'s kernel, about twice as fast as PyTorch's copy between such layouts (a ``[B, N, H,
    D]`` tensor seen as ``[B, H, N, D]``, as transformers passes queries and takes outputs)."""
    rows = src.shape[0] * src.shape[2]
    if not src.is_cuda or src.stride(-1) != 1 or dst.stride(-1) != 1 or rows == 0 or not triton_importable():
        dst.copy_(src)
        return
    copy_rows(src, frame_layout(src), torch.arange(rows, device=src.device), dst, frame_layout(dst))


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` as a contiguous tensor: ``x`` itself when it is one, else a copy by
    :func:`copy_tensor_rows`."""
    if x.is_contiguous():
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    copy_tensor_rows(x, out)
    return out


def padded_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``x [B, H, L, D]`` with ``before`` zero rows ahead of its L and ``after`` behind them, contiguous:
    ``F.pad``, whose copy of a non-contiguous ``x`` is PyTorch's, is used only for contiguous ones."""
    if x.is_contiguous() or not x.is_cuda:
        return F.pad(x, (0, 0, before, after))
    out = x.new_empty(x.shape[0], x.shape[1], before + x.shape[2] + after, x.shape[3])
    out[:, :, :before].zero_()
    out[:, :, before + x.shape[2] :].zero_()
    copy_tensor_rows(x, out[:, :, before : before + x.shape[2]])
    return out


def _blocks(x: torch.Tensor, layout: RowLayout, heads: int, head_dim: int) -> torch.Tensor:
    """``x`` as a ``[batch, length, H, D]`` view of its storage."""
    return x.as_strided(
        (layout.batch, layout.length, heads, head_dim),
        (layout.stride_b, layout.stride_l, layout.stride_h, 1),
    )


def compile_copy_rows(dtype: torch.dtype, device: torch.device, head_dims: set[int]) -> None:
    """Compiles :func:`copy_rows`'s kernel for ``dtype`` and these head dims on CUDA (one variant serves
    both directions), so that a packed batch's first call compiles nothing; no-op elsewhere."""
    if device.type != "cuda" or not triton_importable():
        return
    for head_dim in sorted(head_dims):
        src = torch.zeros(2, 2, head_dim, dtype=dtype, device=device)
        dst = torch.zeros(1, 2, 2, head_dim, dtype=dtype, device=device)
        rows = torch.arange(2, device=device)
        copy_rows(src, packed_layout(src), rows, dst, frame_layout(dst))  # to a frame
        copy_rows(dst, frame_layout(dst), rows, src, packed_layout(src), rows)  # back
