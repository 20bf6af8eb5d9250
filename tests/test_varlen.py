"""flexpbs.varlen_attention: a packed batch gives, per sequence, what a call on that sequence alone gives."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.limits import override
from flexpbs.rows import to_frame
from flexpbs.varlen import frame_groups
from tests.helpers import sdpa_causal
from tests.test_attention import FP32_ATOL, assert_same_permutation_up_to_ties

HQ, HKV, D = 4, 2, 16


def packed_batch(lengths: list[tuple[int, int]], seed: int, dtype=torch.float32, sharpness: float = 3.0):
    """(q [total_q, Hq, D], k, v [total_k, Hkv, D], cu_q, cu_k, per-sequence [1, H, N, D] tensors)."""
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for n_q, n in lengths:
        q = torch.randn(1, HQ, n, D, generator=gen)[:, :, n - n_q :] * sharpness
        k, v = torch.randn(1, HKV, n, D, generator=gen), torch.randn(1, HKV, n, D, generator=gen)
        sequences.append(tuple(x.to(dtype) for x in (q, k, v)))

    def pack(index):
        parts = [s[index][0].transpose(0, 1) for s in sequences]  # [N, H, D]
        return torch.cat(parts) if parts else torch.zeros(0, (HQ, HKV, HKV)[index], D, dtype=dtype)

    def offsets(index):
        sizes = torch.tensor([0] + [s[index].shape[2] for s in sequences])
        return sizes.cumsum(0).to(torch.int32)

    return pack(0), pack(1), pack(2), offsets(0), offsets(1), sequences


def unpack(out: torch.Tensor, cu_q: torch.Tensor, b: int) -> torch.Tensor:
    """Sequence b's rows of a packed ``[total_q, Hq, Dv]`` output, as ``[1, Hq, Nq, Dv]``."""
    return out[cu_q[b] : cu_q[b + 1]].transpose(0, 1)[None]


@st.composite
def batches(draw):
    """Up to four sequences: whole prompts and chunks, short (dense) ones, chunks without queries."""
    count = draw(st.integers(1, 4))
    lengths = []
    for _ in range(count):
        n = draw(st.sampled_from([1, 100, 130, 257, 300, 511, 640, 700]))
        n_q = draw(st.sampled_from([n, n, n // 2, 1, 0])) if n > 1 else 1
        lengths.append((n_q, n))
    return lengths


@settings(max_examples=30)
@given(
    lengths=batches(),
    seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.5, 0.9, 1.0]),
    mode=st.sampled_from(
        [
            dict(),
            dict(gqa="per_head"),
            dict(key_order="original"),
            dict(exact_last_block=True),
            dict(max_shrink=0.1),
            dict(estimator="antidiagonal"),
            dict(estimator="antidiagonal", antidiagonal_stride=4, gqa="per_head", max_shrink=0.1),
        ]
    ),
    frames=st.sampled_from([{}, dict(frame_short_keys=0)]),  # one frame, or grouped by length
)
def test_each_sequence_gets_what_a_call_on_it_alone_gives(lengths, seed, threshold, mode, frames):
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=threshold, **mode)
    q, k, v, cu_q, cu_k, sequences = packed_batch(lengths, seed)
    with override(**frames):
        out, stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, config=cfg, return_stats=True)
    assert out.shape == (q.shape[0], HQ, D) and len(stats) == len(lengths)
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        alone, alone_stats = flexpbs.attention(q_b, k_b, v_b, config=cfg, return_stats=True)
        got, got_stats = unpack(out, cu_q, b), stats[b]
        assert got_stats.dense == alone_stats.dense
        assert got_stats.tiles.shape == alone_stats.tiles.shape
        if got_stats.dense or q_b.shape[2] == 0:
            torch.testing.assert_close(got, alone, rtol=0, atol=FP32_ATOL)
            continue
        if cfg.key_order == "sorted" and cfg.max_shrink is None:
            imp = reference.importance(q_b, k_b, cfg)
            assert_same_permutation_up_to_ties(got_stats.key_positions, alone_stats.key_positions, imp)
        if cfg.max_shrink is None and not cfg.exact_last_block:
            # the selection is the oracle's on the key order varlen chose
            assert torch.equal(got_stats.tiles, reference.selection(q_b, k_b, got_stats.key_positions, cfg))
        if torch.equal(got_stats.key_positions, alone_stats.key_positions):
            assert torch.equal(got_stats.tiles, alone_stats.tiles)
            torch.testing.assert_close(got, alone, rtol=0, atol=FP32_ATOL)
        mask = reference.token_mask(got_stats.tiles, got_stats.key_positions, 64, q_b.shape[2])
        want = reference.masked_attention(q_b, k_b, v_b, mask, D**-0.5)
        torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, FP32_ATOL), (torch.bfloat16, 3e-2)])
