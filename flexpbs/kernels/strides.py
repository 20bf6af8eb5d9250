"""The strides the Triton kernels take: one compiled variant for every length and batch size."""

from __future__ import annotations

import torch


def kernel_strides(x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s strides with 0 for a dim of size 1 (its index is always 0).

    A batch of one past 2^31 elements (a 512K-token query of 32 heads) would otherwise pass a 64-bit
    argument, which Triton compiles as a variant of its own, and PyTorch gives size-1 dims arbitrary
    strides (another divisibility class). The other strides are multiples of the head dim in any layout,
    and the kernels let Triton specialise them: a stride of unknown divisibility would make every q/K
    load element-wise and unpipelined.
    """
    return tuple(0 if size == 1 else stride for size, stride in zip(x.shape, x.stride(), strict=True))
