"""GPU-only checks of chunked prefill and padded batches (not in the CPU suite): ``pytest tests_gpu``."""

import pytest
import torch

import flexpbs
from flexpbs import reference
from flexpbs.importance import last_block_importance
from flexpbs.kernels.importance import triton_last_block_importance
from tests.helpers import Case, make_qkv, sdpa_causal

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n_queries", [4096, 3000, 1000, 1])
def test_chunk_at_threshold_one_equals_dense_on_cuda(dtype, atol, n_queries):
    case = Case(
        batch=2,
        kv_heads=2,
        group=4,
        seq_len=8200,
        head_dim=128,
        block_size=128,
        segment_size=256,
        seed=n_queries,
        sharpness=2.0,
    )
    q, k, v = (x.cuda() for x in make_qkv(case, dtype))
    q = q[:, :, case.seq_len - n_queries :]
    out, stats = flexpbs.attention(q, k, v, threshold=1.0, min_seq_len=0, return_stats=True)
    assert stats.importance_kernel == "triton"
    want = sdpa_causal(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(out.float().cpu(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("n_queries", [700, 257])
def test_chunk_equals_the_reference_on_cuda(n_queries):
    case = Case(
        batch=1,
        kv_heads=2,
        group=2,
        seq_len=1500,
        head_dim=64,
        block_size=128,
        segment_size=256,
        seed=3,
        sharpness=3.0,
    )
    q, k, v = (x.cuda() for x in make_qkv(case))
    q = q[:, :, case.seq_len - n_queries :]
    out, stats = flexpbs.attention(q, k, v, threshold=0.7, min_seq_len=0, return_stats=True)
    mask = reference.token_mask(stats.tiles, stats.key_positions, 128, n_queries)
    want = reference.masked_attention(q, k, v, mask, 64**-0.5)
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=1e-4)


def test_padded_batch_on_cuda():
    case = Case(
        batch=3,
        kv_heads=2,
        group=4,
        seq_len=3000,
        head_dim=128,
        block_size=128,
        segment_size=256,
        seed=1,
        sharpness=2.0,
    )
    q, k, v = (x.cuda() for x in make_qkv(case, torch.bfloat16))
    valid = torch.ones(3, 3000, dtype=torch.bool, device="cuda")
    valid[1, :700] = False  # left
    valid[2, 2500:] = False  # right
    out = flexpbs.attention(q, k, v, valid_keys=valid, threshold=1.0, min_seq_len=0)
    want = sdpa_causal(q.cpu(), k.cpu(), v.cpu(), valid_keys=valid.cpu())
    real = valid.cpu()[:, None, :, None].expand_as(want)
    torch.testing.assert_close(out.float().cpu()[real], want[real], rtol=0, atol=3e-2)
    assert (out[1, :, :700] == 0).all() and (out[2, :, 2500:] == 0).all()


@pytest.mark.parametrize("n_queries", [1, 100, 5000])
def test_kernel_on_chunks(n_queries):
    case = Case(
        batch=1, kv_heads=2, group=4, seq_len=20000, head_dim=128, block_size=128, segment_size=256, seed=2
    )
    q, k, _ = make_qkv(case, torch.bfloat16)
    q, k = q[:, :, 20000 - n_queries :].cuda(), k.cuda()
    args = dict(block_size=128, segment_size=256, scale=128**-0.5, per_query_head=False)
    got = triton_last_block_importance(q, k, **args)
    torch.testing.assert_close(got, last_block_importance(q, k, **args), rtol=1e-4, atol=1e-7)
