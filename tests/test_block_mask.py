import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from flexpbs import reference
from flexpbs.block_mask import build_block_mask, pbs_mask_mod


def _random_case(seed, batch, q_heads, perm_heads, n, block, segment):
    gen = torch.Generator().manual_seed(seed)
    n_complete = n // segment * segment
    perm = torch.arange(n).repeat(batch, perm_heads, 1)
    for b in range(batch):
        for h in range(perm_heads):
            for s in range(0, n_complete, segment):
                perm[b, h, s : s + segment] = s + torch.randperm(segment, generator=gen)
    nb = -(-n // block)
    tiles = torch.rand(batch, q_heads, nb, nb, generator=gen) < 0.5
    return tiles, perm


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    perm_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    n=st.integers(1, 300),
    block=st.sampled_from([16, 32, 64]),
    seg_blocks=st.integers(1, 3),
)
def test_mask_mod_states_the_whole_token_mask(seed, batch, perm_heads, group, n, block, seg_blocks):
    tiles, perm = _random_case(seed, batch, perm_heads * group, perm_heads, n, block, block * seg_blocks)
    mask = create_mask(pbs_mask_mod(tiles, perm, block), batch, perm_heads * group, n, n, device="cpu")
    want = reference.token_mask(tiles, perm, block)  # over ORIGINAL key positions
    group_of = perm.repeat_interleave(group, dim=1)
    in_slot_order = want.gather(-1, group_of[:, :, None, :].expand_as(want))
    assert torch.equal(mask, in_slot_order)


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 2]),
    n=st.integers(1, 300),
    block=st.sampled_from([16, 32, 64]),
    seg_blocks=st.integers(1, 3),
)
def test_block_lists_cover_the_tiles_and_full_blocks_need_no_mask(seed, group, n, block, seg_blocks):
    tiles, perm = _random_case(seed, 1, 2 * group, 2, n, block, block * seg_blocks)
    bm = build_block_mask(tiles, perm, block, block * seg_blocks)
    kv_num, kv_idx = bm.kv_num_blocks, bm.kv_indices
    full_num, full_idx = bm.full_kv_num_blocks, bm.full_kv_indices
    for t in (kv_num, kv_idx, full_num, full_idx):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert kv_idx.shape == full_idx.shape == tiles.shape

    nb = tiles.shape[-1]
    # Tiles of later segments hold no visible key (keys move only inside segments): may be omitted.
    segment = torch.arange(nb) // seg_blocks
    listable = tiles & (segment[None, :] <= segment[:, None])
    token = create_mask(bm.mask_mod, 1, 2 * group, n, n, device="cpu")
    padded = torch.nn.functional.pad(token, (0, nb * block - n, 0, nb * block - n))
    tile_view = padded.unflatten(2, (nb, block)).unflatten(4, (nb, block))  # [b,h,qi,r,kj,c]
    for h in range(2 * group):
        for qb in range(nb):
            partial_list = kv_idx[0, h, qb, : kv_num[0, h, qb]].tolist()
            full_list = full_idx[0, h, qb, : full_num[0, h, qb]].tolist()
            assert partial_list == sorted(set(partial_list)) and full_list == sorted(set(full_list))
            partial, full = set(partial_list), set(full_list)
            assert not partial & full
            # every tile that may hold a visible key is listed; nothing else but later-segment tiles
            assert set(torch.nonzero(listable[0, h, qb]).flatten().tolist()) <= partial | full
            assert partial | full <= set(torch.nonzero(tiles[0, h, qb]).flatten().tolist())
            rows = slice(0, min(block, n - qb * block))
            for kb in full:
                cols = slice(0, min(block, n - kb * block))
                assert tile_view[0, h, qb, rows, kb, cols].all()  # a full block is truly unmasked


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 2]),
    n=st.integers(1, 300),
    block=st.sampled_from([16, 32, 64]),
    seg_blocks=st.integers(1, 3),
    data=st.data(),
)
def test_chunk_mask_mod_states_the_whole_token_mask(seed, group, n, block, seg_blocks, data):
    """Queries at the last Nq positions, aligned to key blocks by dummy rows (dropped here)."""
    n_queries = data.draw(st.integers(1, n))
    offset = n - n_queries
    lead, first = offset % block, offset // block
    tiles, perm = _random_case(seed, 1, 2 * group, 2, n, block, block * seg_blocks)
    tiles = tiles[:, :, first:]  # query block i is aligned to key block first + i
    bm = build_block_mask(tiles, perm, block, block * seg_blocks, query_start=offset - lead)
    mask = create_mask(bm.mask_mod, 1, 2 * group, lead + n_queries, n, device="cpu")[:, :, lead:]
    want = reference.token_mask(tiles, perm, block, n_queries)
    group_of = perm.repeat_interleave(group, dim=1)
    assert torch.equal(mask, want.gather(-1, group_of[:, :, None, :].expand_as(want)))
    # a full block has every key before the block's first (aligned) row
    first_row = offset - lead + torch.arange(tiles.shape[-2]) * block
    last_pos = torch.nn.functional.pad(perm, (0, -n % block), value=-1).unflatten(-1, (-1, block)).amax(-1)
    segment = torch.arange(tiles.shape[-1]) // seg_blocks
    own_segment = segment[first:, None]  # of each query block's key block
    listable = tiles & (segment[None, :] <= own_segment)
    for h in range(2 * group):
        for qb in range(tiles.shape[-2]):
            full = bm.full_kv_indices[0, h, qb, : bm.full_kv_num_blocks[0, h, qb]].tolist()
            partial = bm.kv_indices[0, h, qb, : bm.kv_num_blocks[0, h, qb]].tolist()
            assert not set(full) & set(partial)
            assert set(torch.nonzero(listable[0, h, qb]).flatten().tolist()) <= set(full) | set(partial)
            assert set(full) | set(partial) <= set(torch.nonzero(tiles[0, h, qb]).flatten().tolist())
            for kb in full:
                assert last_pos[0, h // group, kb] <= first_row[qb]


def _listed(num: torch.Tensor, idx: torch.Tensor, nb: int) -> torch.Tensor:
    """Dense bool tiles from block lists; asserts each list is strictly ascending."""
    rank = torch.arange(idx.shape[-1])
    valid = rank < num[..., None].long()
    steps = idx[..., 1:].long() - idx[..., :-1].long()
    assert (steps > 0)[valid[..., 1:]].all()
    counts = torch.zeros(*idx.shape[:-1], nb, dtype=torch.long).scatter_add_(-1, idx.long(), valid.long())
    return counts > 0


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), seg_blocks=st.integers(1, 3), n_queries=st.sampled_from([4096, 3000]))
def test_block_lists_of_long_inputs_banded_by_rows(seed, seg_blocks, n_queries):
    """512 key blocks: the full lists are sorted in several row bands, the partial ones per segment."""
    n, block = 4096, 8
    offset = n - n_queries
    first = offset // block
    tiles, perm = _random_case(seed, 1, 4, 2, n, block, block * seg_blocks)
    tiles = tiles[:, :, first:]
    bm = build_block_mask(tiles, perm, block, block * seg_blocks, query_start=first * block)
    nb = tiles.shape[-1]
    segment = torch.arange(nb) // seg_blocks
    listable = tiles & (segment[None, :] <= segment[first:, None])
    last_pos = perm.unflatten(-1, (-1, block)).amax(-1).repeat_interleave(2, dim=1)  # [1, 4, nb]
    first_row = (first + torch.arange(tiles.shape[-2])) * block
    all_before = last_pos[:, :, None, :] <= first_row[:, None]
    full = _listed(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    partial = _listed(bm.kv_num_blocks, bm.kv_indices, nb)
    assert torch.equal(full, tiles & all_before)  # full tiles are causal: never in a later segment
    assert torch.equal(partial & listable, listable & ~all_before)
    assert not (partial & ~tiles).any()


def test_gpu_kernel_tiles_divide_the_block_size():
    """FlexAttention's GPU kernels fail to lower when their tile does not divide the block."""
    from flexpbs.sparse_attention import flex_kernel_options

    assert flex_kernel_options("cuda", 128, None) is None
    assert flex_kernel_options("cuda", 256, {"num_warps": 8}) == {"num_warps": 8}
    assert flex_kernel_options("cuda", 64, None) == {"BLOCK_M": 64, "BLOCK_N": 64}
    assert flex_kernel_options("cuda", 96, {"num_stages": 2}) == {
        "BLOCK_M": 32,
        "BLOCK_N": 32,
        "num_stages": 2,
    }
    assert flex_kernel_options("cuda", 64, {"BLOCK_M": 32}) == {"BLOCK_M": 32, "BLOCK_N": 64}
    assert flex_kernel_options("cpu", 8, None) is None
    with pytest.raises(ValueError, match="block_size must be a multiple of 16"):
        flex_kernel_options("cuda", 24, None)
    # a default applies only when the caller gives no options, and gets tiles that divide the block
    assert flex_kernel_options("cuda", 128, None, {"num_warps": 8}) == {"num_warps": 8}
    assert flex_kernel_options("cuda", 128, {"num_stages": 2}, {"num_warps": 8}) == {"num_stages": 2}
    assert flex_kernel_options("cuda", 64, None, {"num_warps": 8}) == {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "num_warps": 8,
    }


def test_tuned_kernel_options_only_where_measured():
    """The sm90 tuning was measured for half precision, head dim 128 and blocks of 128 only."""
    from flexpbs.sparse_attention import SM90_KERNEL_OPTIONS, tuned_kernel_options

    assert tuned_kernel_options((9, 0), torch.bfloat16, 128, 128) == SM90_KERNEL_OPTIONS
    assert tuned_kernel_options((9, 0), torch.float16, 128, 256) == SM90_KERNEL_OPTIONS
    for capability, dtype, head_dim, block in [
        (None, torch.bfloat16, 128, 128),
        ((8, 0), torch.bfloat16, 128, 128),
        ((10, 0), torch.bfloat16, 128, 128),
        ((9, 0), torch.float32, 128, 128),
        ((9, 0), torch.bfloat16, 64, 128),
        ((9, 0), torch.bfloat16, 128, 64),
    ]:
        assert tuned_kernel_options(capability, dtype, head_dim, block) is None
