import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.permutation import block_first_positions, permute_kv, segment_permutation
from flexpbs.selection import (
    candidate_tiles,
    forced_tiles,
    pool_blocks,
    select_tiles,
    threshold_tiles,
)
from tests.helpers import cases, chunk_cases, make_qkv, pooled_block_probs


def _pipeline(case, threshold, gqa="shared"):
    q, k, v = make_qkv(case)
    cfg = PBSConfig(block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa)
    perm = segment_permutation(reference.importance(q, k, cfg), case.seq_len, case.segment_size)
    k_p, _ = permute_kv(k, v, perm)
    scale = case.head_dim**-0.5
    tiles = select_tiles(
        q,
        k_p,
        perm,
        block_size=case.block_size,
        segment_size=case.segment_size,
        threshold=threshold,
        scale=scale,
    )
    return q, k, k_p, perm, tiles, cfg


long_cases = cases(sharp=True).filter(lambda c: c.seq_len > c.segment_size)


@settings(max_examples=40)
@given(
    case=long_cases,
    threshold=st.sampled_from([0.3, 0.8, 0.9, 0.99, 1.0]),
    gqa=st.sampled_from(["shared", "per_head"]),
)
def test_selection_matches_reference(case, threshold, gqa):
    q, k, _, perm, tiles, cfg = _pipeline(case, threshold, gqa)
    assert torch.equal(tiles, reference.selection(q, k, perm, cfg))


@settings(max_examples=60)
@given(case=long_cases, threshold=st.floats(0.05, 1.0))
def test_selection_is_the_minimal_prefix_reaching_threshold(case, threshold):
    q, _, k_p, perm, tiles, _ = _pipeline(case, threshold)
    nb = tiles.shape[-1]
    cand = candidate_tiles(nb, case.block_size, case.segment_size, q.device)
    probs = pooled_block_probs(q, k_p, cand, case.block_size, case.head_dim**-0.5)
    chosen = threshold_tiles(probs, cand, threshold)
    assert not (chosen & ~cand).any()
    # Every selected candidate also appears in the final tiles.
    assert not (chosen & ~tiles).any()
    mass = (probs * chosen).sum(-1)
    has_cand = cand.any(-1).expand_as(mass)
    n_chosen = chosen.sum(-1)
    # reaches the threshold (or keeps everything when rounding stops short)
    reached = mass >= threshold - 1e-6
    all_kept = n_chosen == cand.sum(-1)
    assert (reached | all_kept)[has_cand].all()
    # minimal: dropping the weakest chosen block falls below the threshold
    weakest = probs.masked_fill(~chosen, 2.0).amin(-1)
    if threshold < 1.0:
        assert ((mass - weakest < threshold + 1e-6) | (n_chosen == 0))[has_cand].all()
    # greedy order: no unchosen candidate outweighs a chosen one
    strongest_left = probs.masked_fill(chosen | ~cand, -1.0).amax(-1)
    assert (strongest_left <= weakest + 1e-7).all()


@settings(max_examples=60)
@given(case=long_cases, threshold=st.floats(0.05, 1.0), gqa=st.sampled_from(["shared", "per_head"]))
def test_sink_and_own_segment_always_computed_and_nothing_in_the_future(case, threshold, gqa):
    q, _, _, perm, tiles, _ = _pipeline(case, threshold, gqa)
    group = tiles.shape[1] // perm.shape[1]
    first = block_first_positions(perm, case.block_size)
    first = first.repeat_interleave(group, dim=1)
    nb = tiles.shape[-1]
    n = case.seq_len
    per_seg = case.segment_size // case.block_size
    seg = torch.arange(nb) // per_seg
    last_query = ((torch.arange(nb) + 1) * case.block_size).clamp_max(n) - 1
    visible = first[:, :, None, :] <= last_query[:, None]
    # the sink block (holding original token 0) is computed for every query block
    sink = first == 0
    assert (sink.sum(-1) == 1).all()
    assert (tiles | ~sink[:, :, None, :]).all()
    # every own-segment block holding a key the query block may see is computed
    own = (seg[:, None] == seg[None, :]) & visible
    assert (tiles | ~own).all()
    # no tile lies wholly in the future of its query block
    assert not (tiles & ~visible).any()
    # every query row keeps at least its own key: the diagonal's block is computed
    for b in range(tiles.shape[0]):
        for h in range(tiles.shape[1]):
            slot_of = torch.empty(n, dtype=torch.long)
            slot_of[perm[b, h // group]] = torch.arange(n)
            own_block = slot_of // case.block_size
            assert tiles[b, h, torch.arange(n) // case.block_size, own_block].all()


@settings(max_examples=25)
@given(
    chunk=chunk_cases(sharp=True).filter(lambda c: c[0].seq_len > c[0].segment_size),
    threshold=st.sampled_from([0.3, 0.8, 0.9, 1.0]),
    gqa=st.sampled_from(["shared", "per_head"]),
)
def test_chunk_selection_matches_reference_and_sees_nothing_in_the_future(chunk, threshold, gqa):
    case, n_queries = chunk
    q, k, v = make_qkv(case)
    q = q[:, :, case.seq_len - n_queries :]
    cfg = PBSConfig(block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, gqa=gqa)
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
    )
    assert torch.equal(tiles, reference.selection(q, k, perm, cfg))
    # query block i is aligned to key block first + i; no tile lies wholly after its last query
    first = (case.seq_len - n_queries) // case.block_size
    nb = -(-case.seq_len // case.block_size)
    assert tiles.shape[-2:] == (nb - first, nb)
    group = tiles.shape[1] // perm.shape[1]
    first_pos = block_first_positions(perm, case.block_size)
    last_query = ((torch.arange(first, nb) + 1) * case.block_size).clamp_max(case.seq_len) - 1
    visible = first_pos.repeat_interleave(group, dim=1)[:, :, None, :] <= last_query[:, None]
    assert not (tiles & ~visible).any()


def test_threshold_one_keeps_every_candidate_even_if_probabilities_underflow():
    probs = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]])
    cand = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    assert torch.equal(threshold_tiles(probs, cand, 1.0)[0, 0], cand)
    # just under 1: the underflowed candidate is not needed
    assert threshold_tiles(probs, cand, 0.999)[0, 0].tolist() == [
        [False, False, False],
        [True, False, False],
        [True, False, False],
    ]


