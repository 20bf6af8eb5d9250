"""flexpbs.rows.copy_rows: the Triton kernel (interpreted on CPU) moves the rows advanced indexing moves."""

import pytest
import torch

from flexpbs.rows import (
    contiguous_rows,
    copy_rows,
    copy_tensor_rows,
    frame_layout,
    packed_layout,
    padded_rows,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_packed_to_frame_and_back(dtype, head_dim):
    gen = torch.Generator().manual_seed(0)
    tokens, heads, batch, frame = 37, 6, 3, 20
    packed = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    # every slot of the frame: a packed row, or -1 (zeros); a head slice of the packed tensor
    source = torch.randint(-1, tokens, (batch * frame,), generator=gen)
    part = packed[:, 1:4]
    frames = {}
    for kernel in ("torch", "triton"):
        out = torch.full((batch, 3, frame, head_dim), float("nan"), dtype=dtype)
        copy_rows(part, packed_layout(part), source, out, frame_layout(out), kernel=kernel)
        frames[kernel] = out
    want = part[source.clamp_min(0)].masked_fill((source < 0)[:, None, None], 0)
    want = want.view(batch, frame, 3, head_dim).transpose(1, 2)
    assert torch.equal(frames["torch"], want) and torch.equal(frames["triton"], want)

    # back: some slots' rows into listed rows of a head slice of a packed output
    slots = torch.randperm(batch * frame, generator=gen)[:11]
    rows = torch.randperm(tokens, generator=gen)[:11]
    outs = {}
    for kernel in ("torch", "triton"):
        packed_out = torch.zeros(tokens, heads, head_dim, dtype=dtype)
        target = packed_out[:, 2:5]
        copy_rows(want, frame_layout(want), slots, target, packed_layout(target), rows, kernel=kernel)
        outs[kernel] = packed_out
    expected = torch.zeros(tokens, heads, head_dim, dtype=dtype)
    expected[rows, 2:5] = want.transpose(1, 2).reshape(batch * frame, 3, head_dim)[slots]
    assert torch.equal(outs["torch"], expected) and torch.equal(outs["triton"], expected)


def test_destination_rows_default_to_the_listed_order():
    packed = torch.arange(5 * 2 * 16, dtype=torch.float32).view(5, 2, 16)
    frame = torch.arange(2 * 2 * 4 * 16, dtype=torch.float32).view(2, 2, 4, 16)
    slots = torch.tensor([7, 0, 4, 3, 5])  # b * 4 + position
    for kernel in ("torch", "triton"):
        out = torch.zeros_like(packed)
        copy_rows(frame, frame_layout(frame), slots, out, packed_layout(out), kernel=kernel)
        assert torch.equal(out, frame.transpose(1, 2).reshape(8, 2, 16)[slots])


def test_a_strided_view_copies_to_contiguous_rows():
    # a [B, N, H, D] projection seen as [B, H, N, D] (transformers' layout): rows b * N + n
    view = torch.randn(2, 37, 6, 16, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    rows = torch.arange(2 * 37)
    for kernel in ("torch", "triton"):
        out = torch.full(view.shape, float("nan"))
        copy_rows(view, frame_layout(view), rows, out, frame_layout(out), kernel=kernel)
        assert torch.equal(out, view.contiguous())
    got = contiguous_rows(view)  # on the CPU PyTorch's copy; on CUDA the kernel (tests_gpu)
    assert got.is_contiguous() and torch.equal(got, view)
    contiguous = view.contiguous()
    assert contiguous_rows(contiguous) is contiguous
    want = torch.nn.functional.pad(view, (0, 0, 3, 5))
    assert torch.equal(padded_rows(view, 3, 5), want)  # on CUDA by the kernel (tests_gpu)
    back = torch.zeros(2, 37, 6, 16)  # and back into the [B, N, H, D] layout
    copy_tensor_rows(contiguous, back.transpose(1, 2))
    assert torch.equal(back.transpose(1, 2), view)
