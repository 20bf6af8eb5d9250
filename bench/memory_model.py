"""CPU: memory of each PBS stage, counted on the meta device (no memory, no GPU needed): any N.

    python -m bench memory                                      # B=1, Hq=32, Hkv=8, D=128, bf16
    python -m bench memory --lengths 131072 524288 --gqa per_head

``flexpbs.attention`` itself runs on meta tensors (its head chunking included) under a TorchDispatchMode
that sees every tensor an op returns and, through weak references, when its storage dies: live bytes
beyond q/k/v, their peak per stage and the largest tensors. This is what ``torch.cuda.max_memory_allocated``
would count, minus allocator rounding and the workspaces kernels take internally (e.g. the GPU radix
sort's temporary storage). Stand-ins for what cannot run on meta: the Triton importance kernel
allocates its output and per-row statistics (``--importance torch`` runs the PyTorch path, the CPU
fallback, instead), the antidiagonal kernel (``--estimator antidiagonal``) its scores and scratch as on
an H100, and compiled FlexAttention its output and log-sum-exp. :func:`stage_probe` also
serves ``python -m bench robustness``, which measures the same stages on the GPU, and :func:`census`
tests/test_memory.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flexpbs
import flexpbs.pipeline
import flexpbs.selection
import flexpbs.sparse_attention
from flexpbs.lengths import SequenceLengths

GiB = 2**30
# (module, function, stage label), in pipeline order; the block mask is built inside the attention stage.
STAGES = [
    (flexpbs.pipeline, "key_importance", "importance"),
    (flexpbs.pipeline, "segment_permutation", "permutation"),
    (flexpbs.pipeline, "permute_kv", "gather K/V"),
    (flexpbs.pipeline, "select_tiles", "selection"),
    (flexpbs.sparse_attention, "block_lists", "block mask"),
    (flexpbs.pipeline, "sparse_attention", "mask + attention"),
]


class StageProbe:
    """Peak and live bytes (beyond the bytes live at construction) per stage, over every call of it
    (head chunks), from three functions: current bytes, peak bytes since the last reset, reset.

    Stages nest (the block mask is built inside the attention stage): each open stage keeps the largest
    peak seen before an inner stage reset the counter, so every stage and the whole call see their peak.
    """

    def __init__(self, current: Callable[[], int], peak: Callable[[], int], reset: Callable[[], None]):
        self.current, self.peak, self.reset = current, peak, reset
        self.base = current()
        self.stages: dict[str, dict] = {}
        self._open = [0]  # running peak of the whole call, then of each open stage
        self.reset()

    def enter(self, label: str) -> None:
        self._open[-1] = max(self._open[-1], self.peak())
        self.reset()
        self._open.append(0)

    def exit(self, label: str) -> None:
        peak = max(self._open.pop(), self.peak())
        row = self.stages.setdefault(label, dict(peak=0, after=0, calls=0))
        row["peak"] = max(row["peak"], peak - self.base)
        row["after"] = self.current() - self.base
        row["calls"] += 1
        self._open[-1] = max(self._open[-1], peak)

    def whole_call_peak(self) -> int:
        """Peak bytes beyond the base over everything since construction."""
        return max(self._open[0], self.peak()) - self.base


@contextlib.contextmanager
def stage_probe(probe: StageProbe) -> Iterator[StageProbe]:
    """Run ``flexpbs.attention`` with each pipeline stage reporting to ``probe``."""

    def wrap(fn, label):
        @functools.wraps(fn)
        def staged(*args, **kwargs):
            probe.enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                probe.exit(label)

        return staged

    with contextlib.ExitStack() as stack:
        for module, name, label in STAGES:
            stack.enter_context(mock.patch.object(module, name, wrap(getattr(module, name), label)))
        yield probe


class MemoryCensus(TorchDispatchMode):
    """Live bytes of storages created by ops while active (storages that existed before excluded)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live: dict[int, list] = {}  # storage -> [bytes, python references, (bytes, op, shape)]
        self.current = self.peak = self.top = 0
        self.largest: list[tuple[int, str, tuple[int, ...]]] = []
        self.at_top: list[tuple[int, str, tuple[int, ...]]] = []  # what was live at the overall peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out

    def _track(self, t: torch.Tensor, func) -> None:
        key = t.untyped_storage()._cdata
        if key in self.existing:
            return
        if key not in self.live:
            size = t.untyped_storage().nbytes()
            what = (size, func.__name__, tuple(t.shape))
            self.live[key] = [size, 0, what]
            self.current += size
            self.peak = max(self.peak, self.current)
            self.largest.append(what)
            if self.current > self.top:
                self.top = self.current
                self.at_top = sorted((entry[2] for entry in self.live.values()), reverse=True)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def reset_peak(self) -> None:
        self.peak = self.current


def meta_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lists: tuple[torch.Tensor, ...],
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    kernel_options: dict | None,
) -> torch.Tensor:
    """Stand-in for compiled FlexAttention (``compiled_flex_call``) on meta tensors: its output and
    log-sum-exp."""
    torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)  # lse, freed on return
    return query.new_empty(*query.shape[:3], value.shape[-1])


