"""The defaults on the GPU: dense SDPA below the measured break-even, PBS above it."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexpbs
from flexpbs.dispatch import BREAK_EVEN, FALLBACK_BREAK_EVEN
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")


def break_even() -> int:
    return BREAK_EVEN.get(torch.cuda.get_device_capability(), {}).get("triton", FALLBACK_BREAK_EVEN)


@pytest.mark.parametrize("n", [2048, 5000])
def test_short_inputs_equal_sdpa_cudnn(n):
    assert n < break_even()
    case = Case(
        batch=1, kv_heads=2, group=4, seq_len=n, head_dim=128, block_size=128, segment_size=256, seed=n
    )
    q, k, v = (x.cuda() for x in make_qkv(case, torch.bfloat16))
    out, stats = flexpbs.attention(q, k, v, backend="triton", return_stats=True)
    assert stats.dense and stats.backend is None
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, want)


def test_long_inputs_run_pbs_by_default():
    n = break_even()
    case = Case(
        batch=1, kv_heads=2, group=4, seq_len=n, head_dim=128, block_size=128, segment_size=256, seed=1
    )
    q, k, v = (x.cuda() for x in make_qkv(case, torch.bfloat16))
    _, stats = flexpbs.attention(q, k, v, return_stats=True)
    assert not stats.dense and stats.backend in ("triton", "flash")
    _, stats = flexpbs.attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], backend="triton", return_stats=True)
    assert stats.dense  # one key short of the break-even
