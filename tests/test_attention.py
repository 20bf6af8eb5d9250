"""End to end: flexpbs.attention (compiled FlexAttention) against dense baselines and the oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.block_mask import build_block_mask
from flexpbs.permutation import permute_kv
from flexpbs.pipeline import kv_heads_per_chunk
from tests.helpers import Case, cases, make_qkv, sdpa_causal

FP32_ATOL = 3e-5


def assert_sparse(stats):
    """Fewer tiles than causal attention (density alone can exceed 1: own segments are squares)."""
    causal_tiles = torch.ones_like(stats.tiles).tril()
    assert (stats.tiles.sum((-1, -2)) < causal_tiles.sum((-1, -2))).all()


@settings(max_examples=22)
@given(case=cases(), gqa=st.sampled_from(["shared", "per_head"]))
def test_threshold_one_equals_dense_causal_attention(case, gqa):
    q, k, v = make_qkv(case)
    out, stats = flexpbs.attention(
        q,
        k,
        v,
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=1.0,
        gqa=gqa,
        return_stats=True,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)
    nb = -(-case.seq_len // case.block_size)
    assert stats.tiles.shape == (case.batch, case.q_heads, nb, nb)
    assert stats.dense == (case.seq_len <= case.segment_size)


def assert_same_permutation_up_to_ties(perm, want, importance):
    """Equal, except where two keys' importances tie to float32 rounding."""
    n_complete = importance.shape[-1]
    assert torch.equal(perm[..., n_complete:], want[..., n_complete:])
    got_imp = importance.gather(-1, perm[..., :n_complete])
    want_imp = importance.gather(-1, want[..., :n_complete])
    torch.testing.assert_close(got_imp, want_imp, rtol=1e-5, atol=1e-9)


@settings(max_examples=22)
@given(
    case=cases(sharp=True),
    threshold=st.sampled_from([0.2, 0.5, 0.8, 0.9, 0.95]),
    gqa=st.sampled_from(["shared", "per_head"]),
)
def test_any_threshold_equals_the_reference(case, threshold, gqa):
    q, k, v = make_qkv(case)
    cfg = PBSConfig(block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    if case.seq_len > case.segment_size:
        imp = reference.importance(q, k, cfg)
        ref_perm = reference.segment_sort(imp, case.seq_len, case.segment_size)
        assert_same_permutation_up_to_ties(stats.key_positions, ref_perm, imp)
        assert torch.equal(stats.tiles, reference.selection(q, k, stats.key_positions, cfg))
    else:
        ref_out, ref_tiles, ref_perm = reference.pbs_attention(q, k, v, cfg)
        assert torch.equal(stats.key_positions, ref_perm)
        assert torch.equal(stats.tiles, ref_tiles)
    # the output is the oracle's on the very selection flexpbs reports
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size)
    want = reference.masked_attention(q, k, v, mask, case.head_dim**-0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=FP32_ATOL)
    nb = stats.tiles.shape[-1]
    want_density = stats.tiles.sum((-1, -2)).float() / (nb * (nb + 1) / 2)
    torch.testing.assert_close(stats.density, want_density)


@pytest.mark.parametrize(
    "case, threshold, gqa",
    [
        (Case(1, 2, 2, 700, 32, 64, 128, seed=3, sharpness=3.0), 0.6, "shared"),
        (Case(2, 1, 4, 517, 16, 64, 128, seed=4, sharpness=4.0), 0.5, "per_head"),
        (Case(1, 4, 1, 1000, 64, 128, 512, seed=5, sharpness=4.0), 0.3, "shared"),
    ],
)
def test_eager_and_compiled_flex_agree(case, threshold, gqa):
    """Uncompiled flex ignores block lists: it must see the same mask through the mask_mod."""
    q, k, v = make_qkv(case)
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
    assert_sparse(stats)
    k_p, v_p = permute_kv(k, v, stats.key_positions)
    bm = build_block_mask(stats.tiles, stats.key_positions, case.block_size, case.segment_size)
    eager = flex_attention(q, k_p, v_p, block_mask=bm, enable_gqa=k_p.shape[1] != q.shape[1])
    torch.testing.assert_close(out, eager, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, FP32_ATOL), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)]
)
@pytest.mark.parametrize("threshold", [0.7, 1.0])
def test_half_precision_within_stated_tolerance(dtype, atol, threshold):
    case = Case(1, 2, 2, 900, 64, 128, 256, seed=7, sharpness=2.0)
    q, k, v = make_qkv(case, dtype=dtype)
    cfg = PBSConfig(threshold=threshold)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert out.dtype == dtype
    # the oracle on the same (rounded) inputs and the same selection, in float32
    mask = reference.token_mask(stats.tiles, stats.key_positions, cfg.block_size)
    want = reference.masked_attention(q, k, v, mask, case.head_dim**-0.5)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=atol)
    if threshold == 1.0:
        torch.testing.assert_close(out.float(), sdpa_causal(q, k, v), rtol=0, atol=atol)


