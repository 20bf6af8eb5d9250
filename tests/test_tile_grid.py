from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexpbs
import flexpbs.tile_grid as grid_module
from flexpbs import PBSConfig
from flexpbs.tile_grid import build_tile_grid, tile_grid
from tests.helpers import cases, make_qkv


@st.composite
def grids(draw):
    block = draw(st.sampled_from([16, 32, 64]))
    block_size, segment_size = block, block * draw(st.sampled_from([1, 2, 4]))
    n_blocks = draw(st.integers(1, 40))
    n_keys = draw(st.integers((n_blocks - 1) * block_size + 1, n_blocks * block_size))
    first = draw(st.integers(0, n_blocks - 1))
    return n_blocks - first, n_blocks, first, n_keys, block_size, segment_size


@settings(max_examples=80)
@given(args=grids())
def test_grid_matches_its_definition(args):
    q_blocks, n_blocks, first, n_keys, block_size, segment_size = args
    grid = tile_grid(*args, torch.device("cpu"))
    per_segment = segment_size // block_size
    for j in range(n_blocks):
        assert grid.columns[j] == j and grid.key_segment[j] == j // per_segment
    for i in range(q_blocks):
        block = first + i
        assert grid.query_segment[i, 0] == block // per_segment
        assert grid.query_start[i, 0] == block * block_size
        assert grid.query_end[i, 0] == min((block + 1) * block_size, n_keys) - 1


def test_grid_is_built_once_per_shape():
    args = (6, 8, 2, 1000, 128, 256, torch.device("cpu"))
    assert tile_grid(*args) is tile_grid(*args)
    assert tile_grid(*args) is not build_tile_grid(*args)


@settings(max_examples=5)  # each new shape compiles FlexAttention (seconds on CPU)
@given(case=cases(sharp=True), threshold=st.sampled_from([0.5, 0.9]))
def test_calls_leave_cached_grids_unchanged(case, threshold):
    """The pipeline reads cached grids and must never write into them."""
    q, k, v = make_qkv(case)
    cfg = PBSConfig(
        block_size=case.block_size, segment_size=case.segment_size, threshold=threshold, exact_last_block=True
    )
    seen, cached = {}, grid_module.cached_tile_grid

    def recording(*key):
        seen[key] = cached(*key)
        return seen[key]

    with mock.patch.object(grid_module, "cached_tile_grid", recording):
        flexpbs.attention(q, k, v, config=cfg)
        before = {key: [t.clone() for t in grid] for key, grid in seen.items()}
        flexpbs.attention(q, k, v, config=cfg)
    assert seen or case.seq_len <= case.segment_size  # dense: short (the CPU has no other dense minimum)
    for key, grid in seen.items():
        assert all(torch.equal(a, b) for a, b in zip(grid, before[key], strict=True))
