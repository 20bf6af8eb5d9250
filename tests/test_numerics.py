"""Numerical edges: large-magnitude and outlier activations, attention sinks, non-finite inputs.

Every case compares with the float32 oracle on the SAME (rounded) inputs and the selection flexpbs
reports. The stated tolerance (README, "Numerics and limits") is relative to the largest |value|:
max|v| * (tol + 4 * 2^-24 * L), tol = 3e-5 (float32), 3e-2 (bfloat16), 4e-3 (float16), L the largest
scale * sum_d |q_d k_d| over (query, key) pairs: logits are float32, so their rounding grows with their
size and moves softmax weights by about that much. All shapes share one compiled graph per dtype with
tests/test_attention.py (B=1, Hq=4, Hkv=2, D=64, length bucket 1024).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from bench.checks import (
    FP32_EPS,
    REL_TOL,
    check_rows,
    check_stats,
    finite_tile_rows,
    reference_rows,
    sample_rows,
)
from flexpbs import PBSConfig, reference
from tests.helpers import Case, make_qkv
from tests.test_attention import assert_same_permutation_up_to_ties

FP16_MAX = torch.finfo(torch.float16).max


def stated_tolerance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """max|v| * (tol + 4 * 2^-24 * L), L = scale * max over pairs of sum_d |q_d k_d|."""
    group = q.shape[1] // k.shape[1]
    k_abs = k.float().abs().repeat_interleave(group, dim=1)
    logit_bound = (q.float().abs() @ k_abs.transpose(-1, -2)).max().item() * q.shape[-1] ** -0.5
    return v.float().abs().max().item() * (REL_TOL[q.dtype] + 4 * FP32_EPS * logit_bound)


def shape(seq_len: int = 1000, seed: int = 0) -> Case:
    return Case(1, 2, 2, seq_len, 64, 128, 256, seed=seed)


def assert_matches_oracle(q, k, v, out, stats, cfg):
    """Finite output, the oracle's selection and permutation, and the oracle's output within tolerance."""
    assert out.dtype == q.dtype and out.isfinite().all()
    imp = reference.importance(q, k, cfg)
    assert_same_permutation_up_to_ties(
        stats.key_positions, reference.segment_sort(imp, q.shape[2], cfg.segment_size), imp
    )
    assert torch.equal(stats.tiles, reference.selection(q, k, stats.key_positions, cfg))
    mask = reference.token_mask(stats.tiles, stats.key_positions, cfg.block_size)
    want = reference.masked_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=stated_tolerance(q, k, v))


def with_outliers(x: torch.Tensor, channels: list[int], gain: float) -> torch.Tensor:
    """A few channels many times larger than the rest, as the massive activations of real LLMs."""
    x = x.clone()
    x[..., channels] *= gain
    return x


@settings(max_examples=10)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    magnitude=st.sampled_from([1e1, 1e2, 1e3]),
    n_outliers=st.sampled_from([0, 2, 4]),
    gain=st.sampled_from([10.0, 100.0]),
    threshold=st.sampled_from([0.5, 0.9]),
    seq_len=st.integers(897, 1024),
    seed=st.integers(0, 2**31 - 1),
)
def test_large_magnitude_inputs_stay_finite_and_exact(
    dtype, magnitude, n_outliers, gain, threshold, seq_len, seed
):
    """q/k/v scaled by up to 1e3, a few channels up to 100x more: logits reach ~1e10 in float32."""
    q, k, v = make_qkv(shape(seq_len, seed))
    channels = [3, 17, 40, 61][:n_outliers]
    q, k = (with_outliers(x, channels, gain) * magnitude for x in (q, k))
    q, k, v = (x.to(dtype) for x in (q, k, v * magnitude))
    cfg = PBSConfig(threshold=threshold)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert_matches_oracle(q, k, v, out, stats, cfg)


@settings(max_examples=5)
@given(
    n_outliers=st.sampled_from([0, 2]), threshold=st.sampled_from([0.5, 0.9]), seed=st.integers(0, 2**31 - 1)
)
def test_float16_logits_beyond_float16_range(n_outliers, threshold, seed):
    """float16 q/k near the top of float16's range: a float16 q @ k^T would overflow to inf; flexpbs
    accumulates in float32 and stays within tolerance. v scaled by 1e3 (the output stays in range)."""
    q, k, v = make_qkv(shape(seed=seed))
    q, k = (with_outliers(x, [5, 33][:n_outliers], 8.0) * 100 for x in (q, k))
    q, k, v = (x.clamp(-FP16_MAX, FP16_MAX).half() for x in (q, k, v * 1e3))
    logits = q[0].float() @ k[0].float().repeat_interleave(2, 0).transpose(-1, -2)
    assert logits.abs().max() > FP16_MAX  # the naive float16 product would hold inf
    cfg = PBSConfig(threshold=threshold)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert_matches_oracle(q, k, v, out, stats, cfg)


@pytest.mark.parametrize(
    "dtype, sink_logit",
    [(torch.float32, 30.0), (torch.bfloat16, 1e3), (torch.float16, 30.0), (torch.float16, 1e3)],
)
def test_attention_sink_with_near_one_hot_rows(dtype, sink_logit):
    """Token 0 takes almost all the mass of every row (probability 1 - e^-30 .. 1 - e^-1000):
    the sink tile is computed for every query block and the rows come out as v[0]."""
    q, k, v = make_qkv(shape(seed=3))
    direction = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0)
    q = 0.1 * q + direction * 4.0  # every query looks along one direction...
    k = 0.1 * k
    k[:, :, 0] = direction * (sink_logit * 8 / 4.0)  # ...which only token 0 answers: logit ~sink_logit
    q, k, v = (x.to(dtype) for x in (q, k, v))
    cfg = PBSConfig(threshold=0.9)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    sink_block = (stats.key_positions == 0).int().argmax(-1) // cfg.block_size  # [B, Hkv]
    sink_block = sink_block.repeat_interleave(2, dim=1)[..., None, None].expand(1, 4, 8, 1)
    assert stats.tiles.gather(-1, sink_block).all()
    assert_matches_oracle(q, k, v, out, stats, cfg)
    v0 = v[:, :, :1].float().repeat_interleave(2, dim=1)
    torch.testing.assert_close(
        out.float(), v0.expand_as(out), rtol=0, atol=REL_TOL[dtype] * v.float().abs().max().item()
    )


def test_needle_far_back_is_selected():
    """Rows whose mass sits on one key of an early segment: the permutation moves it to the front of its
    segment, mean pooling ranks its block first and a low threshold keeps that block alone."""
    q, k, v = make_qkv(shape(seed=5))
    direction = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(2)), dim=0)
    q = 0.1 * q
    q[:, :, 768:] += direction * 4.0  # the last two query blocks look for the needle...
    k = 0.1 * k
    k[:, :, 300] = direction * 400.0  # ...at token 300 (segment 1): logit ~200, pooled logit ~1.6
    cfg = PBSConfig(threshold=0.4)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert_matches_oracle(q, k, v, out, stats, cfg)
    assert (stats.key_positions[:, :, 256] == 300).all()  # first slot of segment 1
    assert stats.tiles[:, :, 6:, 2].all()
    v_needle = v[:, :, 300:301].repeat_interleave(2, dim=1)
    torch.testing.assert_close(out[:, :, 768:], v_needle.expand_as(out[:, :, 768:]), rtol=0, atol=1e-5)


def test_same_inputs_give_identical_bits():
    q, k, v = (x.to(torch.bfloat16) for x in make_qkv(shape(seed=9)))
    out1, s1 = flexpbs.attention(q, k, v, threshold=0.8, return_stats=True)
    out2, s2 = flexpbs.attention(q, k, v, threshold=0.8, return_stats=True)
    assert torch.equal(out1, out2)
    assert torch.equal(s1.tiles, s2.tiles) and torch.equal(s1.key_positions, s2.key_positions)
    assert torch.equal(s1.density, s2.density)


# --- Non-finite inputs: the documented contract ----------------------------------------------------


@settings(max_examples=10)
@given(
    target=st.sampled_from(["query", "key", "value"]),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    position=st.integers(0, 1023),
    kv_head=st.integers(0, 1),
    gqa=st.sampled_from(["shared", "per_head"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_non_finite_input_contract(target, bad, position, kv_head, gqa, seed):
    """One non-finite element: rows whose query and computed tiles are finite stay exact (the oracle
    on the reported selection), other KV groups are bitwise unaffected, stats stay valid. Affected rows
    are unspecified (NaN, inf, 0 or a finite value: compiled CPU flex gives 0 for a NaN query row)."""
    n = 1024
    q, k, v = make_qkv(Case(1, 2, 2, n, 64, 128, 256, seed=seed, sharpness=2.0))
    cfg = PBSConfig(threshold=0.9, gqa=gqa)
    clean_out, clean_stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    tensors = {"query": q.clone(), "key": k.clone(), "value": v.clone()}
    head = kv_head * 2 if target == "query" else kv_head
    tensors[target][0, head, position, 7] = bad
    q2, k2, v2 = tensors["query"], tensors["key"], tensors["value"]
    out, stats = flexpbs.attention(q2, k2, v2, config=cfg, return_stats=True)

    assert out.shape == q.shape
    check_stats(stats, n, cfg)
    ok = finite_tile_rows(q2, k2, v2, stats, cfg.block_size)
    assert ok[:, 2 - 2 * kv_head : 4 - 2 * kv_head].all()  # the other KV group is clean
    mask = reference.token_mask(stats.tiles, stats.key_positions, cfg.block_size)
    want = reference.masked_attention(
        q2.nan_to_num(0, 0, 0), k2.nan_to_num(0, 0, 0), v2.nan_to_num(0, 0, 0), mask, 64**-0.5
    )
    torch.testing.assert_close(out[ok], want[ok], rtol=0, atol=3e-5)
    # the other KV group (query heads 2 - 2 * kv_head .. +1) never sees the bad element
    other = slice(2 - 2 * kv_head, 4 - 2 * kv_head)
    assert torch.equal(out[:, other], clean_out[:, other])
    assert torch.equal(stats.tiles[:, other], clean_stats.tiles[:, other])
    perm_other = other if gqa == "per_head" else slice(1 - kv_head, 2 - kv_head)
    assert torch.equal(stats.key_positions[:, perm_other], clean_stats.key_positions[:, perm_other])


def test_sampled_row_oracle_of_the_gpu_scripts_agrees_with_the_dense_oracle():
    """bench/checks.py checks 512K-token outputs on sampled rows; here it meets flexpbs.reference."""
    case = Case(2, 2, 2, 1000, 64, 128, 256, seed=11, sharpness=2.0)
    q, k, v = make_qkv(case)
    cfg = PBSConfig(threshold=0.6, gqa="per_head")
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    mask = reference.token_mask(stats.tiles, stats.key_positions, cfg.block_size)
    dense = reference.masked_attention(q, k, v, mask, 64**-0.5)
    rows = sample_rows(1000, cfg.block_size, cfg.segment_size)
    for b, h in [(0, 0), (1, 3)]:
        want, tol = reference_rows(
            q, k, v, stats.tiles, stats.key_positions, cfg.block_size, 64**-0.5, b, h, rows
        )
        torch.testing.assert_close(want, dense[b, h, rows], rtol=0, atol=1e-5)
        assert (tol > 0).all()
    assert check_rows(q, k, v, out, stats, cfg, [(0, 0), (1, 3)], rows)["bad"] == 0
    wrong = out.clone()
    wrong[1, 3, rows[5]] += 1e-3  # one sampled row off by more than the float32 tolerance
    assert check_rows(q, k, v, wrong, stats, cfg, [(0, 0), (1, 3)], rows)["bad"] == 1
