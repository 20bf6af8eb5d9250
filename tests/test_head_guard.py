"""max_shrink (head guard): per permutation row, the importance order or the original order."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.head_guard import mix_orders, sorted_rows
from tests.helpers import Case, cases, make_qkv, sdpa_causal

FP32_ATOL = 3e-5


def hot_key_qkv():
    """KV head 0: every 7th key and all queries of its group share a direction, so sorting packs
    those keys into few blocks and the pooled selection shrinks; KV head 1 stays random."""
    case = Case(1, 2, 2, 900, 32, 64, 128, seed=1)
    q, k, v = make_qkv(case)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    k[0, 0, 3::7] += 3 * u
    q[0, :2] += 3 * u
    return q, k, v


@settings(max_examples=200)
@given(
    batch=st.integers(1, 2),
    perm_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    n_blocks=st.integers(1, 6),
    max_shrink=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.99]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sorted_rows_match_the_reference(batch, perm_heads, group, n_blocks, max_shrink, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, perm_heads * group, n_blocks, n_blocks)
    tiles_sorted = torch.rand(shape, generator=gen) < 0.5
    tiles_original = torch.rand(shape, generator=gen) < 0.5
    keep = sorted_rows(tiles_sorted, tiles_original, perm_heads, max_shrink)
    assert keep.shape == (batch, perm_heads) and keep.dtype == torch.bool
    assert torch.equal(keep, reference.guard(tiles_sorted, tiles_original, perm_heads, max_shrink))
    # equal selections always keep the importance order
    assert sorted_rows(tiles_sorted, tiles_sorted, perm_heads, max_shrink).all()


@settings(max_examples=6)
@given(
    case=cases(max_len=700, sharp=True),
    threshold=st.sampled_from([0.5, 0.8, 0.9, 1.0]),
    gqa=st.sampled_from(["shared", "per_head"]),
    max_shrink=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_guarded_attention_equals_the_reference(case, threshold, gqa, max_shrink):
    q, k, v = make_qkv(case)
    options = dict(block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa)
    cfg = PBSConfig(**options, max_shrink=max_shrink)
    out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    if stats.dense:
        assert stats.sorted_rows is None
    else:
        # the guard on the reference selections of both orders (the sorted order as flexpbs sorted
        # it, which equals the oracle's up to float32 ties: test_attention checks that)
        _, published = flexpbs.attention(q, k, v, **options, return_stats=True)
        sorted_perm = published.key_positions
        original = torch.arange(case.seq_len).expand_as(sorted_perm)
        tiles_sorted = reference.selection(q, k, sorted_perm, cfg)
        tiles_original = reference.selection(q, k, original, cfg)
        keep = reference.guard(tiles_sorted, tiles_original, sorted_perm.shape[1], max_shrink)
        assert torch.equal(stats.sorted_rows, keep)
        perm, tiles = mix_orders(keep, sorted_perm, original, tiles_sorted, tiles_original)
        assert torch.equal(stats.key_positions, perm) and torch.equal(stats.tiles, tiles)
    mask = reference.token_mask(stats.tiles, stats.key_positions, case.block_size)
    want = reference.masked_attention(q, k, v, mask, case.head_dim**-0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=FP32_ATOL)
    if threshold == 1.0:
        torch.testing.assert_close(out, sdpa_causal(q, k, v), rtol=0, atol=FP32_ATOL)


def test_a_row_whose_selection_shrinks_reverts_to_the_original_order():
    q, k, v = hot_key_qkv()
    options = dict(block_size=64, segment_size=128, threshold=0.8)
    _, published = flexpbs.attention(q, k, v, **options, return_stats=True)
    _, unpermuted = flexpbs.attention(q, k, v, **options, key_order="original", return_stats=True)
    counts = lambda s: s.tiles.sum(dim=(-1, -2))  # noqa: E731
    assert counts(published)[0, :2].sum() < counts(unpermuted)[0, :2].sum()  # sorting shrinks head 0
    assert published.sorted_rows.all() and not unpermuted.sorted_rows.any()

    out, guarded = flexpbs.attention(q, k, v, **options, max_shrink=0.0, return_stats=True)
    assert guarded.sorted_rows.tolist() == [[False, True]]
    assert torch.equal(guarded.key_positions[0, 0], unpermuted.key_positions[0, 0])
    assert torch.equal(guarded.key_positions[0, 1], published.key_positions[0, 1])
    assert torch.equal(guarded.tiles[0, :2], unpermuted.tiles[0, :2])
    assert torch.equal(guarded.tiles[0, 2:], published.tiles[0, 2:])
    cfg = PBSConfig(**options, max_shrink=0.0)
    ref_out, ref_tiles, ref_perm = reference.pbs_attention(q, k, v, cfg)
    assert torch.equal(guarded.tiles, ref_tiles) and torch.equal(guarded.key_positions, ref_perm)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=FP32_ATOL)

    # a looser guard lets the shrinking row keep its sorted order: the published algorithm
    out_loose, loose = flexpbs.attention(q, k, v, **options, max_shrink=0.5, return_stats=True)
    assert loose.sorted_rows.all() and torch.equal(loose.tiles, published.tiles)
    torch.testing.assert_close(out_loose, flexpbs.attention(q, k, v, **options), rtol=0, atol=0)


def test_guard_runs_inside_torch_compile():
    q, k, v = hot_key_qkv()
    options = dict(block_size=64, segment_size=128, threshold=0.8, max_shrink=0.0)
    compiled = torch.compile(
        lambda q, k, v: flexpbs.attention(q, k, v, **options), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(compiled(q, k, v), flexpbs.attention(q, k, v, **options), rtol=0, atol=0)
