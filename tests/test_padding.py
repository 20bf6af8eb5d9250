"""Padded batches (valid_keys): each sequence gives what an unpadded call on its real tokens gives."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs.limits import override
from tests.helpers import Case, make_qkv, sdpa_causal
from tests.test_attention import FP32_ATOL

# Few shapes: every compacted length is a new FlexAttention graph on CPU.
CASE = Case(
    batch=3,
    kv_heads=2,
    group=2,
    seq_len=520,
    head_dim=16,
    block_size=64,
    segment_size=128,
    seed=0,
    sharpness=3.0,
)


@st.composite
def padding_masks(draw, batch: int, n: int):
    """[batch, n] bool: per sequence none, left, right, left and right, two holes, or all padding.

    Few padding amounts, so that compacted lengths (each a compiled graph) repeat across examples.
    """
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["none", "left", "right", "both", "holes", "all"]))
        amount = draw(st.sampled_from([64, 100]))
        row = torch.ones(n, dtype=torch.bool)
        if kind == "left":
            row[:amount] = False
        elif kind == "right":
            row[n - amount :] = False
        elif kind == "both":
            row[: amount // 2] = False
            row[n - amount // 2 :] = False
        elif kind == "holes":
            for _ in range(2):
                start = draw(st.integers(0, n - amount // 2))
                row[start : start + amount // 2] = False
        elif kind == "all":
            row[:] = False
        rows.append(row)
    return torch.stack(rows)


def unpadded_calls(q, k, v, valid, **options):
    """Each sequence alone on its real keys and real queries; zeros on padded query rows."""
    n_q, n = q.shape[2], k.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1])
    stats = []
    for b in range(q.shape[0]):
        real_q = valid[b, n - n_q :]
        o, s = flexpbs.attention(
            q[b : b + 1][:, :, real_q],
            k[b : b + 1][:, :, valid[b]],
            v[b : b + 1][:, :, valid[b]],
            return_stats=True,
            **options,
        )
        out[b][:, real_q] = o[0]
        stats.append(s)
    return out, stats


@settings(max_examples=6)
@given(
    data=st.data(),
    n_queries=st.sampled_from([520, 300]),
    threshold=st.sampled_from([0.5, 1.0]),
    gqa=st.sampled_from(["shared", "per_head"]),
    estimator=st.sampled_from(["mean_pool", "antidiagonal"]),
)
def test_padded_batch_equals_unpadded_calls_per_sequence(data, n_queries, threshold, gqa, estimator):
    q, k, v = make_qkv(CASE)
    q = q[:, :, CASE.seq_len - n_queries :]
    valid = data.draw(padding_masks(CASE.batch, CASE.seq_len))
    options = dict(block_size=64, segment_size=128, threshold=threshold, gqa=gqa, estimator=estimator)
    out, stats = flexpbs.attention(q, k, v, valid_keys=valid, return_stats=True, **options)
    want, want_stats = unpadded_calls(q, k, v, valid, **options)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    padded_rows = ~valid[:, CASE.seq_len - n_queries :]
    assert (out.transpose(1, 2)[padded_rows] == 0).all()
    assert len(stats) == CASE.batch
    for got, exp in zip(stats, want_stats, strict=True):
        assert got.dense == exp.dense
        assert torch.equal(got.tiles, exp.tiles)
        assert torch.equal(got.key_positions, exp.key_positions)
    if threshold == 1.0:  # on real query rows (padded rows see real keys in the dense oracle)
        dense = sdpa_causal(q, k, v, valid_keys=valid)
        real = valid[:, CASE.seq_len - n_queries :, None].expand(-1, -1, CASE.q_heads)
        torch.testing.assert_close(
            out.transpose(1, 2)[real], dense.transpose(1, 2)[real], rtol=0, atol=FP32_ATOL
        )


def test_all_true_mask_takes_the_batched_path():
    q, k, v = make_qkv(CASE)
    options = dict(block_size=64, segment_size=128, threshold=0.6)
    want, want_stats = flexpbs.attention(q, k, v, return_stats=True, **options)
    valid = torch.ones(CASE.batch, CASE.seq_len, dtype=torch.int64)  # 0/1 integers are accepted
    out, stats = flexpbs.attention(q, k, v, valid_keys=valid, return_stats=True, **options)
    assert torch.equal(out, want)
    assert [s.tiles.shape[0] for s in stats] == [1] * CASE.batch
    assert torch.equal(torch.cat([s.tiles for s in stats]), want_stats.tiles)
    assert torch.equal(torch.cat([s.density for s in stats]), want_stats.density)
    assert torch.equal(torch.cat([s.sorted_rows for s in stats]), want_stats.sorted_rows)


def test_fully_padded_rows_are_zeros_not_nan():
    q, k, v = make_qkv(CASE)
    valid = torch.ones(CASE.batch, CASE.seq_len, dtype=torch.bool)
    valid[0] = False  # a sequence of padding only
    valid[1, :400] = False  # left padding: its first query rows see no key at all
    out = flexpbs.attention(q, k, v, valid_keys=valid, block_size=64, segment_size=128, threshold=1.0)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, :400] == 0).all()
    dense = sdpa_causal(q, k, v, valid_keys=valid)
    torch.testing.assert_close(out[1, :, 400:], dense[1, :, 400:], rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(out[2], dense[2], rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize(
    "valid_keys, error, match",
    [
        ([[True] * 520] * 3, TypeError, "valid_keys must be a torch.Tensor"),
        (torch.ones(3, 520), TypeError, "valid_keys must be bool or an integer"),
        (
            torch.ones(3, 519, dtype=torch.bool),
            ValueError,
            r"valid_keys must have shape \[batch, key seq_len\]",
        ),
        (torch.ones(520, dtype=torch.bool), ValueError, "valid_keys must have shape"),
        (torch.ones(3, 520, dtype=torch.bool, device="meta"), ValueError, "valid_keys device"),
        (torch.full((3, 520), 2), ValueError, "valid_keys must hold only 0"),
    ],
)
def test_bad_valid_keys_raise_naming_the_argument(valid_keys, error, match):
    q, k, v = make_qkv(Case(3, 1, 1, 520, 16, 64, 128, seed=0))
    with pytest.raises(error, match=match):
        flexpbs.attention(q, k, v, valid_keys=valid_keys)


def test_head_chunks_give_what_one_pass_gives():
    # no memory budget: one KV head per chunk, each chunk's frames gathered on their own
    q, k, v = make_qkv(CASE)
    valid = torch.ones(CASE.batch, CASE.seq_len, dtype=torch.bool)
    valid[0, :100] = False
    valid[1, 400:] = False
    options = dict(block_size=64, segment_size=128, threshold=0.7)
    want, want_stats = flexpbs.attention(q, k, v, valid_keys=valid, return_stats=True, **options)
    with override(min_chunk_bytes=0, chunk_share=0.0):
        got, got_stats = flexpbs.attention(q, k, v, valid_keys=valid, return_stats=True, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)
    for got_b, want_b in zip(got_stats, want_stats, strict=True):
        assert torch.equal(got_b.tiles, want_b.tiles)
        assert torch.equal(got_b.key_positions, want_b.key_positions)
