"""``flexpbs.warmup``: compile what a process needs before traffic arrives.

What compiles, once per process: FlexAttention's graph for a (dtype, head shape, batch size, block
size, kernel options, grad mode) and, on CUDA, the Triton importance kernel and the row-copy kernel of
packed batches (:mod:`flexpbs.rows`). On CUDA the graph's
lengths are dynamic, so one prefill call compiles everything any later length or chunk uses. On the
CPU the graph has a static position-table capacity (a power of two of at least 4096 keys, see
:mod:`flexpbs.sparse_attention`), so the warm-up compiles one graph per capacity up to
``max_seq_len``.

Compiled code is also cached on disk by PyTorch (inductor's and Triton's caches, under
``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``): a new process on the same
machine reuses it, which makes its warm-up much shorter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time

import torch

from flexpbs.config import PBSConfig
from flexpbs.limits import LIMITS, override
from flexpbs.pipeline import kv_heads_per_chunk_of_size, pbs_attention
from flexpbs.rows import compile_copy_rows
from flexpbs.sparse_attention import CPU_MIN_CAPACITY, split_cost_bytes

# The longest prompt a CUDA warm-up prepares for by default.
CUDA_LONGEST = 2**19


def warmup(
    query_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    batch: int = 1,
    value_dim: int | None = None,
    max_seq_len: int | None = None,
    config: PBSConfig | None = None,
    **options,
) -> float:
    """Compile FlexAttention and the importance kernel for calls of this shape and these options.

    Run it in the grad mode of the later calls (``torch.inference_mode()``, ``torch.no_grad()`` or
    neither): compiled graphs are specialised on it. Short random inputs are used; later calls of any
    length (CUDA) or up to ``max_seq_len`` (CPU), whole prompts or chunks, then compile nothing.

    Args:
        query_heads, kv_heads, head_dim: Hq, Hkv and D of the later calls (Hq a multiple of Hkv).
        dtype, device, batch: of the later calls' query, key and value.
        value_dim: Dv, ``head_dim`` when None.
        max_seq_len: the longest key length to prepare for. On CUDA one graph serves every length,
            except, at batch 1, for lengths whose head chunks hold a single KV head too long to run
            as two rows (``LIMITS.split_row_bytes``): they need a second graph, which the warm-up
            compiles when ``max_seq_len`` reaches them (None: 524288). On the CPU the graph also has
            a capacity per power of two (None: lengths up to 4096 keys).
        config, **options: the options of the later calls (see :class:`PBSConfig`), not both.

    Returns:
        Seconds spent.

    Raises:
        TypeError, ValueError: bad options, as :func:`flexpbs.attention`.
    """
    # the sparse path, whatever length the options send to dense attention
    cfg = dataclasses.replace(PBSConfig.resolve(config, options), min_seq_len=None)
    for name, value in (
        ("query_heads", query_heads),
        ("kv_heads", kv_heads),
        ("head_dim", head_dim),
        ("batch", batch),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if query_heads % kv_heads:
        raise ValueError(f"query_heads {query_heads} must be a multiple of kv_heads {kv_heads}")
    device = torch.device(device)
    start = time.perf_counter()
    # The shortest lengths that run the sparse path: a prompt and a chunk (which must reuse the graph).
    # The attention stage folds (batch, KV head) into a dynamic batch dimension of at least 2, so other
    # batch sizes and the pipeline's head chunks share the graph.
    n = 4 * cfg.segment_size
    calls = [(n, n), (n // 2 + 1, n)]
    if device.type != "cuda" and max_seq_len is not None:
        capacity = 2 * CPU_MIN_CAPACITY
        while capacity < 2 * max_seq_len:  # one call per power-of-two capacity up to max_seq_len
            calls.append((cfg.block_size, capacity // 2 + 1))
            capacity *= 2
    longest = max_seq_len or (CUDA_LONGEST if device.type == "cuda" else CPU_MIN_CAPACITY)
    value_dim = value_dim or head_dim
    shape = (batch, query_heads, kv_heads, head_dim, value_dim)
    single_row = _single_row_graph_needed(*shape, dtype, cfg, longest)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for (n_queries, n_keys), single in itertools.product(calls, (False, True) if single_row else (False,)):
        # a single permutation row (one KV head at batch 1) too long to run as two rows: its own graph
        heads = 1 if single else kv_heads
        q_heads = query_heads // kv_heads * heads
        q = torch.randn(batch, q_heads, n_queries, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, heads, n_keys, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, heads, n_keys, value_dim, generator=gen).to(device, dtype)
        with override(split_row_bytes=0) if single else contextlib.nullcontext():
            pbs_attention(q, k, v, cfg, return_stats=False)
    compile_copy_rows(dtype, device, {head_dim, value_dim})  # packed batches' frames (varlen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _single_row_graph_needed(
    batch: int,
    query_heads: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    cfg: PBSConfig,
    longest: int,
) -> bool:
    """Whether calls up to ``longest`` keys run a single permutation row (batch 1 and one KV head per
    head chunk, each query head its own row with ``gqa="per_head"``) that is too long to split in two
    rows (``LIMITS.split_row_bytes``): then they need a graph of their own. Checked at ``longest``:
    head chunks only shrink and rows only grow with the length."""
    per_head = cfg.gqa == "per_head"
    group = query_heads // kv_heads
    if batch > 1 or (per_head and group > 1):
        return False
    sizes = (1, query_heads, kv_heads, longest, head_dim, value_dim, dtype, cfg.block_size, per_head)
    try:
        if kv_heads_per_chunk_of_size(*sizes) > 1:
            return False
    except ValueError:  # such a call is refused anyway
        return False
    row_shape, key_shape = (1, group, longest, head_dim), (1, 1, longest, head_dim)
    cost = split_cost_bytes(row_shape, key_shape, value_dim, dtype.itemsize)
    return cost > LIMITS.split_row_bytes
