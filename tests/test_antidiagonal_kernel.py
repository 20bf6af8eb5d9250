"""The Triton antidiagonal kernel against the PyTorch path it must equal (flexpbs.antidiagonal)."""

import pytest
import torch

# Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

triton = pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import flexpbs.kernels.antidiagonal as kernel  # noqa: E402
from flexpbs.antidiagonal import tile_scores  # noqa: E402
from flexpbs.kernels.antidiagonal import tile_shape, triton_tile_scores  # noqa: E402
from flexpbs.lengths import SequenceLengths  # noqa: E402
from flexpbs.limits import override  # noqa: E402
from flexpbs.selection import candidate_tiles  # noqa: E402
from flexpbs.tile_grid import cdiv  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-6)


def _arguments(n_keys: int, n_queries: int, block: int, segment: int, stride: int, head_dim: int) -> dict:
    """The arguments select_tiles passes for the query blocks that have candidates."""
    n_blocks = cdiv(n_keys, block)
    first_query_block = (n_keys - n_queries) // block
    candidates = candidate_tiles(n_blocks, block, segment, DEVICE, first_query_block)
    per_segment = segment // block
    first = max(0, per_segment - first_query_block)  # the first query block with a candidate
    columns = (n_blocks - 1) // per_segment * per_segment  # the last query block's candidates
    bias = torch.where(candidates, 0.0, float("-inf"))[first:, :columns]
    return dict(
        first_block=first,
        end_block=n_blocks - first_query_block,
        columns=columns,
        bias=bias,
        block_size=block,
        stride=stride,
        scale=head_dim**-0.5,
        lead=(n_keys - n_queries) % block,
    )


@st.composite
def shapes(draw):
    block = draw(st.sampled_from([16, 32]))
    segment = block * draw(st.sampled_from([1, 2]))
    n_keys = draw(st.integers(2 * segment + 1, 6 * block + 5))
    # prompts, and chunks starting inside a block (lead rows) or on its boundary
    n_queries = draw(st.sampled_from([n_keys, n_keys - 1, n_keys - block, 1 + n_keys % block, 3]))
    return dict(
        batch=draw(st.sampled_from([1, 2])),
        kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 3])),
        n_keys=n_keys,
        n_queries=max(1, n_queries),
        head_dim=draw(st.sampled_from([16, 40, 64])),
        block=block,
        segment=segment,
        stride=draw(st.sampled_from([s for s in (1, 2, 4, 8, 16) if block % s == 0])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12)
@given(shape=shapes(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_kernel_matches_torch_path(shape, dtype):
    gen = torch.Generator().manual_seed(shape["seed"])
    b, hk, g, d = shape["batch"], shape["kv_heads"], shape["group"], shape["head_dim"]
    q = (torch.randn(b, hk * g, shape["n_queries"], d, generator=gen) * 3).to(dtype).to(DEVICE)
    k = torch.randn(b, hk, shape["n_keys"], d, generator=gen).to(dtype).to(DEVICE)
    args = _arguments(
        shape["n_keys"], shape["n_queries"], shape["block"], shape["segment"], shape["stride"], d
    )
    assert args["first_block"] < args["end_block"]  # N > 2 segments: the last query block has candidates
    got, want = triton_tile_scores(q, k, **args), tile_scores(q, k, **args)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)


def test_frames_of_sequences_of_different_lengths():
    # three sequences in a frame of 8 blocks of 16: a prompt, a chunk starting mid-block, a short one
    block, segment, stride, d, frame = 16, 32, 4, 32, 128
    n_keys = torch.tensor([128, 100, 70], device=DEVICE)
    n_queries = torch.tensor([128, 37, 70], device=DEVICE)
    lengths = SequenceLengths(n_keys, n_queries, torch.zeros(3, dtype=torch.bool, device=DEVICE))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, frame, d, generator=gen).to(DEVICE)
    k = torch.randn(3, 2, frame, d, generator=gen).to(DEVICE)
    rows = torch.arange(frame, device=DEVICE)
    q = q * lengths.query_rows(frame)[:, None, :, None]
    k = k * (rows < n_keys[:, None])[:, None, :, None]
    args = _arguments(frame, frame, block, segment, stride, d)
    got = triton_tile_scores(q, k, **args, lengths=lengths)
    torch.testing.assert_close(got, tile_scores(q, k, **args, lengths=lengths), **TOL)


