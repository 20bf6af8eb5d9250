"""exact_last_block: the last query block also keeps key blocks by exact last-block attention mass."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.last_block import last_block_tiles
from flexpbs.permutation import segment_permutation
from tests.helpers import cases, make_qkv, sdpa_causal

FP32_ATOL = 3e-5


@settings(max_examples=100)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    block=st.sampled_from([1, 4, 16]),
    blocks_per_segment=st.integers(1, 3),
    n_segments=st.integers(1, 5),
    tail=st.integers(0, 40),
    threshold=st.sampled_from([0.3, 0.8, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_last_block_tiles_match_reference(
    batch, heads, block, blocks_per_segment, n_segments, tail, threshold, seed
):
    segment = block * blocks_per_segment
    tail = tail % segment
    n_complete = segment * n_segments
    gen = torch.Generator().manual_seed(seed)
    importance = torch.rand(batch, heads, n_complete, generator=gen) ** 4
    importance = importance / importance.sum(-1, keepdim=True)
    perm = segment_permutation(importance, n_complete + tail, segment)
    cfg = PBSConfig(block_size=block, segment_size=segment, threshold=threshold)
    got = last_block_tiles(importance, perm, block_size=block, segment_size=segment, threshold=threshold)
    assert torch.equal(got, reference.last_block(importance, perm, cfg))
    n_blocks = -(-(n_complete + tail) // block)
    last_segment = (n_blocks - 1) // blocks_per_segment
    candidates = torch.arange(n_blocks) // blocks_per_segment < last_segment
    assert not got[..., ~candidates].any()  # only earlier segments
    if threshold == 1.0:
        assert got[..., candidates].all()


@settings(max_examples=6)
@given(
    case=cases(max_len=700, sharp=True),
    threshold=st.sampled_from([0.5, 0.9, 1.0]),
    gqa=st.sampled_from(["shared", "per_head"]),
    mode=st.sampled_from([dict(), dict(key_order="original"), dict(max_shrink=0.1)]),
)
def test_exact_last_block_equals_the_reference_and_only_adds_last_row_tiles(case, threshold, gqa, mode):
    q, k, v = make_qkv(case)
    options = dict(
        block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa, **mode
    )
    out, stats = flexpbs.attention(q, k, v, **options, exact_last_block=True, return_stats=True)
    _, without = flexpbs.attention(q, k, v, **options, return_stats=True)
    assert torch.equal(stats.key_positions, without.key_positions)
    assert torch.equal(stats.tiles[..., :-1, :], without.tiles[..., :-1, :])
    assert (stats.tiles[..., -1, :] >= without.tiles[..., -1, :]).all()
    if not stats.dense:
        # the reference rows on the permutation flexpbs chose (equal to the oracle's up to float32 ties)
        cfg = PBSConfig(**options, exact_last_block=True)
        scores_cfg = cfg if mode.get("key_order") != "original" else PBSConfig(**{**options, "gqa": "shared"})
        rows = reference.last_block(reference.importance(q, k, scores_cfg), stats.key_positions, cfg)
        group = case.q_heads // stats.key_positions.shape[1]
        want = without.tiles.clone()
        want[..., -1, :] |= rows.repeat_interleave(group, dim=1)
        assert torch.equal(stats.tiles, want)
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size)
    torch.testing.assert_close(
        out, reference.masked_attention(q, k, v, mask, case.head_dim**-0.5), rtol=0, atol=FP32_ATOL
    )
    if threshold == 1.0:
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)


def test_reference_pipeline_with_every_option():
    """reference.pbs_attention itself implements the guard and the exact last block."""
    from tests.test_head_guard import hot_key_qkv

    q, k, v = hot_key_qkv()
    for mode in (dict(max_shrink=0.0), dict(key_order="original"), dict()):
        cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.8, exact_last_block=True, **mode)
        out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        ref_out, ref_tiles, ref_perm = reference.pbs_attention(q, k, v, cfg)
        assert torch.equal(stats.tiles, ref_tiles) and torch.equal(stats.key_positions, ref_perm)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=FP32_ATOL)


def test_options_on_a_chunk_equal_the_reference():
    """Chunked prefill (the last Nq of N queries): the guard and the exact last block still match."""
    from tests.test_head_guard import hot_key_qkv

    q, k, v = hot_key_qkv()
    q = q[:, :, -300:]
    for mode in (
        dict(max_shrink=0.0),
        dict(max_shrink=0.0, exact_last_block=True),
        dict(key_order="original", exact_last_block=True),
    ):
        cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.8, **mode)
        out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        ref_out, ref_tiles, ref_perm = reference.pbs_attention(q, k, v, cfg)
        assert torch.equal(stats.tiles, ref_tiles) and torch.equal(stats.key_positions, ref_perm)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=FP32_ATOL)
