"""The Triton importance kernel against the PyTorch path it must equal (flexpbs.importance)."""

import pytest
import torch

# Without a GPU the kernels run in the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before anything imports triton (flexpbs imports torch._dynamo, which imports triton).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

triton = pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import flexpbs  # noqa: E402
from flexpbs.importance import last_block_importance  # noqa: E402
from flexpbs.kernels import importance as kernel_module  # noqa: E402
from flexpbs.kernels.importance import triton_last_block_importance  # noqa: E402
from flexpbs.lengths import SequenceLengths  # noqa: E402
from tests.helpers import Case, make_qkv  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernel sums exp2 of base-2 logits; the torch path takes softmax of natural logits.
TOL = dict(rtol=1e-4, atol=1e-7)


def _inputs(case: Case, dtype: torch.dtype):
    q, k, _ = make_qkv(case, dtype)
    return q.to(DEVICE), k.to(DEVICE)


def _both(q, k, case: Case, per_query_head: bool, **tiling):
    args = dict(
        block_size=case.block_size,
        segment_size=case.segment_size,
        scale=case.head_dim**-0.5,
        per_query_head=per_query_head,
    )
    want = last_block_importance(q, k, **args)
    if tiling:
        got = kernel_module.launch(q, k, **args, **tiling)
    else:
        got = triton_last_block_importance(q, k, **args)
    return got, want


@st.composite
def small_cases(draw) -> Case:
    # Small blocks and lengths: the interpreter runs every program in Python.
    block = draw(st.sampled_from([16, 32]))
    segment = block * draw(st.sampled_from([1, 2, 4]))
    seq_len = draw(
        st.one_of(
            st.integers(1, 300),
            st.sampled_from([segment - 1, segment, segment + 1, 2 * segment + block + 3, 511, 700]),
        ).filter(lambda n: n >= 1)
    )
    return Case(
        batch=draw(st.sampled_from([1, 2])),
        kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 3, 4])),
        seq_len=seq_len,
        head_dim=draw(st.sampled_from([16, 32, 64, 100, 128])),
        block_size=block,
        segment_size=segment,
        seed=draw(st.integers(0, 2**31 - 1)),
        sharpness=draw(st.sampled_from([1.0, 4.0])),
    )


@settings(max_examples=30)
@given(case=small_cases(), dtype=st.sampled_from(DTYPES), per_query_head=st.booleans())
def test_kernel_matches_torch_path(case, dtype, per_query_head):
    q, k = _inputs(case, dtype)
    got, want = _both(q, k, case, per_query_head)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    if got.shape[-1]:
        ones = torch.ones(got.shape[:2], device=DEVICE)
        torch.testing.assert_close(got.sum(-1), ones, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "block_m, block_n, splits",
    [(16, 16, 1), (16, 16, 5), (32, 64, 2), (64, 32, 64)],
)
@pytest.mark.parametrize("per_query_head", [False, True])
def test_tiling_and_key_splits_do_not_change_the_result(block_m, block_n, splits, per_query_head):
    # 24 rows per head: row tiles straddle query heads; 200 complete keys: ragged last key tile.
    case = Case(
        batch=1, kv_heads=2, group=3, seq_len=213, head_dim=32, block_size=24, segment_size=40, seed=3
    )
    q, k = _inputs(case, torch.float32)
    got, want = _both(q, k, case, per_query_head, block_m=block_m, block_n=block_n, splits=splits)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale(scale):
    # The kernel takes the row max of raw products and scales it afterwards: a negative scale flips it.
    case = Case(
        batch=1, kv_heads=1, group=2, seq_len=100, head_dim=32, block_size=16, segment_size=32, seed=7
    )
    q, k = _inputs(case, torch.float32)
    for per_query_head in (False, True):
        args = dict(block_size=16, segment_size=32, scale=scale, per_query_head=per_query_head)
        want = last_block_importance(q, k, **args)
        torch.testing.assert_close(triton_last_block_importance(q, k, **args), want, **TOL)
        torch.testing.assert_close(kernel_module.launch(q, k, **args, block_n=16, splits=3), want, **TOL)


@pytest.mark.parametrize("n_queries", [1, 13, 40, 150])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_chunk_queries_fewer_than_keys(n_queries, per_query_head):
    # A chunk: the last n_queries queries score every complete segment of the 213 keys.
    case = Case(
        batch=2, kv_heads=2, group=2, seq_len=213, head_dim=32, block_size=24, segment_size=40, seed=5
    )
    q, k = _inputs(case, torch.float32)
    q = q[:, :, 213 - n_queries :]
    got, want = _both(q, k, case, per_query_head)
    assert got.shape[-1] == 200
    torch.testing.assert_close(got, want, **TOL)
    # the op's fake kernel (what torch.compile and meta tensors see) agrees on the shape
    args = dict(block_size=24, segment_size=40, scale=0.2, per_query_head=per_query_head)
    fake = kernel_module.triton_last_block_importance(q.to("meta"), k.to("meta"), **args)
    assert fake.shape == got.shape and fake.dtype == got.dtype


