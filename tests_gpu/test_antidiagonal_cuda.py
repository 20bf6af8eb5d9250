"""GPU-only checks of PBS-Attn+ (estimator="antidiagonal"): the fused kernel on long inputs, the CUDA
pipeline against the float32 oracle, and CUDA-graph capture."""

import pytest
import torch

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.antidiagonal import tile_scores
from flexpbs.kernels.antidiagonal import triton_tile_scores
from flexpbs.selection import candidate_tiles
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")

TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, head_dim, stride",
    [
        (torch.bfloat16, 128, 8),
        (torch.bfloat16, 128, 16),
        (torch.bfloat16, 128, 32),
        (torch.float16, 64, 8),
        (torch.float32, 128, 4),
    ],
)
def test_kernel_matches_torch_path_on_a_long_input(dtype, head_dim, stride):
    case = Case(batch=1, kv_heads=2, group=4, seq_len=16384, head_dim=head_dim, block_size=128,
                segment_size=256, seed=2, sharpness=2.0)  # fmt: skip
    q, k, _ = make_qkv(case, dtype)
    q, k = q.cuda(), k.cuda()
    nb = 128
    bias = torch.where(candidate_tiles(nb, 128, 256, q.device), 0.0, float("-inf"))
    args = dict(first_block=2, end_block=nb, columns=nb - 2, bias=bias[2:, : nb - 2], block_size=128,
                stride=stride, scale=head_dim**-0.5, lead=0)  # fmt: skip
    torch.testing.assert_close(triton_tile_scores(q, k, **args), tile_scores(q, k, **args), **TOL)


@pytest.mark.parametrize("n_queries", [3000, 1111])
def test_cuda_pipeline_selects_what_the_oracle_selects(n_queries):
    case = Case(batch=2, kv_heads=2, group=2, seq_len=3000, head_dim=64, block_size=128, segment_size=256,
                seed=9, sharpness=3.0)  # fmt: skip
    q, k, v = make_qkv(case)
    q = q[:, :, 3000 - n_queries :]
    cfg = PBSConfig(threshold=0.8, estimator="antidiagonal", min_seq_len=0, backend="triton")
    _, stats = flexpbs.attention(q.cuda(), k.cuda(), v.cuda(), config=cfg, return_stats=True)
    perm = stats.key_positions.cpu()
    assert torch.equal(stats.tiles.cpu(), reference.selection(q, k, perm, cfg))


def test_cuda_graph_capture_replays_the_same_output():
    q, k, v = (x.cuda() for x in make_qkv(Case(1, 2, 2, 8192, 128, 128, 256, seed=1), torch.bfloat16))
    options = dict(estimator="antidiagonal", min_seq_len=0)
    want = flexpbs.attention(q, k, v, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flexpbs.attention(q, k, v, **options)
    graph.replay()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
