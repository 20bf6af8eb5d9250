import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.importance import last_block_importance
from tests.helpers import cases, make_qkv


@settings(max_examples=60)
@given(case=cases(), gqa=st.sampled_from(["shared", "per_head"]))
def test_importance_matches_reference(case, gqa):
    if case.seq_len < case.segment_size:
        return
    q, k, _ = make_qkv(case)
    cfg = PBSConfig(block_size=case.block_size, segment_size=case.segment_size, gqa=gqa)
    got = last_block_importance(
        q,
        k,
        block_size=case.block_size,
        segment_size=case.segment_size,
        scale=case.head_dim**-0.5,
        per_query_head=gqa == "per_head",
    )
    want = reference.importance(q, k, cfg)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Each head's row is a mean of softmax rows over the complete segments: it sums to one.
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 4096, 2**20])
def test_chunked_importance_equals_unchunked(budget):
    torch.manual_seed(1)
    q, k = torch.randn(2, 8, 600, 32), torch.randn(2, 2, 600, 32)
    args = dict(block_size=128, segment_size=128, scale=0.2, per_query_head=True)
    whole = last_block_importance(q, k, **args)
    with flexpbs.limits.override(step_bytes=budget):
        chunked = last_block_importance(q, k, **args)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-8)


def test_importance_reads_half_precision_in_float32():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 512, 64), torch.randn(1, 1, 512, 64)
    args = dict(block_size=128, segment_size=256, scale=0.125, per_query_head=False)
    full = last_block_importance(q, k, **args)
    for dtype in (torch.bfloat16, torch.float16):
        half = last_block_importance(q.to(dtype), k.to(dtype), **args)
        exact_inputs = last_block_importance(q.to(dtype).float(), k.to(dtype).float(), **args)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, exact_inputs, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(half, full, rtol=0.1, atol=1e-4)
