"""After ``flexpbs.warmup``, new prompt lengths and new chunk shapes compile nothing on the GPU.

Compilations are counted, not timed: dynamo's graph count and the JIT caches of the Triton
importance, antidiagonal and row-copy kernels (a new specialisation of any would cost a compile at that
shape).
"""

import itertools
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import flexpbs
from flexpbs.kernels import antidiagonal, rows
from flexpbs.kernels import importance as kernels
from flexpbs.limits import override
from flexpbs.pipeline import kv_heads_per_chunk_of_size

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HEADS, KV_HEADS, D = 8, 2, 128


def compiled_variants() -> int:
    """Dynamo graphs plus compiled variants of the importance, antidiagonal and row-copy kernels and of
    flash-attn-4's kernels, in this process so far."""
    fa4 = sys.modules.get("flash_attn.cute.interface")
    cache = getattr(getattr(fa4, "_flash_attn_fwd", None), "compile_cache", None)
    jit = (
        len(getattr(cache, "cache", cache or ()))
        + kernels.compiled_variants()
        + antidiagonal.compiled_variants()
        + rows.compiled_variants()
    )
    return counters["stats"]["unique_graphs"] + jit


def qkv(n_queries: int, n: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, n_queries, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, KV_HEADS, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


SHAPES = [
    (4096, 4096),
    (5000, 5000),
    (6144, 6144),
    (9001, 9001),
    (12288, 12288),
    (20000, 20000),
    (32768, 32768),
    (1024, 3000),
    (8192, 20000),
    (100, 12345),
    (4097, 32768),
    (129, 5000),
    (1, 7000),
]


def warmed_up_options(backend: str, **extra) -> dict:
    """The sparse-path options (and ``extra``) of a test's calls on ``backend``, after ``flexpbs.warmup``
    for them (call it in the grad mode of those calls); skips the test where the backend is not installed."""
    if backend == "flash":
        pytest.importorskip("flash_attn.cute", reason="backend='flash' needs flash-attn-4")
    options = dict(threshold=0.9, backend=backend, min_seq_len=0, **extra)
    flexpbs.warmup(HEADS, KV_HEADS, D, dtype=torch.bfloat16, device="cuda", **options)
    return options


@pytest.mark.parametrize(
    "backend, estimator", [("triton", "mean_pool"), ("flash", "mean_pool"), ("triton", "antidiagonal")]
)
def test_new_lengths_and_chunks_compile_nothing_after_warmup(backend, estimator):
    """Also PBS+: its kernel's batch and head strides, launch offsets and column counts are runtime values."""
    with torch.inference_mode():
        options = warmed_up_options(backend, estimator=estimator)
        compiled = {}
        for i, (n_queries, n) in enumerate(SHAPES):
            before = compiled_variants()
            out, stats = flexpbs.attention(*qkv(n_queries, n, seed=i), return_stats=True, **options)
            compiled[(n_queries, n)] = compiled_variants() - before
            assert not stats.dense and out.shape == (1, HEADS, n_queries, D)
            assert torch.isfinite(out).all()
    assert not any(compiled.values()), f"compiles per (Nq, N): {compiled}"


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_one_kv_head_chunks_compile_nothing_after_warmup(backend):
    """Long prompts run a KV head at a time (memory); the warm-up, at the default short length, must
    already cover that: the attention graph's single row and the importance kernels' ``kv_heads == 1``
    (without the budget override this first happens near 256K tokens on an 80 GB GPU)."""
    with torch.inference_mode():
        options = warmed_up_options(backend)
        compiled = {}
        for i, (n_queries, n) in enumerate([(9001, 9001), (1024, 20000), (4097, 32768)]):
            inputs = qkv(n_queries, n, seed=i)
            whole = flexpbs.attention(*inputs, **options)  # all KV heads in one chunk
            with override(min_chunk_bytes=0, chunk_share=0.0):  # no budget: one KV head per chunk
                sizes = (1, HEADS, KV_HEADS, n, D, D, torch.bfloat16, 128, False)
                assert kv_heads_per_chunk_of_size(*sizes) == 1
                before = compiled_variants()
                out = flexpbs.attention(*inputs, **options)
                compiled[(n_queries, n)] = compiled_variants() - before
            torch.testing.assert_close(out, whole)
    assert not any(compiled.values()), f"compiles per (Nq, N): {compiled}"


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_the_transformers_layout_compiles_nothing_after_warmup(backend):
    """transformers passes ``[B, N, H, D]`` projections seen as ``[B, H, N, D]``: the attention stage copies
    such queries with the row kernel (flexpbs.rows.contiguous_rows), whose variant the warm-up compiled,
    and gives what contiguous inputs give."""
    with torch.inference_mode():
        options = warmed_up_options(backend)
        compiled = {}
        for i, (n_queries, n) in enumerate([(9001, 9001), (1024, 20480), (4096, 4096)]):
            inputs = qkv(n_queries, n, seed=i)
            want = flexpbs.attention(*inputs, **options)
            strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
            before = compiled_variants()
            got = flexpbs.attention(*strided, **options)
            compiled[(n_queries, n)] = compiled_variants() - before
            assert torch.equal(got, want)
    assert not any(compiled.values()), f"compiles per (Nq, N): {compiled}"


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_packed_and_padded_batches_compile_nothing_after_warmup(backend):
    """A serving engine's first packed batch: the warm-up also runs one, so nothing a frame needs (the
    importance kernels with per-sequence lengths, the row copies) compiles after it."""
    with torch.inference_mode():
        options = warmed_up_options(backend)
        before = compiled_variants()
        lengths = [9001, 3000, 20000, 700]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(sum(lengths), h, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (HEADS, KV_HEADS, KV_HEADS)
        )
        out = flexpbs.varlen_attention(q, k, v, cu, cu, **options)
        assert torch.isfinite(out).all()
        q, k, v = qkv(12000, 12000, seed=3)
        valid = torch.arange(12000, device="cuda") < torch.tensor([[12000], [5000]], device="cuda")
        q, k, v = (torch.cat([x, x]) for x in (q, k, v))
        out = flexpbs.attention(q, k, v, valid_keys=valid, **options)
        assert torch.isfinite(out[1, :, :5000]).all()
        assert compiled_variants() == before