def meta_triton_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    kernel: str,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Stand-in for the Triton importance kernel: its output ``[B, Hp, Nc]`` and its float32 row
    statistics (per-split max and sum, merged log-sum-exp; 16 key splits assumed)."""
    batch, q_heads, n, _ = query.shape
    rows = min(block_size, n)
    torch.empty(2 * 16 + 1, batch * q_heads * rows, dtype=torch.float32, device=query.device)
    heads = q_heads if per_query_head else key.shape[1]
    return torch.empty(
        batch, heads, n // segment_size * segment_size, dtype=torch.float32, device=query.device
    )


# The device the antidiagonal kernel's launch plan is counted for: an H100's SMs and shared memory.
H100_SMS, H100_SHARED_BYTES = 132, 232_448


def meta_antidiagonal_scores(query: torch.Tensor, key_p: torch.Tensor, **kwargs) -> torch.Tensor:
    """Stand-in for the antidiagonal kernel (``flexpbs.selection.antidiagonal_scores``): its scores
    ``[B, Hp, blocks * G, columns]`` and its scratch, sized by its launch plan on an H100."""
    from flexpbs.kernels.antidiagonal import launch_plan

    batch, q_heads, _, head_dim = query.shape
    perm_heads = key_p.shape[1]
    blocks, columns = kwargs["end_block"] - kwargs["first_block"], kwargs["columns"]
    out = torch.zeros(batch, perm_heads, blocks * (q_heads // perm_heads), columns, device=query.device)
    if blocks:
        plan = launch_plan(
            batch, q_heads, perm_heads, blocks, columns, kwargs["block_size"], kwargs["stride"], head_dim,
            query.element_size(), H100_SHARED_BYTES, H100_SMS,
        )  # fmt: skip
        torch.empty(plan.scratch_elements, dtype=torch.float32, device=query.device)  # freed on return
    return out


def census(
    batch: int,
    q_heads: int,
    kv_heads: int,
    n: int,
    d: int,
    dtype: torch.dtype,
    gqa: str,
    threshold: float = 0.9,
    importance: str = "triton",
    estimator: str = "mean_pool",
) -> tuple[dict, int, MemoryCensus]:
    """(stages, whole-call peak bytes beyond q/k/v, the census: ``largest`` lists every tensor created,
    ``at_top`` those live at the peak) of one ``flexpbs.attention`` call."""
    q = torch.empty(batch, q_heads, n, d, device="meta", dtype=dtype)
    k = torch.empty(batch, kv_heads, n, d, device="meta", dtype=dtype)
    v = torch.empty_like(k)
    importance_stand_in = contextlib.nullcontext()
    if importance == "triton":
        importance_stand_in = mock.patch.object(flexpbs.pipeline, "key_importance", meta_triton_importance)
    with (
        mock.patch.object(flexpbs.sparse_attention, "compiled_flex_call", meta_flex_attention),
        mock.patch.object(flexpbs.selection, "antidiagonal_scores", meta_antidiagonal_scores),
        importance_stand_in,
        MemoryCensus([q, k, v]) as seen,
    ):
        probe = StageProbe(lambda: seen.current, lambda: seen.peak, seen.reset_peak)
        with stage_probe(probe):
            out = flexpbs.attention(
                q, k, v, threshold=threshold, gqa=gqa, importance_kernel="torch", estimator=estimator
            )
        total = probe.whole_call_peak()
        del out
    return probe.stages, total, seen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--gqa", default="shared", choices=["shared", "per_head"])
    parser.add_argument(
        "--importance",
        default="triton",
        choices=["triton", "torch"],
        help="the GPU kernel's allocations (stand-in) or the PyTorch path",
    )
    parser.add_argument(
        "--estimator",
        default="mean_pool",
        choices=["mean_pool", "antidiagonal"],
        help="the block estimator (antidiagonal: its kernel's allocations at the default stride)",
    )


def run(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    lines = []
    for n in args.lengths:
        stages, total, seen = census(
            args.batch,
            args.q_heads,
            args.kv_heads,
            n,
            args.head_dim,
            dtype,
            args.gqa,
            importance=args.importance,
            estimator=args.estimator,
        )
        elem = dtype.itemsize
        qkv = args.batch * n * args.head_dim * (args.q_heads + 2 * args.kv_heads) * elem
        out = args.batch * n * args.head_dim * args.q_heads * elem
        print(
            f"\nN={n}: q/k/v {qkv / GiB:.2f} GiB, output {out / GiB:.2f} GiB; live at the peak "
            f"({total / GiB:.3f} GiB):"
        )
        for size, op, shape in seen.at_top[:8]:
            print(f"  {size / GiB:7.3f} GiB  {op:28s} {list(shape)}")
        print(
            f"  {sum(t[0] for t in seen.at_top[8:]) / GiB:7.3f} GiB  in {len(seen.at_top[8:])} "
            "smaller tensors"
        )
        for label, row in stages.items():
            lines.append(
                f"| {n} | {label} | {row['calls']} | {row['peak'] / GiB:.3f} | {row['after'] / GiB:.3f} |"
            )
        extra = total - out
        lines.append(
            f"| {n} | **whole call**: peak beyond q/k/v {total / GiB:.3f} GiB; beyond q/k/v/output "
            f"{extra / GiB:.3f} GiB = {extra / qkv:.2f} x q/k/v bytes | | | |"
        )
    print(
        f"\nB={args.batch}, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, bf16, gqa={args.gqa}, "
        f"threshold 0.9, importance {args.importance}, estimator {args.estimator}; GiB beyond q/k/v, "
        "counted on the meta device\n"
    )
    print("| N | stage | calls | peak GiB | live after GiB |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