def test_threshold_one_is_dense_bottom_right_causal_per_sequence(dtype, atol):
    lengths = [(700, 700), (300, 640), (1, 257), (100, 100), (0, 300)]
    q, k, v, cu_q, cu_k, sequences = packed_batch(lengths, seed=3, dtype=dtype)
    out = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, block_size=64, segment_size=128, threshold=1.0)
    assert out.dtype == dtype and out.shape == (1101, HQ, D)
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        if q_b.shape[2]:
            torch.testing.assert_close(
                unpack(out, cu_q, b).float(), sdpa_causal(q_b, k_b, v_b), rtol=0, atol=atol
            )


def test_frame_groups_put_sequences_of_similar_length_together():
    mixed = [4096, 8192, 12288, 16384, 24576, 32768, 65536, 98304]
    groups = frame_groups(mixed)
    assert [[mixed[b] for b in g] for g in groups] == [
        [98304],
        [65536],
        [32768, 24576],
        [16384, 12288, 8192, 4096],  # short sequences share a frame whatever their lengths
    ]
    with override(frame_short_keys=0):
        assert frame_groups([100, 700, 650, 300, 0]) == [[1, 2], [3], [0], [4]]
    with override(frame_share=0.0):  # one frame
        assert frame_groups(mixed) == [[7, 6, 5, 4, 3, 2, 1, 0]]


def test_grouped_frames_give_what_one_frame_gives():
    lengths = [(700, 700), (257, 600), (50, 150), (0, 300), (1, 129), (640, 640)]
    q, k, v, cu_q, cu_k, _ = packed_batch(lengths, seed=9)
    options = dict(block_size=64, segment_size=128, threshold=0.6, return_stats=True)
    one, one_stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **options)
    with override(frame_short_keys=0):
        assert frame_groups([n for _, n in lengths]) == [[0, 5, 1], [3], [2, 4]]
        got, got_stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **options)
    torch.testing.assert_close(got, one, rtol=0, atol=FP32_ATOL)
    for a, b in zip(got_stats, one_stats, strict=True):
        assert a.dense == b.dense and torch.equal(a.tiles, b.tiles)
        assert torch.equal(a.key_positions, b.key_positions)


def test_frames_by_length_keep_each_sequence_with_equal_lengths_in_its_place():
    # ties in length: the frames are made on the device in the same (stable) order as on the host
    lengths = [(300, 300), (700, 700), (100, 300), (650, 700), (640, 640), (0, 300)]
    q, k, v, cu_q, cu_k, sequences = packed_batch(lengths, seed=4)
    options = dict(block_size=64, segment_size=128, threshold=0.6, return_stats=True)
    with override(frame_short_keys=0):
        assert frame_groups([n for _, n in lengths]) == [[1, 3, 4], [0, 2, 5]]
        got, stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **options)
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        alone, alone_stats = flexpbs.attention(q_b, k_b, v_b, **options)
        assert torch.equal(stats[b].key_positions, alone_stats.key_positions)
        torch.testing.assert_close(unpack(got, cu_q, b), alone, rtol=0, atol=FP32_ATOL)


def test_given_maxima_give_the_same_result_without_reading_the_offsets():
    lengths = [(700, 700), (257, 600), (50, 150)]
    q, k, v, cu_q, cu_k, _ = packed_batch(lengths, seed=5)
    options = dict(block_size=64, segment_size=128, threshold=0.6)
    want = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **options)
    got = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=700, max_seqlen_k=700, **options)
    assert torch.equal(got, want)
    # larger maxima than needed: a longer frame, the same result
    got = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=900, max_seqlen_k=1000, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)


def test_a_sequence_alone_in_its_group_needs_no_frame(monkeypatch):
    # its keys and values are read in place, as a call on it alone reads them; frames for the others
    built = []
    monkeypatch.setattr(flexpbs.varlen, "to_frame", lambda *args: built.append(args[3:]) or to_frame(*args))
    lengths = [(700, 700), (257, 400), (50, 150), (1, 129)]
    q, k, v, cu_q, cu_k, sequences = packed_batch(lengths, seed=6)
    options = dict(block_size=64, segment_size=128, threshold=0.6, return_stats=True)
    with override(frame_short_keys=0):
        assert frame_groups([n for _, n in lengths]) == [[0], [1], [2, 3]]
        out, stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **options)
    assert built == [(2, 192)] * 3  # query, key and value frames of the two short sequences
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        alone, alone_stats = flexpbs.attention(q_b, k_b, v_b, **options)
        assert torch.equal(stats[b].tiles, alone_stats.tiles)
        assert torch.equal(stats[b].key_positions, alone_stats.key_positions)
        torch.testing.assert_close(unpack(out, cu_q, b), alone, rtol=0, atol=FP32_ATOL)
    # a batch of one sequence, with or without the maxima
    built.clear()
    q, k, v, cu_q, cu_k, ((q_b, k_b, v_b),) = packed_batch([(257, 600)], seed=6)
    alone = flexpbs.attention(q_b, k_b, v_b, **options)[0]
    for maxima in ({}, dict(max_seqlen_q=257, max_seqlen_k=600)):
        out = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **maxima, **options)[0]
        torch.testing.assert_close(unpack(out, cu_q, 0), alone, rtol=0, atol=FP32_ATOL)
    assert not built
    with pytest.raises(ValueError, match="sequence 0 has 600 queries but 257 keys"):
        flexpbs.varlen_attention(
            k.repeat(1, 2, 1), q[:, :2], q[:, :2], cu_k, cu_q, max_seqlen_q=1, max_seqlen_k=1
        )


