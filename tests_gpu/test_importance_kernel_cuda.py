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
        batch=2, kv_heads=2, group=4, seq_len=20000, head_dim=head_dim, block_size=128, segment_size=256, seed=5
    )
    q, k, _ = make_qkv(case, dtype)
    q, k = q.cuda(), k.cuda()
    args = dict(block_size=128, segment_size=256, scale=head_dim**-0.5)
    for per_query_head in (False, True):  # long inputs: the kernel splits keys across programs
        got = triton_last_block_importance(q, k, **args, per_query_head=per_query_head)
        want = last_block_importance(q, k, **args, per_query_head=per_query_head)
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_logits_stay_finite(dtype):
    """Logits ~1e9: recomputed logits may exceed the row's lse by fp32 rounding (clamped)."""
    case = Case(batch=1, kv_heads=2, group=4, seq_len=32768, head_dim=128, block_size=128, segment_size=256, seed=4)
    q, k, _ = make_qkv(case, torch.float32)
    q, k = q * 1e3, k * 1e3
    q[..., :4] *= 50  # outlier channels
    k[..., :4] *= 50
    q, k = q.to(dtype).cuda(), k.to(dtype).cuda()
    args = dict(block_size=128, segment_size=256, scale=128**-0.5, per_query_head=False)
    got = triton_last_block_importance(q, k, **args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), rtol=1e-3, atol=1e-3)
