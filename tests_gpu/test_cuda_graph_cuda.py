"""A call captured in a CUDA graph, including with a cold cache of tile grids (GPU only)."""

import torch

import flexpbs
import flexpbs.tile_grid as grid_module
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")


def test_replay_equals_eager_with_a_cold_grid_cache():
    case = Case(
        batch=1,
        kv_heads=2,
        group=4,
        seq_len=4096,
        head_dim=64,
        block_size=128,
        segment_size=256,
        seed=3,
        sharpness=2.0,
    )
    q, k, v = (x.cuda().to(torch.bfloat16) for x in make_qkv(case))
    call = lambda: flexpbs.attention(q, k, v, min_seq_len=0)  # noqa: E731 (the sparse path at 4K)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles FlexAttention before capture
        call()
    torch.cuda.current_stream().wait_stream(stream)
    grid_module.cached_tile_grid.cache_clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call()
    # Nothing built during capture is cached: its values exist only once the graph replays.
    assert grid_module.cached_tile_grid.cache_info().currsize == 0
    graph.replay()
    torch.cuda.synchronize()
    eager = call()  # fills the cache outside capture
    assert grid_module.cached_tile_grid.cache_info().currsize > 0
    assert torch.equal(static_out, eager)
