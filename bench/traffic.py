"""CPU: bytes the operators of each stage read and write, on the meta device: a packed batch against its
single calls (any size, no GPU).

    python -m bench traffic                          # bench/varlen.py's two batches, Hq=32, Hkv=8, D=128
    python -m bench traffic --batches short

The PBS stages outside FlexAttention are memory-bound on the GPU, so the bytes they move predict their
time: an H100 moves about 3 TB/s. ``flexpbs.varlen_attention`` and ``flexpbs.attention`` run on meta
tensors with bench/memory_model.py's stand-ins for compiled FlexAttention and the Triton importance kernel
(their own traffic is left out), under a TorchDispatchMode that counts, for every operator, the bytes of
its tensor inputs and outputs: an estimate that takes every input as read once and every output as
written once (views move nothing; gathers, scatters and indexing count only the elements they pick; an
in-place operator's output is its input). Bytes are grouped by pipeline stage; "outside" is what the
call does around them (for a packed batch: building the frames, the output's unpacking). For the packed
call it also prints the peak memory beyond q/k/v (bench/memory_model.py's census).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from collections.abc import Callable
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flexpbs
import flexpbs.pipeline
import flexpbs.rows
import flexpbs.sparse_attention
import flexpbs.varlen
from flexpbs.varlen import frame_groups

from .memory_model import STAGES, MemoryCensus, meta_flex_attention, meta_triton_importance
from .varlen import BATCHES

# Operators that move no data (views, metadata) or allocate without writing.
_FREE = {
    "view", "_unsafe_view", "expand", "slice", "select", "permute", "t", "unsqueeze", "squeeze", "transpose",
    "as_strided", "alias", "detach", "unflatten", "split", "split_with_sizes", "unbind", "lift_fresh",
    "empty", "new_empty", "empty_like", "empty_strided", "_reshape_alias",
}  # fmt: skip
# Operators that write their output without reading an input tensor.
_WRITE_ONLY = {"zeros", "new_zeros", "zeros_like", "full", "new_full", "full_like", "ones", "fill_", "zero_"}
# Operators that read (and write) only the elements an index picks: (output or values) bytes twice.
_PICKING = {"index", "gather", "index_select", "take_along_dim"}
_PLACING = {"index_put_", "index_put", "scatter_", "scatter", "index_copy_", "_index_put_impl_"}


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Bytes read and written per (stage, operator) while active; ``stage`` is a stack of labels."""

    def __init__(self):
        super().__init__()
        self.stage = ["outside"]
        self.bytes: collections.Counter = collections.Counter()
        self.operators = 0  # operators that move data: about the kernels a GPU call launches
        self.peak_bytes: int | None = None  # peak memory beyond the inputs, where counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in _FREE:
            return out
        if name in _WRITE_ONLY:
            moved = _nbytes(out)
        elif name in _PICKING:
            moved = 2 * _nbytes(out) + _nbytes(
                [a for a in args[1:] if isinstance(a, (torch.Tensor, list, tuple))]
            )
        elif name in _PLACING:
            moved = 2 * _nbytes(args[2:]) + _nbytes(args[1])  # the values (or src) and the indices
            if name in ("index_put_", "index_put", "_index_put_impl_"):
                # the values may broadcast (a scalar zero fills every indexed row): count the rows written
                indices = [i for i in args[1] if i is not None]
                rows = max((i.numel() for i in indices), default=0)
                row_bytes = args[0][(0,) * len(indices)].numel() * args[0].element_size()
                moved = _nbytes(args[2:]) + rows * row_bytes + _nbytes(indices)
        else:
            moved = _nbytes((args, kwargs)) + (0 if name.endswith("_") else _nbytes(out))
        self.bytes[(self.stage[-1], name)] += moved
        self.operators += 1
        return out


