"""GPU-only checks of the Triton importance kernel (not collected by the CPU suite): ``pytest tests_gpu``."""

import pytest
import torch

from flexpbs.importance import last_block_importance
from flexpbs.kernels.importance import triton_last_block_importance
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")

TOL = dict(rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "dtype, head_dim",
    [
        (torch.float32, 128),
        (torch.float32, 256),
        (torch.bfloat16, 128),
        (torch.float16, 64),
        (torch.bfloat16, 100),
        (torch.bfloat16, 256),
    ],
)
def test_long_input_with_default_key_splits(dtype, head_dim):
    case = Case(
        batch=2,
        kv_heads=2,
        group=4,
        seq_len=20000,
        head_dim=head_dim,
        block_size=128,
        segment_size=256,
        seed=5,
    )
    q, k, _ = make_qkv(case, dtype)
    q, k = q.cuda(), k.cuda()
    args = dict(block_size=128, segment_size=256, scale=head_dim**-0.5)
    for per_query_head in (False, True):  # long inputs: the kernel splits keys across programs
        got = triton_last_block_importance(q, k, **args, per_query_head=per_query_head)
        want = last_block_importance(q, k, **args, per_query_head=per_query_head)
        torch.testing.assert_close(got, want, **TOL)


def _scaled_last_block_importance(dtype, magnitude: float, outlier: float) -> torch.Tensor:
    case = Case(
        batch=1, kv_heads=2, group=4, seq_len=32768, head_dim=128, block_size=128, segment_size=256, seed=4
    )
    q, k, _ = make_qkv(case, torch.float32)
    q, k = q * magnitude, k * magnitude
    q[..., :4] *= outlier  # outlier channels
    k[..., :4] *= outlier
    q, k = q.to(dtype).cuda(), k.to(dtype).cuda()
    args = dict(block_size=128, segment_size=256, scale=128**-0.5, per_query_head=False)
    return triton_last_block_importance(q, k, **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_logits_stay_finite(dtype):
    """Base-2 logits ~5e9: the recomputed logits of pass 2 round differently from pass 1's (fp32
    spacing 512 there), so the mass no longer sums to 1 (README), but it stays finite and >= 0."""
    got = _scaled_last_block_importance(dtype, 1e3, 50.0)
    assert torch.isfinite(got).all() and (got >= 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_logits_keep_unit_mass(dtype):
    """Base-2 logits ~1e4 with outlier channels: each head's importance still sums to 1."""
    got = _scaled_last_block_importance(dtype, 30.0, 3.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), rtol=1e-3, atol=1e-3)
