"""First-call latency on the CPU: new lengths and chunks reuse compiled graphs; the user's own compiled
flex_attention keeps its recompile budget. Compilations are counted (dynamo's graph counter), not timed."""

import itertools

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexpbs
from tests.helpers import Case, make_qkv, sdpa_causal


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def chunk(q_len: int, n: int, seed: int, kv_heads: int = 2):
    q, k, v = make_qkv(Case(1, kv_heads, 2, n, 64, 128, 256, seed=seed, sharpness=2.0))
    return q[:, :, n - q_len :], k, v


def test_after_one_call_at_4096_shorter_lengths_and_chunks_compile_nothing():
    flexpbs.attention(*chunk(4096, 4096, seed=0), threshold=0.8)
    before = graphs()
    # one KV head at batch 1 (MQA models, the pipeline's head chunks) folds to a batch of 1: same graph
    for seed, (q_len, n, kv_heads) in enumerate(
        [
            (3000, 3000, 2),
            (3500, 3500, 2),
            (2600, 2600, 2),
            (1024, 3000, 2),
            (777, 3333, 2),
            (2, 4096, 2),
            (2049, 2049, 2),
            (300, 1000, 2),
            (3000, 3000, 1),
            (2944, 2944, 1),
            (129, 3001, 1),
            (1, 2500, 1),
        ]
    ):
        q, k, v = chunk(q_len, n, seed, kv_heads)
        out, stats = flexpbs.attention(q, k, v, threshold=0.8, return_stats=True)
        assert not stats.dense
        want = flexpbs.attention(q, k, v, threshold=1.0)  # the same graph, every tile
        torch.testing.assert_close(want, sdpa_causal(q, k, v), rtol=0, atol=3e-5)
        assert out.shape == q.shape
    assert graphs() == before


def test_warmup_prepares_the_cpu_graphs_up_to_max_seq_len():
    options = dict(block_size=64, segment_size=128, threshold=0.7)
    flexpbs.warmup(2, 1, 32, dtype=torch.float32, device="cpu", max_seq_len=6000, **options)
    before = graphs()
    for n_queries, n in [(6000, 6000), (5000, 5000), (129, 4500), (1, 4097)]:
        q, k, v = make_qkv(Case(1, 1, 2, n, 32, 64, 128, seed=n))
        flexpbs.attention(q[:, :, n - n_queries :], k, v, **options)
    assert graphs() == before


def test_single_permutation_rows_share_the_graph():
    # Batch 1 with one KV head (MQA, or one KV head per chunk) is a single row of the folded batch: the
    # graph, first traced with one row, serves it without a copy or a graph of its own.
    options = dict(block_size=64, segment_size=128)
    flexpbs.warmup(4, 2, 16, dtype=torch.float32, device="cpu", **options, threshold=0.7)
    before = graphs()
    for n_queries, n, kv_heads in [(3000, 3000, 1), (100, 2000, 1), (700, 700, 2), (1, 900, 1)]:
        q, k, v = make_qkv(Case(1, kv_heads, 2, n, 16, 64, 128, seed=n))
        q = q[:, :, n - n_queries :]
        out = flexpbs.attention(q, k, v, **options, threshold=1.0)
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=3e-5)
    with flexpbs.limits.override(min_chunk_bytes=0, chunk_share=0.0):  # chunks of one KV head
        q, k, v = make_qkv(Case(1, 2, 2, 1500, 16, 64, 128, seed=5))
        out = flexpbs.attention(q, k, v, **options, threshold=1.0)
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=3e-5)
    assert graphs() == before


def test_after_warmup_packed_and_padded_batches_compile_nothing():
    options = dict(block_size=64, segment_size=128, threshold=0.7)
    flexpbs.warmup(4, 2, 16, dtype=torch.float32, device="cpu", **options)
    before = graphs()
    gen = torch.Generator().manual_seed(0)
    lengths = [900, 300, 1500]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 16, generator=gen) for h in (4, 2, 2))
    out = flexpbs.varlen_attention(q, k, v, cu, cu, **options)
    assert out.shape == q.shape and torch.isfinite(out).all()
    q, k, v = (torch.randn(2, h, 1500, 16, generator=gen) for h in (4, 2, 2))
    valid = torch.arange(1500) < torch.tensor([[1500], [700]])
    out = flexpbs.attention(q, k, v, valid_keys=valid, **options)
    assert torch.isfinite(out[1, :, :700]).all()
    assert graphs() == before


def test_warmup_rejects_bad_shapes():
    with pytest.raises(ValueError, match="query_heads 3 must be a multiple of kv_heads 2"):
        flexpbs.warmup(3, 2, 64, device="cpu")
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        flexpbs.warmup(4, 2, 0, device="cpu")
    with pytest.raises(ValueError, match="threshold"):
        flexpbs.warmup(4, 2, 64, device="cpu", threshold=2.0)


@torch._dynamo.config.patch(recompile_limit=2)
def test_the_users_compiled_flex_attention_keeps_its_recompile_budget():
    """flexpbs's graphs live on its own function: a user who compiles flex_attention with a small
    recompile limit still gets compiled (not eager) kernels after flexpbs compiled several graphs."""
    for dtype in (torch.float32, torch.bfloat16):
        flexpbs.attention(*(x.to(dtype) for x in chunk(2000, 2000, seed=1)), threshold=0.8)
    assert torch._dynamo.config.recompile_limit == 2  # flexpbs raised it for its own calls only
    user_flex = torch.compile(flex_attention, dynamic=False)
    for n in (256, 384):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        causal = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device="cpu"
        )
        before = graphs()
        out = user_flex(q, k, v, block_mask=causal)
        assert graphs() == before + 1  # compiled, not fallen back to eager
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=3e-5)