def test_strided_inputs_and_the_fake_kernel():
    # [B, N, H, D] activations viewed as [B, H, N, D]; meta tensors (torch.compile) get the same shape
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 90, 4, 32, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    k = torch.randn(1, 90, 2, 32, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    args = _arguments(90, 90, 16, 32, 8, 32)
    got = triton_tile_scores(q, k, **args)
    torch.testing.assert_close(got, tile_scores(q, k, **args), **TOL)
    meta_args = args | dict(bias=args["bias"].to("meta"))
    fake = triton_tile_scores(q.to("meta"), k.to("meta"), **meta_args)
    assert fake.shape == got.shape and fake.dtype == got.dtype


@pytest.mark.parametrize(
    "group, head_dim, stride, dtype",
    [
        (4, 128, 8, torch.bfloat16),
        (4, 128, 16, torch.bfloat16),
        (4, 128, 32, torch.bfloat16),
        (1, 64, 8, torch.float16),
        (3, 128, 4, torch.float32),
    ],
)
@pytest.mark.parametrize("tiles", ["largest", "smallest"])
def test_production_tile_shapes(group, head_dim, stride, dtype, tiles, monkeypatch):
    # block 128: the tile shapes the GPU runs (several heads or query blocks per program, D in chunks);
    # the interpreter has no shared-memory limit, so the smallest tiles are forced
    if tiles == "smallest":
        monkeypatch.setattr(kernel, "TILES", kernel.TILES[-1:])
    gen = torch.Generator().manual_seed(group * stride)
    q = (torch.randn(1, 2 * group, 1100, head_dim, generator=gen) * 3).to(dtype).to(DEVICE)
    k = torch.randn(1, 2, 1100, head_dim, generator=gen).to(dtype).to(DEVICE)
    args = _arguments(1100, 1100, 128, 256, stride, head_dim)
    torch.testing.assert_close(triton_tile_scores(q, k, **args), tile_scores(q, k, **args), **TOL)


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_tiles_are_the_largest_whose_loads_fit_shared_memory(elem_bytes, stride):
    # H100/H200 (227 KB per block), A100 (163 KB), consumer Ampere/Ada (99 KB)
    chosen = []
    for shared in (232_448, 166_912, 101_376):
        shape = tile_shape(4, 128 // stride, 128, elem_bytes, shared)
        rows = shape["QB"] * shape["HEADS"] * shape["R_PAD"]
        cols = shape["KB"] * shape["R_PAD"]
        assert shape["num_stages"] * (rows + cols) * shape["BLOCK_D"] * elem_bytes <= shared
        chosen.append((rows * cols, shape["num_stages"]))
    assert chosen == sorted(chosen, reverse=True)  # less shared memory, never larger tiles
    assert tile_shape(4, 128 // stride, 128, elem_bytes, None) == tile_shape(
        4, 128 // stride, 128, elem_bytes, 232_448
    )


@pytest.mark.parametrize("step_bytes", [1, 40_000])
def test_query_blocks_in_several_launches(step_bytes):
    # the per-program scratch bounded by LIMITS.step_bytes: one query-block group per launch (1 byte),
    # or a few; every launch reuses the scratch of the one before
    gen = torch.Generator().manual_seed(step_bytes)
    q = (torch.randn(2, 6, 200, 32, generator=gen) * 3).to(DEVICE)
    k = torch.randn(2, 2, 200, 32, generator=gen).to(DEVICE)
    args = _arguments(200, 200, 16, 32, 4, 32)
    want = tile_scores(q, k, **args)
    with override(step_bytes=step_bytes):
        got = triton_tile_scores(q, k, **args)
    torch.testing.assert_close(got, want, **TOL)
