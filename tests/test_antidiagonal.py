"""PBS-Attn+ (estimator="antidiagonal"): the fast selection against the float32 oracle, tile for tile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.antidiagonal import strided_columns, strided_rows, tile_scores
from flexpbs.permutation import permute_kv, segment_permutation
from flexpbs.selection import candidate_tiles, select_tiles
from tests.helpers import Case, chunk_cases, make_qkv
from tests.test_attention import FP32_ATOL


def _config(case: Case, threshold: float, stride: int, **options) -> PBSConfig:
    return PBSConfig(
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=threshold,
        estimator="antidiagonal",
        antidiagonal_stride=stride,
        **options,
    )


@settings(max_examples=30)
@given(
    chunk=chunk_cases(max_len=800, sharp=True).filter(lambda c: c[0].seq_len > c[0].segment_size),
    threshold=st.sampled_from([0.3, 0.8, 0.9, 0.99]),
    gqa=st.sampled_from(["shared", "per_head"]),
    stride=st.sampled_from([1, 2, 4, 8, 16, 32]),
)
def test_selection_matches_the_reference_for_prompts_and_chunks(chunk, threshold, gqa, stride):
    case, n_queries = chunk
    q, k, v = make_qkv(case)
    q = q[:, :, case.seq_len - n_queries :]
    cfg = _config(case, threshold, stride, gqa=gqa)
    perm = segment_permutation(reference.importance(q, k, cfg), case.seq_len, case.segment_size)
    k_p, _ = permute_kv(k, v, perm)
    tiles = select_tiles(
        q,
        k_p,
        perm,
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=threshold,
        scale=case.head_dim**-0.5,
        estimator="antidiagonal",
        stride=stride,
    )
    assert torch.equal(tiles, reference.selection(q, k, perm, cfg))


@settings(max_examples=16)
@given(
    chunk=chunk_cases(max_len=800, sharp=True),
    threshold=st.sampled_from([0.5, 0.9]),
    mode=st.sampled_from(
        [
            dict(),
            dict(gqa="per_head"),
            dict(key_order="original"),
            dict(max_shrink=0.1),
            dict(exact_last_block=True),
        ]
    ),
    stride=st.sampled_from([8, PBSConfig.antidiagonal_stride]),
)
def test_attention_equals_the_reference_with_every_option(chunk, threshold, mode, stride):
    case, n_queries = chunk
    q, k, v = make_qkv(case)
    q = q[:, :, case.seq_len - n_queries :]
    cfg = _config(case, threshold, stride, **mode)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    want_out, want_tiles, want_perm = reference.pbs_attention(q, k, v, cfg)
    if torch.equal(stats.key_positions, want_perm):  # else a tie in importance ordered keys differently
        assert torch.equal(stats.tiles, want_tiles)
        torch.testing.assert_close(out, want_out, rtol=0, atol=FP32_ATOL)
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size, n_queries)
    want = reference.masked_attention(q, k, v, mask, case.head_dim**-0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=FP32_ATOL)


def test_strided_rows_pair_each_query_with_the_key_on_its_antidiagonal():
    # k[c] = e_c and q[r] = e_{7-r}: row g's query at offset S-1-t meets column h's key at offset t,
    # so q . k = 1 for all t exactly where (g, h) = (0, 1) or (1, 0), and 0 elsewhere
    stride, d = 4, 8
    eye = torch.eye(d)[None, None]  # [1, 1, 8, 8]
    rows = strided_rows(eye.flip(2), 0, d, 0, stride)  # [1, 1, 2, 32]
    cols = strided_columns(eye, 1, d, stride)
    torch.testing.assert_close((rows @ cols.transpose(-1, -2))[0, 0], torch.tensor([[0.0, 4.0], [4.0, 0.0]]))
    # 3 dummy rows lead 5 queries: the first strided row is (q0, 0, 0, 0) reversed from (0, 0, 0, q0)
    rows = strided_rows(eye[:, :, :5], 0, d, 3, stride)
    torch.testing.assert_close(rows[0, 0, 0], torch.cat([eye[0, 0, 0], torch.zeros(3 * d)]))
    torch.testing.assert_close(rows[0, 0, 1], eye[0, 0, 1:5].flip(0).flatten())


def test_scores_are_probabilities_over_the_candidates():
    case = Case(2, 2, 2, 640, 32, 64, 128, seed=1, sharpness=2.0)
    q, k, _ = make_qkv(case)
    nb = 10
    cand = candidate_tiles(nb, 64, 128, q.device)
    bias = torch.where(cand, 0.0, float("-inf"))
    scores = tile_scores(
        q, k, first_block=2, end_block=nb, columns=8, bias=bias[2:, :8], block_size=64, stride=8,
        scale=32**-0.5, lead=0,
    )  # fmt: skip
    assert scores.shape == (2, 2, (nb - 2) * 2, 8)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 2, (nb - 2) * 2))
    off = ~cand[2:, :8].repeat_interleave(2, dim=0)
    assert (scores[..., off] == 0).all()


def test_a_single_matching_key_is_found_where_mean_pooling_misses_it():
    # The last block's queries look for one needle key in block 3; blocks 8..13 lean towards the
    # same direction on average. Pooled, the leaning blocks win; along antidiagonals the needle does.
    case = Case(1, 1, 1, 1024, 64, 64, 128, seed=7)
    q, k, v = make_qkv(case)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    needle_block, slot, stride, last = 3, 5, 8, case.seq_len - 64
    for g in range(64 // stride):  # in every strided row, the query on the needle's antidiagonal
        q[0, 0, last + g * stride + stride - 1 - slot % stride] += 20.0 * direction
    k[0, 0, needle_block * 64 + slot] = 20.0 * direction
    k[0, 0, 8 * 64 : 14 * 64] += 3.0 * direction
    found = {}
    for estimator in ("mean_pool", "antidiagonal"):
        _, stats = flexpbs.attention(
            q, k, v, block_size=64, segment_size=128, threshold=0.5, key_order="original",
            estimator=estimator, antidiagonal_stride=stride, return_stats=True,
        )  # fmt: skip
        found[estimator] = bool(stats.tiles[0, 0, -1, needle_block])
    assert found == {"mean_pool": False, "antidiagonal": True}


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(estimator="xattention"), ValueError, "estimator must be one of"),
        (dict(estimator="antidiagonal", antidiagonal_stride=3), ValueError, "antidiagonal_stride 3 does not"),
        (dict(antidiagonal_stride=0), ValueError, "antidiagonal_stride must be >= 1"),
        (dict(antidiagonal_stride=8.0), TypeError, "antidiagonal_stride must be an int"),
    ],
)
def test_bad_estimator_options_raise_naming_the_argument(options, error, match):
    with pytest.raises(error, match=match):
        PBSConfig(**options)


def test_mean_pool_ignores_the_stride():
    assert PBSConfig(block_size=4, segment_size=8).antidiagonal_stride == 32  # no error: not read


def test_compiled_prefill_equals_eager():
    case = Case(1, 2, 2, 700, 32, 64, 128, seed=3, sharpness=3.0)
    q, k, v = make_qkv(case)
    options = dict(block_size=64, segment_size=128, threshold=0.6, estimator="antidiagonal")
    eager = flexpbs.attention(q, k, v, **options)
    compiled = torch.compile(lambda q, k, v: flexpbs.attention(q, k, v, **options), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=FP32_ATOL)
