"""``flexpbs.warmup``: compile what a process needs before traffic arrives.

What compiles, once per process: FlexAttention's graph for a (dtype, head shape, batch size, block
size, kernel options, grad mode) and, on CUDA, the Triton importance kernels (one variant serves single
sequences and frames of packed or padded batches) and the row-copy kernel of packed batches
(:mod:`flexpbs.rows`): a packed batch runs once too. On CUDA the graph's
lengths are dynamic, so one prefill call compiles everything any later length or chunk uses. On the
CPU the graph has a static position-table capacity (a power of two of at least 4096 keys, see
:mod:`flexpbs.sparse_attention`), so the warm-up compiles one graph per capacity up to
``max_seq_len``.

Compiled code is also cached on disk by PyTorch (inductor's and Triton's caches, under
``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``): a new process on the same
machine reuses it, which makes its warm-up much shorter.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from flexpbs.config import PBSConfig
from flexpbs.importance import resolve_importance_kernel
from flexpbs.pipeline import importance_pass, pbs_attention
from flexpbs.rows import compile_copy_rows
from flexpbs.sparse_attention import CPU_MIN_CAPACITY
from flexpbs.varlen import varlen_attention


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
        max_seq_len: on the CPU, the longest key length to prepare for: the graph has a position
            table of a static capacity per power of two (None: lengths up to 4096 keys). On CUDA one
            graph serves every length, batch size and head chunk: not needed.
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
    # The attention stage folds (batch, KV head) into a dynamic batch dimension that serves every row
    # count (flexpbs.sparse_attention._prime), so other batch sizes and head chunks share the graph.
    n = 4 * cfg.segment_size
    calls = [(n, n), (n // 2 + 1, n)]
    if device.type != "cuda" and max_seq_len is not None:
        capacity = 2 * CPU_MIN_CAPACITY
        while capacity < 2 * max_seq_len:  # one call per power-of-two capacity up to max_seq_len
            calls.append((cfg.block_size, capacity // 2 + 1))
            capacity *= 2
    value_dim = value_dim or head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = []
    for n_queries, n_keys in calls:
        q = torch.randn(batch, query_heads, n_queries, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, kv_heads, n_keys, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, kv_heads, n_keys, value_dim, generator=gen).to(device, dtype)
        inputs.append((q, k, v))
    if (
        device.type == "cuda"
        and cfg.uses_importance()
        and resolve_importance_kernel(cfg.importance_kernel, device) == "triton"
    ):
        # The Triton kernels launched outside the compiled graph compile in a thread while this one
        # compiles the graph (with the PyTorch importance pass, which compiles nothing): much of a
        # Triton compile runs without the GIL (LLVM, ptxas).
        worker = _KernelCompiler(inputs, cfg, dtype, device, {head_dim, value_dim})
        worker.start()
        for q, k, v in inputs:
            pbs_attention(q, k, v, dataclasses.replace(cfg, importance_kernel="torch"), return_stats=False)
        worker.join()
        if worker.error is not None:
            raise worker.error
    for q, k, v in inputs:  # compiles whatever is left (everything, without the thread)
        pbs_attention(q, k, v, cfg, return_stats=False)
    # a packed batch (padded ones and the transformers integration's share its frames): compiles the row
    # copies where the thread did not; its graph call and importance kernels are single sequences' own
    varlen_attention(*_two_sequences(*inputs[0]), config=cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _KernelCompiler(threading.Thread):
    """Compiles the importance kernels (by running them on the warm-up's inputs) and the row-copy
    kernel, in the caller's grad mode and on its device; an exception is kept in ``error``."""

    def __init__(
        self, inputs: list, cfg: PBSConfig, dtype: torch.dtype, device: torch.device, dims: set[int]
    ):
        super().__init__(name="flexpbs-warmup-kernels", daemon=True)
        self.inputs, self.cfg, self.dtype, self.device, self.dims = inputs, cfg, dtype, device, dims
        # "cuda" without an index means the caller's current device; set_device needs the index
        self.device_index = torch.cuda.current_device() if device.index is None else device.index
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            torch.cuda.set_device(self.device_index)
            with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
                scale = self.cfg.softmax_scale(self.inputs[0][0].shape[-1])  # one head dim
                for q, k, _ in self.inputs:
                    importance_pass(q, k, self.cfg, "triton", scale)
                compile_copy_rows(self.dtype, self.device, self.dims)
            torch.cuda.synchronize(self.device)
        except BaseException as error:  # re-raised by the caller
            self.error = error


def _two_sequences(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The warm-up prompt (``[B, H, N, D]``, its first batch element) and its first ``N // 2 + 1``
    tokens as a packed batch: ``q, k, v [T, H, D]`` and ``cu_seqlens_q``, ``cu_seqlens_k``."""
    n = k.shape[2]
    m = n // 2 + 1
    packed = (torch.cat([x[0, :, :n], x[0, :, :m]], dim=1).transpose(0, 1).contiguous() for x in (q, k, v))
    cu = torch.tensor([0, n, n + m], dtype=torch.int32, device=q.device)
    return (*packed, cu, cu)