@pytest.mark.parametrize("n", [1, 5, 200, 256])
def test_short_inputs_run_dense(n):
    q, k, v = make_qkv(Case(1, 2, 2, n, 32, 128, 256, seed=n))
    out, stats = flexpbs.attention(q, k, v, threshold=0.1, return_stats=True)
    assert stats.dense
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)
    assert (stats.density == 1).all()


def test_min_seq_len_forces_dense():
    q, k, v = make_qkv(Case(1, 1, 2, 1000, 32, 64, 128, seed=9, sharpness=4.0))
    opts = dict(block_size=64, segment_size=128, threshold=0.3, return_stats=True)
    _, sparse = flexpbs.attention(q, k, v, **opts)
    out, dense = flexpbs.attention(q, k, v, min_seq_len=1001, **opts)
    assert not sparse.dense
    assert_sparse(sparse)
    assert dense.dense
    torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)


def test_value_dim_scale_and_strided_inputs():
    case = Case(2, 2, 2, 640, 64, 64, 128, seed=11, sharpness=2.0)
    q, k, v = make_qkv(case, value_dim=48)
    # HF-style [B, N, H, D] storage seen through a transpose
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.8, scale=0.05)
    out, stats = flexpbs.attention(q_t, k, v, config=cfg, return_stats=True)
    assert out.shape == (2, 4, 640, 48)
    ref_out, ref_tiles, _ = reference.pbs_attention(q, k, v, cfg)
    assert torch.equal(stats.tiles, ref_tiles)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=FP32_ATOL)


def test_empty_sequence():
    q = torch.randn(1, 2, 0, 16)
    out, stats = flexpbs.attention(q, q, q, return_stats=True)
    assert out.shape == (1, 2, 0, 16) and stats.tiles.shape == (1, 2, 0, 0)


@settings(max_examples=12)
@given(case=cases(sharp=True), threshold=st.sampled_from([0.5, 0.9, 1.0]))
def test_without_permutation_is_the_same_selector_on_the_original_order(case, threshold):
    q, k, v = make_qkv(case)
    cfg = PBSConfig(
        block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, key_order="original"
    )
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    identity = torch.arange(case.seq_len).expand(case.batch, case.kv_heads, -1)
    assert torch.equal(stats.key_positions, identity) and stats.importance_kernel is None
    if not stats.dense:
        assert torch.equal(stats.tiles, reference.selection(q, k, identity, cfg))
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size)
    torch.testing.assert_close(
        out, reference.masked_attention(q, k, v, mask, case.head_dim**-0.5), rtol=0, atol=FP32_ATOL
    )
    if threshold == 1.0:
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("gqa", ["shared", "per_head"])
def test_head_chunks_bounding_memory_give_the_same_result(gqa):
    case = Case(
        batch=2, kv_heads=4, group=2, seq_len=700, head_dim=32, block_size=64, segment_size=128, seed=3
    )
    q, k, v = make_qkv(case)
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.8, gqa=gqa)
    whole, whole_stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    with flexpbs.limits.override(min_chunk_bytes=0):  # budget = 25% of q/k/v: forces chunks of KV heads
        assert kv_heads_per_chunk(q, k, v, 64, gqa == "per_head") < case.kv_heads
        chunked, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        assert torch.equal(chunked, flexpbs.attention(q, k, v, config=cfg))
    assert torch.equal(stats.tiles, whole_stats.tiles)
    assert torch.equal(stats.key_positions, whole_stats.key_positions)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_tile_tables_stay_within_int32_indexing():
    case = Case(
        batch=1, kv_heads=4, group=2, seq_len=700, head_dim=32, block_size=64, segment_size=128, seed=4
    )
    q, k, v = make_qkv(case)
    tiles_per_kv_head = 2 * 11 * 11
    with flexpbs.limits.override(max_table_tiles=2 * tiles_per_kv_head + 1):  # two KV heads fit, four do not
        assert kv_heads_per_chunk(q, k, v, 64, False) == 2
    with flexpbs.limits.override(max_table_tiles=tiles_per_kv_head):
        with pytest.raises(ValueError, match="int32"):
            flexpbs.attention(q, k, v, block_size=64, segment_size=128)
