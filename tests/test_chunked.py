"""Chunked prefill: Nq <= N queries at the last key positions (bottom-right causal), end to end."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.block_mask import build_block_mask
from flexpbs.permutation import permute_kv
from flexpbs.pipeline import kv_heads_per_chunk
from tests.helpers import Case, chunk_cases, make_qkv, sdpa_causal
from tests.test_attention import FP32_ATOL, assert_same_permutation_up_to_ties


def chunk_of(case, n_queries, dtype=torch.float32):
    """Queries of the last ``n_queries`` positions, all N keys and values."""
    q, k, v = make_qkv(case, dtype)
    return q[:, :, case.seq_len - n_queries :], k, v


def causal_rectangle_tiles(n_queries, n, block):
    """Causal tiles of the (aligned query block, key block) rectangle."""
    nb = -(-n // block)
    return torch.ones(nb, nb).tril()[(n - n_queries) // block :].sum()


@settings(max_examples=10)
@given(
    chunk=chunk_cases(max_len=800, sharp=True),
    threshold=st.sampled_from([0.2, 0.5, 0.8, 0.95]),
    gqa=st.sampled_from(["shared", "per_head"]),
)
def test_chunk_equals_dense_at_one_and_the_reference_at_any_threshold(chunk, threshold, gqa):
    """Both calls share one compiled graph: the tile tables change values, not shapes."""
    case, n_queries = chunk
    q, k, v = chunk_of(case, n_queries)
    cfg = PBSConfig(block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa)
    dense_out, dense_stats = flexpbs.attention(
        q, k, v, config=dataclasses.replace(cfg, threshold=1.0), return_stats=True
    )
    torch.testing.assert_close(dense_out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)
    nb = -(-case.seq_len // case.block_size)
    nbq = nb - (case.seq_len - n_queries) // case.block_size
    assert dense_stats.tiles.shape == (case.batch, case.q_heads, nbq, nb)
    assert dense_stats.dense == (case.seq_len <= case.segment_size)

    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert out.shape == q.shape
    if case.seq_len > case.segment_size:
        imp = reference.importance(q, k, cfg)
        assert_same_permutation_up_to_ties(
            stats.key_positions, reference.segment_sort(imp, case.seq_len, case.segment_size), imp
        )
        assert torch.equal(stats.tiles, reference.selection(q, k, stats.key_positions, cfg))
    else:
        ref_out, ref_tiles, ref_perm = reference.pbs_attention(q, k, v, cfg)
        assert torch.equal(stats.key_positions, ref_perm)
        assert torch.equal(stats.tiles, ref_tiles)
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size, n_queries)
    want = reference.masked_attention(q, k, v, mask, case.head_dim**-0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=FP32_ATOL)
    # density: computed tiles over the causal tiles of the rectangle
    want_density = stats.tiles.sum((-1, -2)).float() / causal_rectangle_tiles(
        n_queries, case.seq_len, case.block_size
    )
    torch.testing.assert_close(stats.density, want_density)


@pytest.mark.parametrize(
    "case, start, threshold, gqa",
    [
        (Case(1, 2, 2, 700, 32, 64, 128, seed=0, sharpness=3.0), 256, 0.6, "shared"),
        (Case(2, 1, 2, 640, 16, 64, 256, seed=1, sharpness=4.0), 512, 0.3, "per_head"),
    ],
)
def test_chunk_starting_on_a_block_boundary_is_the_tail_of_the_full_prefill(case, start, threshold, gqa):
    """At any threshold: same importance rows (the last block_size queries), same query blocks."""
    q, k, v = make_qkv(case)
    opts = dict(
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=threshold,
        gqa=gqa,
        return_stats=True,
    )
    full, full_stats = flexpbs.attention(q, k, v, **opts)
    out, stats = flexpbs.attention(q[:, :, start:], k, v, **opts)
    causal = causal_rectangle_tiles(case.seq_len - start, case.seq_len, case.block_size)
    assert (stats.tiles.sum((-1, -2)) < causal).all()  # some tiles were skipped
    assert torch.equal(stats.key_positions, full_stats.key_positions)
    assert torch.equal(stats.tiles, full_stats.tiles[:, :, start // case.block_size :])
    torch.testing.assert_close(out, full[:, :, start:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_queries, n", [(1, 100), (37, 200), (200, 256), (60, 64)])
def test_short_keys_run_dense_bottom_right(n_queries, n):
    case = Case(1, 2, 2, n, 32, 128, 256, seed=n_queries)
    q, k, v = chunk_of(case, n_queries)
    out, stats = flexpbs.attention(q, k, v, threshold=0.1, return_stats=True)
    assert stats.dense and (stats.density == 1).all()
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)
    # not SDPA's top-left is_causal
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(out, top_left, atol=1e-3)


def test_empty_chunk():
    q, k, v = make_qkv(Case(1, 2, 2, 600, 16, 64, 128, seed=0))
    out, stats = flexpbs.attention(q[:, :, :0], k, v, block_size=64, segment_size=128, return_stats=True)
    assert out.shape == (1, 4, 0, 16) and stats.tiles.shape == (1, 4, 0, 10)


@pytest.mark.parametrize(
    "case, n_queries, threshold, gqa",
    [
        (Case(2, 1, 4, 517, 16, 64, 128, seed=4, sharpness=4.0), 77, 0.5, "per_head"),
    ],
)
def test_eager_and_compiled_flex_agree_on_chunks(case, n_queries, threshold, gqa):
    """The mask_mod alone (eager flex) states the same mask as the block lists (compiled)."""
    q, k, v = chunk_of(case, n_queries)
    out, stats = flexpbs.attention(
        q,
        k,
        v,
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=threshold,
        gqa=gqa,
        return_stats=True,
    )
    offset = case.seq_len - n_queries
    lead = offset % case.block_size
    k_p, v_p = permute_kv(k, v, stats.key_positions)
    bm = build_block_mask(
        stats.tiles, stats.key_positions, case.block_size, case.segment_size, query_start=offset - lead
    )
    q_aligned = F.pad(q, (0, 0, lead, 0))  # dummy rows align query blocks with key blocks
    eager = flex_attention(q_aligned, k_p, v_p, block_mask=bm, enable_gqa=k_p.shape[1] != q.shape[1])
    torch.testing.assert_close(out, eager[:, :, lead:], rtol=0, atol=FP32_ATOL)


def test_head_chunks_of_a_chunk_give_the_same_result():
    """The memory-bounding head chunks size tile tables and outputs by (Nq, N)."""
    case = Case(
        batch=2, kv_heads=4, group=2, seq_len=700, head_dim=32, block_size=64, segment_size=128, seed=3
    )
    q, k, v = chunk_of(case, 400)
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.8)
    whole, whole_stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    with flexpbs.limits.override(min_chunk_bytes=0):  # budget = 25% of q/k/v: forces chunks of KV heads
        assert kv_heads_per_chunk(q, k, v, 64, False) < case.kv_heads
        chunked, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert stats.tiles.shape == (2, 8, 7, 11)
    assert torch.equal(stats.tiles, whole_stats.tiles)
    assert torch.equal(stats.key_positions, whole_stats.key_positions)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