def test_new_batch_compositions_compile_nothing():
    options = dict(block_size=64, segment_size=128, threshold=0.6)
    flexpbs.varlen_attention(*packed_batch([(600, 600), (200, 400)], seed=1)[:5], **options)
    flexpbs.varlen_attention(*packed_batch([(600, 600)], seed=1)[:5], **options)  # a batch of one
    before = counters["stats"]["unique_graphs"]
    for seed, lengths in enumerate(
        [[(300, 300), (500, 700), (1, 129)], [(999, 999)], [(64, 1000), (70, 70)] * 3]
    ):
        flexpbs.varlen_attention(*packed_batch(lengths, seed=seed)[:5], **options)
    assert counters["stats"]["unique_graphs"] == before


def test_an_empty_batch_and_a_batch_without_queries():
    q, k, v, cu_q, cu_k, _ = packed_batch([(0, 300), (0, 20)], seed=0)
    out, stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, return_stats=True)
    assert out.shape == (0, HQ, D) and [s.dense for s in stats] == [True, True]
    q, k, v, cu_q, cu_k, _ = packed_batch([], seed=0)
    assert flexpbs.varlen_attention(q, k, v, cu_q, cu_k).shape == (0, HQ, D)


def _offsets(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(cu_seqlens_q=_offsets(0, 300, 250)), ValueError, "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_k=_offsets(1, 300, 400)), ValueError, "cu_seqlens_k must start at 0"),
        (
            dict(cu_seqlens_k=_offsets(0, 300, 399)),
            ValueError,
            "cu_seqlens_k must end at the number of tokens 400",
        ),
        (
            dict(cu_seqlens_q=_offsets(0, 300, 350), cu_seqlens_k=_offsets(0, 200, 400)),
            ValueError,
            "sequence 0 has 300 queries but 200 keys",
        ),
        (dict(cu_seqlens_q=_offsets(0, 300, 350).long()), TypeError, "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_q=_offsets(0, 350)), ValueError, "the same batch"),
        (
            dict(cu_seqlens_k=_offsets(0, 300, 400)[None]),
            ValueError,
            r"cu_seqlens_k must have shape \[batch \+ 1\]",
        ),
        (dict(query=torch.zeros(350, HQ, 8)), ValueError, "key head_dim"),
        (dict(query=torch.zeros(350, 3, D)), ValueError, "query heads 3"),
        (dict(key=torch.zeros(1, 400, HKV, D)), ValueError, "key must have shape"),
        (dict(value=torch.zeros(400, HKV, D, dtype=torch.float64)), TypeError, "value must be float16"),
        (dict(max_seqlen_q=300, max_seqlen_k=-1), TypeError, "max_seqlen_k"),
        (dict(threshold=0.0), ValueError, "threshold"),
    ],
)
def test_bad_packed_inputs_raise_naming_the_argument(change, error, match):
    q, k, v, cu_q, cu_k, _ = packed_batch([(300, 300), (50, 100)], seed=0)
    args = dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    options = {name: change.pop(name) for name in list(change) if name not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        flexpbs.varlen_attention(**args, **options)


def test_the_triton_importance_kernel_takes_the_frame():
    """The importance kernel's per-sequence lengths (in Triton's CPU interpreter here) select what the
    PyTorch path selects."""
    pytest.importorskip("triton")
    q, k, v, cu_q, cu_k, _ = packed_batch([(700, 700), (100, 600), (50, 100)], seed=9)
    options = dict(block_size=64, segment_size=128, threshold=0.7, return_stats=True)
    out_t, stats_t = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, importance_kernel="triton", **options)
    out_p, stats_p = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, importance_kernel="torch", **options)
    for got, want in zip(stats_t, stats_p, strict=True):
        assert torch.equal(got.key_positions, want.key_positions) and torch.equal(got.tiles, want.tiles)
    assert [s.importance_kernel for s in stats_t[:2]] == ["triton", "triton"]
    torch.testing.assert_close(out_t, out_p, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("mode", [dict(), dict(gqa="per_head", max_shrink=0.1)])
def test_head_chunks_give_what_one_pass_gives(mode):
    # no memory budget: one KV head per chunk, each chunk's frames built on their own
    lengths = [(700, 700), (257, 600), (50, 150), (0, 300)]
    q, k, v, cu_q, cu_k, _ = packed_batch(lengths, seed=7)
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.7, **mode)
    want, want_stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, config=cfg, return_stats=True)
    with override(min_chunk_bytes=0, chunk_share=0.0):
        got, got_stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, config=cfg, return_stats=True)
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)
    for got_b, want_b in zip(got_stats, want_stats, strict=True):
        assert torch.equal(got_b.tiles, want_b.tiles)
        assert torch.equal(got_b.key_positions, want_b.key_positions)
        assert torch.equal(got_b.density, want_b.density)
        if want_b.sorted_rows is not None:
            assert torch.equal(got_b.sorted_rows, want_b.sorted_rows)