@contextlib.contextmanager
def counted() -> Traffic:
    """Counts the traffic of flexpbs calls on meta tensors, by stage."""
    traffic = Traffic()

    def staged(fn: Callable, label: str) -> Callable:
        def call(*args, **kwargs):
            traffic.stage.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                traffic.stage.pop()

        return call

    def row_kernel(src, src_layout, src_rows, dst, dst_layout, dst_rows=None, **_):
        # flexpbs.rows.copy_rows's Triton kernel (the GPU's path): reads the existing source rows
        # and the indices once, writes every listed row once
        row_bytes = src.shape[1] * src.shape[-1] * src.element_size()
        n = src_rows.shape[0]
        read = min(n, src_layout.batch * src_layout.length) * row_bytes
        indices = n * 8 * (1 if dst_rows is None else 2)
        traffic.bytes[(traffic.stage[-1], "copy_rows")] += read + n * row_bytes + indices
        traffic.operators += 1

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(flexpbs.sparse_attention, "compiled_flex_call", meta_flex_attention)
        )
        for module in (flexpbs.rows, flexpbs.varlen):  # rows.to_frame, and varlen's output rows
            stack.enter_context(mock.patch.object(module, "copy_rows", row_kernel))
        stack.enter_context(mock.patch.object(flexpbs.pipeline, "key_importance", meta_triton_importance))
        for module, name, label in STAGES:
            stack.enter_context(mock.patch.object(module, name, staged(getattr(module, name), label)))
        stack.enter_context(traffic)
        yield traffic


def per_stage(traffic: Traffic) -> dict[str, float]:
    """GB per stage, largest first."""
    stages: collections.Counter = collections.Counter()
    for (stage, _), moved in traffic.bytes.items():
        stages[stage] += moved
    return {stage: moved / 1e9 for stage, moved in stages.most_common()}


def batch_traffic(lengths: list[int], heads: int, kv_heads: int, head_dim: int) -> dict[str, Traffic]:
    """The traffic of one varlen call over ``lengths`` (bf16, prompts) and of its single calls."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    options = dict(min_seq_len=0, backend="triton", threshold=0.9, importance_kernel="torch")
    total, longest = sum(lengths), max(lengths)
    q = torch.empty(total, heads, head_dim, **meta)
    k, v = (torch.empty(total, kv_heads, head_dim, **meta) for _ in range(2))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to("meta")
    result = {}
    with counted() as result["varlen_one_frame"], MemoryCensus([q, k, v, cu]) as census:
        flexpbs.varlen_attention(q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, **options)
    result["varlen_one_frame"].peak_bytes = census.peak
    # offsets read: a call per frame group (meta offsets cannot be read; the gathers of each group's
    # tokens are left out)
    with counted() as result["varlen"], MemoryCensus([q, k, v, cu]) as census:
        for group in frame_groups(lengths):
            sizes = [lengths[b] for b in group]
            n = sum(sizes)
            qg = torch.empty(n, heads, head_dim, **meta)
            kg, vg = (torch.empty(n, kv_heads, head_dim, **meta) for _ in range(2))
            cug = torch.tensor([0, *sizes]).cumsum(0).to(torch.int32).to("meta")
            flexpbs.varlen_attention(
                qg, kg, vg, cug, cug, max_seqlen_q=max(sizes), max_seqlen_k=max(sizes), **options
            )
            del qg, kg, vg
    result["varlen"].peak_bytes = census.peak
    with counted() as result["singles"]:
        for n in lengths:
            qs = torch.empty(1, heads, n, head_dim, **meta)
            ks, vs = (torch.empty(1, kv_heads, n, head_dim, **meta) for _ in range(2))
            flexpbs.attention(qs, ks, vs, **options)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    parser.add_argument("--top", type=int, default=8, help="operators listed per call")


def run(args: argparse.Namespace) -> None:
    for name in args.batches:
        print(f"\n== {name}: {len(BATCHES[name])} sequences, {sum(BATCHES[name])} tokens, GB moved")
        for label, traffic in batch_traffic(BATCHES[name], 32, 8, 128).items():
            stages = per_stage(traffic)
            listed = ", ".join(f"{stage} {gb:.1f}" for stage, gb in stages.items())
            peak = (
                ""
                if traffic.peak_bytes is None
                else f", peak memory beyond q/k/v {traffic.peak_bytes / 1e9:.1f} GB"
            )
            print(f"{label}: {sum(stages.values()):.1f} GB, {traffic.operators} operators{peak}; {listed}")
            top = ", ".join(f"{s}/{op} {b / 1e9:.1f}" for (s, op), b in traffic.bytes.most_common(args.top))
            print(f"  largest: {top}")