def test_strided_inputs():
    # [B, N, H, D] activations viewed as [B, H, N, D], as attention layers usually pass them.
    case = Case(batch=1, kv_heads=2, group=2, seq_len=97, head_dim=64, block_size=32, segment_size=32, seed=4)
    q, k = _inputs(case, torch.bfloat16)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_strided.is_contiguous()
    got, want = _both(q_strided, k_strided, case, per_query_head=False)
    torch.testing.assert_close(got, want, **TOL)


def test_custom_op_registration_and_compile():
    case = Case(batch=1, kv_heads=1, group=2, seq_len=70, head_dim=16, block_size=16, segment_size=32, seed=6)
    q, k = _inputs(case, torch.float32)
    torch.library.opcheck(torch.ops.flexpbs.last_block_importance.default, (q, k, 16, 32, 0.25, True))
    lengths = (torch.tensor([70]), torch.tensor([40]), torch.tensor([False]))  # a frame of one sequence
    torch.library.opcheck(
        torch.ops.flexpbs.last_block_importance.default, (q, k, 16, 32, 0.25, False, *lengths)
    )

    def score(q, k):
        args = dict(block_size=16, segment_size=32, scale=0.25, per_query_head=False)
        return triton_last_block_importance(q, k, **args) * 2

    # On CPU aot_eager traces through the fake kernel like inductor does, without a C++ compile.
    compiled = torch.compile(score, backend="inductor" if DEVICE == "cuda" else "aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k), score(q, k))
    assert compiled(q, k).shape == (1, 1, 64)


@pytest.mark.parametrize(
    "q_shape, k_shape, dtypes, error",
    [
        ((1, 2, 8, 16), (1, 2, 8), (torch.float32, torch.float32), ValueError),
        ((1, 3, 8, 16), (1, 2, 8, 16), (torch.float32, torch.float32), ValueError),
        ((1, 2, 8, 512), (1, 2, 8, 512), (torch.float32, torch.float32), ValueError),
        ((1, 2, 8, 16), (1, 2, 8, 16), (torch.float32, torch.float16), TypeError),
    ],
)
def test_rejects_bad_inputs(q_shape, k_shape, dtypes, error):
    q = torch.zeros(q_shape, dtype=dtypes[0], device=DEVICE)
    k = torch.zeros(k_shape, dtype=dtypes[1], device=DEVICE)
    with pytest.raises(error):
        triton_last_block_importance(q, k, block_size=8, segment_size=8, scale=1.0, per_query_head=False)


@settings(max_examples=4)
@given(
    seq_len=st.sampled_from([150, 300]),  # few lengths: each new shape compiles FlexAttention
    group=st.sampled_from([1, 2]),
    gqa=st.sampled_from(["shared", "per_head"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pipeline_with_the_triton_kernel_equals_the_torch_path(seq_len, group, gqa, seed):
    case = Case(
        batch=1,
        kv_heads=2,
        group=group,
        seq_len=seq_len,
        head_dim=16,
        block_size=32,
        segment_size=64,
        seed=seed,
        sharpness=3.0,
    )
    q, k = _inputs(case, torch.float32)
    v = torch.randn_like(k)
    opts = dict(block_size=32, segment_size=64, threshold=0.7, gqa=gqa, return_stats=True)
    out_t, st_t = flexpbs.attention(q, k, v, importance_kernel="triton", **opts)
    out_r, st_r = flexpbs.attention(q, k, v, importance_kernel="torch", **opts)
    assert (st_t.importance_kernel, st_r.importance_kernel) == ("triton", "torch")
    n_complete = seq_len // 64 * 64
    imp = last_block_importance(
        q, k, block_size=32, segment_size=64, scale=0.25, per_query_head=gqa == "per_head"
    )
    # identical permutations, except where importances tie to float32 rounding
    got = imp.gather(-1, st_t.key_positions[..., :n_complete])
    want = imp.gather(-1, st_r.key_positions[..., :n_complete])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    if torch.equal(st_t.key_positions, st_r.key_positions):
        assert torch.equal(st_t.tiles, st_r.tiles)
        torch.testing.assert_close(out_t, out_r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_query_head", [False, True])
def test_kernel_takes_per_sequence_lengths_of_a_frame(per_query_head):
    """Sequences of different lengths in a frame: each row of the batch equals the kernel (and the
    PyTorch path) on that sequence alone; a sequence without complete segments gets no columns."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(3, 4, 640, 32, generator=gen), torch.randn(3, 2, 640, 32, generator=gen)
    lengths = SequenceLengths(
        torch.tensor([640, 300, 100]), torch.tensor([640, 50, 100]), torch.tensor([0, 0, 1]).bool()
    )
    args = dict(block_size=64, segment_size=128, scale=0.2, per_query_head=per_query_head)
    got = kernel_module.triton_last_block_importance(q, k, **args, lengths=lengths)
    torch.testing.assert_close(got, last_block_importance(q, k, **args, lengths=lengths), **TOL)
    for b, (n, n_q) in enumerate([(640, 640), (300, 50)]):
        alone = kernel_module.triton_last_block_importance(
            q[b : b + 1, :, n - n_q : n], k[b : b + 1, :, :n], **args
        )
        torch.testing.assert_close(got[b : b + 1, :, : alone.shape[-1]], alone, **TOL)
        assert (got[b, :, alone.shape[-1] :] == 0).all()
    assert (got[2] == 0).all()  # 100 keys: no complete segment