def test_threshold_tiles_leaves_its_input_alone():
    """The selection sorts its own probabilities in place; the public function must not."""
    probs = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.7, 0.0]]]])
    cand = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    before = probs.clone()
    assert threshold_tiles(probs, cand, 0.5)[0, 0].tolist() == [
        [False, False, False],
        [True, False, False],
        [False, True, False],
    ]
    assert torch.equal(probs, before)


def test_partial_last_block_is_pooled_over_real_tokens():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = pool_blocks(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]
    # a chunk aligned to key blocks: 3 dummy rows lead the first block and are not pooled
    assert pool_blocks(x, 4, lead=3).flatten().tolist() == [0.0, 2.5, 6.5, 9.0]
    assert pool_blocks(x[:, :, :1], 4, lead=3).flatten().tolist() == [0.0]


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2049, 4096),
    seg_blocks=st.sampled_from([1, 2, 3]),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
    estimator=st.sampled_from(["mean_pool", "antidiagonal"]),
    budget=st.sampled_from([0.2, 0.6, 1.0]),
)
def test_row_bands_select_exactly_what_whole_rows_select(seed, n, seg_blocks, threshold, estimator, budget):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, 16, generator=gen)
    k_p = torch.randn(1, 2, n, 16, generator=gen)
    perm = torch.arange(n).expand(1, 2, n)
    options = dict(
        block_size=8,
        segment_size=8 * seg_blocks,
        threshold=threshold,
        scale=0.25,
        estimator=estimator,
        stride=4,
    )
    chunk = q[:, :, 37:]  # a chunk: query blocks aligned to key blocks 4.. (offset 37, block 8)
    banded = select_tiles(q, k_p, perm, **options)  # nb >= 257: several bands
    banded_chunk = select_tiles(chunk, k_p, perm, **options)
    nb = banded.shape[-1]
    with flexpbs.limits.override(max_bands=1):  # one band of whole rows
        whole = select_tiles(q, k_p, perm, **options)
        whole_chunk = select_tiles(chunk, k_p, perm, **options)
    # byte budgets (a share of all rows' float32 scores): antidiagonal scores of one band, of several
    # bands in one call, of all; below one band's sort, a call per KV head
    with flexpbs.limits.override(step_bytes=int(budget * 4 * 4 * nb * nb)):
        spans = select_tiles(q, k_p, perm, **options)
        spans_chunk = select_tiles(chunk, k_p, perm, **options)
    assert nb >= 257 and torch.equal(banded, whole)
    assert torch.equal(banded_chunk, whole_chunk)
    assert torch.equal(spans, whole) and torch.equal(spans_chunk, whole_chunk)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    n=st.integers(1, 1200),
    offset=st.integers(0, 300),
    threshold=st.sampled_from([0.5, 0.9]),
    estimator=st.sampled_from(["mean_pool", "antidiagonal"]),
)
def test_head_chunks_select_exactly_what_all_heads_at_once_select(
    seed, batch, kv_heads, group, n, offset, threshold, estimator
):
    """A byte budget below one KV head's rows: every head chunk is one KV head (and its query heads)."""
    gen = torch.Generator().manual_seed(seed)
    k_p = torch.randn(batch, kv_heads, n + offset, 16, generator=gen)
    q = torch.randn(batch, kv_heads * group, n, 16, generator=gen)
    perm = torch.arange(n + offset).expand(batch, kv_heads, -1)
    options = dict(
        block_size=16, segment_size=32, threshold=threshold, scale=0.5, estimator=estimator, stride=4
    )
    whole = select_tiles(q, k_p, perm, **options)
    with flexpbs.limits.override(step_bytes=1):
        chunked = select_tiles(q, k_p, perm, **options)
    assert torch.equal(whole, chunked)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 700),
    block=st.sampled_from([16, 32, 64]),
    seg_blocks=st.integers(1, 4),
    first_query_block=st.integers(0, 5),
)
def test_forced_tiles_match_their_definition(seed, n, block, seg_blocks, first_query_block):
    """Sink block and own-segment blocks holding a key at or before the query block's last query,
    written column by column (short last segments included), against the definition tile by tile."""
    segment = block * seg_blocks
    gen = torch.Generator().manual_seed(seed)
    perm = torch.arange(n).repeat(1, 2, 1)
    for h in range(2):
        for s0 in range(0, n // segment * segment, segment):
            perm[0, h, s0 : s0 + segment] = s0 + torch.randperm(segment, generator=gen)
    nb = -(-n // block)
    first_query_block = min(first_query_block, nb - 1)
    got = forced_tiles(perm, block, segment, first_query_block)
    first_pos = block_first_positions(perm, block)
    want = torch.zeros(1, 2, nb - first_query_block, nb, dtype=torch.bool)
    for h in range(2):
        for i in range(nb - first_query_block):
            row_block = first_query_block + i
            last_query = min((row_block + 1) * block, n) - 1
            for j in range(nb):
                own = j // seg_blocks == row_block // seg_blocks and first_pos[0, h, j] <= last_query
                want[0, h, i, j] = own or bool(first_pos[0, h, j] == 0)
    assert torch.equal(got, want)
