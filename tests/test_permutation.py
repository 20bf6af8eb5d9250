import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexpbs.permutation import block_first_positions, block_last_positions, permute_kv, segment_permutation
from tests.helpers import cases, make_qkv


@settings(max_examples=200)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    segment=st.sampled_from([1, 4, 64, 128]),
    n_segments=st.integers(1, 6),
    tail=st.integers(0, 127),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_permutation_sorts_inside_segments(batch, heads, segment, n_segments, tail, ties, seed):
    tail = tail % segment if segment > 1 else 0
    gen = torch.Generator().manual_seed(seed)
    n_complete = segment * n_segments
    scores = torch.rand(batch, heads, n_complete, generator=gen)
    if ties:
        scores = (scores * 4).floor()  # many exact ties: the sort must be stable
    perm = segment_permutation(scores, n_complete + tail, segment)

    assert perm.dtype == torch.int64 and perm.shape == (batch, heads, n_complete + tail)
    segs = perm[..., :n_complete].view(batch, heads, n_segments, segment)
    starts = torch.arange(0, n_complete, segment).view(1, 1, -1, 1)
    # a bijection of each segment onto itself
    assert torch.equal(segs.sort(dim=-1).values, (starts + torch.arange(segment)).expand_as(segs))
    # the tail stays in place
    assert torch.equal(
        perm[..., n_complete:], torch.arange(n_complete, n_complete + tail).expand(batch, heads, -1)
    )
    # importance is non-increasing along each segment, and ties keep their original order
    sorted_scores = scores.gather(-1, perm[..., :n_complete]).view(batch, heads, n_segments, segment)
    assert (sorted_scores[..., 1:] <= sorted_scores[..., :-1]).all()
    tied = sorted_scores[..., 1:] == sorted_scores[..., :-1]
    assert (segs[..., 1:] > segs[..., :-1])[tied].all()


@settings(max_examples=40)
@given(case=cases(), copies=st.sampled_from([1, 2]))
def test_permute_kv_gathers_each_head(case, copies):
    _, k, v = make_qkv(case, value_dim=24)
    gen = torch.Generator().manual_seed(case.seed)
    perm = torch.stack(
        [torch.randperm(case.seq_len, generator=gen) for _ in range(case.batch * case.kv_heads * copies)]
    ).view(case.batch, case.kv_heads * copies, case.seq_len)
    k_p, v_p = permute_kv(k, v, perm)
    for b in range(case.batch):
        for h in range(case.kv_heads * copies):
            assert torch.equal(k_p[b, h], k[b, h // copies][perm[b, h]])
            assert torch.equal(v_p[b, h], v[b, h // copies][perm[b, h]])


def test_block_position_bounds_ignore_padding():
    perm = torch.tensor([[[3, 0, 2, 1, 4]]])
    first, last = block_first_positions(perm, 2), block_last_positions(perm, 2)
    assert first.tolist() == [[[0, 1, 4]]]
    assert last.tolist() == [[[3, 2, 4]]]


@settings(max_examples=30)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    head_dim=st.integers(1, 12),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_permute_kv_copies_rows_bitwise_whatever_their_width(dtype, head_dim, transposed, seed):
    """Rows of a multiple of 8 bytes move as int64 words, others element by element: same bits."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 7, 3, head_dim) if transposed else (2, 3, 7, head_dim)
    key = torch.randn(shape, generator=gen).to(dtype)
    key = key.transpose(1, 2) if transposed else key  # [2, 3, 7, D], strided
    perm = torch.stack([torch.randperm(7, generator=gen) for _ in range(6)]).view(2, 3, 7)
    key_p, value_p = permute_kv(key, key[..., : max(1, head_dim - 1)], perm)
    want = torch.stack([torch.stack([key[b, h, perm[b, h]] for h in range(3)]) for b in range(2)])
    assert key_p.dtype == dtype and torch.equal(key_p.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(
        value_p.view(torch.uint8), want[..., : max(1, head_dim - 1)].contiguous().view(torch.uint8)
    )
