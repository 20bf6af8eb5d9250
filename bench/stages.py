"""The eager pipeline's stages as separate calls (the stage runner), and the ``stages`` subcommand.

    python -m bench stages --lengths 32768 131072 [--backend flash]     # GPU: each stage timed alone
    python -m bench stages --count-ops --lengths 16384 32768 131072     # CPU: operators per stage

:func:`stage_calls` runs the pipeline once and returns each stage as a call over the previous stage's
output, in order: importance, permute (permutation and K/V gather), select, mask (BlockMask build),
mask+attn (BlockMask build and the FlexAttention call); without permutation the first two are absent.
``speed``, ``host``, ``profile``, ``levers`` and ``calibrate`` time, profile or count these calls.

Timed (GPU): each stage alone, medians of CUDA-event timings on the synthetic workload (B=1, Hq=32,
Hkv=8, D=128, bf16); "attn" is mask+attn minus mask. A stage alone is host-bound at short lengths, so
these overstate its share of a whole call (``profile`` gives kernel time). ``--count-ops`` counts the
operators each eager stage dispatches on the meta device (no data, any shape, no GPU): a stage's host
time on the GPU is roughly its number of launched operators times the per-op cost of eager PyTorch (tens
of microseconds on the H100 host), so below ~32K tokens, where a call is host-bound, these counts predict
its time. Views and other metadata-only ops launch no kernel and are counted apart. The importance stage
is counted on its PyTorch path (on the GPU the Triton kernel is three launches); the attention call itself
is compiled and not counted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flexpbs import PBSConfig
from flexpbs.block_mask import build_block_mask
from flexpbs.dispatch import resolve
from flexpbs.importance import key_importance, resolve_importance_kernel
from flexpbs.permutation import identity_permutation, permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention

from .timing import cuda_ms
from .workloads import synthetic_qkv

STAGES = ("importance", "permute", "select", "mask", "attn")


class StageRun(NamedTuple):
    """One eager run of the pipeline's stages on fixed inputs, with each stage as a call to repeat."""

    calls: dict[str, Callable[[], object]]  # stage name -> call, in pipeline order
    perm: torch.Tensor  # [B, Hp, N] int64, original position at each permuted slot
    key_p: torch.Tensor  # [B, Hp, N, D] permuted keys
    value_p: torch.Tensor  # [B, Hp, N, Dv] permuted values
    tiles: torch.Tensor  # [B, Hq, nb, nb] bool, the selected tiles
    scale: float
    config: PBSConfig  # ``cfg`` with a concrete backend (flexpbs.dispatch.resolve)


def stage_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig) -> StageRun:
    """The stages of one prefill call (``gqa="shared"``) on ``q [B, Hq, N, D]``, ``k``/``v [B, Hkv, N, D]``.

    The attention stage runs on ``cfg.backend`` resolved for these inputs (``"auto"``: FLASH where
    flash-attn-4 is installed and verified, Triton otherwise).
    """
    cfg = resolve(cfg, q, v)
    n, scale = q.shape[2], q.shape[-1] ** -0.5
    block, segment = cfg.block_size, cfg.segment_size
    calls: dict[str, Callable[[], object]] = {}
    if cfg.key_order == "original":
        perm = identity_permutation(q.shape[0], k.shape[1], n, q.device)
        key_p, value_p = k, v
    else:
        kernel = resolve_importance_kernel(cfg.importance_kernel, q.device)

        def importance() -> torch.Tensor:
            return key_importance(
                q, k, block_size=block, segment_size=segment, scale=scale, per_query_head=False, kernel=kernel
            )

        imp = importance()

        def permute() -> tuple[torch.Tensor, torch.Tensor]:
            return permute_kv(k, v, segment_permutation(imp, n, segment))

        calls["importance"], calls["permute"] = importance, permute
        perm = segment_permutation(imp, n, segment)
        key_p, value_p = permute_kv(k, v, perm)

    def select() -> torch.Tensor:
        return select_tiles(
            q,
            key_p,
            perm,
            block_size=block,
            segment_size=segment,
            threshold=cfg.threshold,
            scale=scale,
            estimator=cfg.estimator,
            stride=cfg.antidiagonal_stride,
        )

    tiles = select()

    def mask() -> object:
        return build_block_mask(tiles, perm, block, segment)

    def mask_and_attention() -> torch.Tensor:
        return sparse_attention(
            q,
            key_p,
            value_p,
            tiles,
            perm,
            block_size=block,
            segment_size=segment,
            scale=scale,
            backend=cfg.backend,
        )

    calls["select"], calls["mask"], calls["mask+attn"] = select, mask, mask_and_attention
    return StageRun(calls, perm, key_p, value_p, tiles, scale, cfg)


def time_stages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig) -> dict[str, float]:
    """Milliseconds of each stage alone (:func:`stage_calls`); ``attn`` is mask+attn minus mask."""
    times = {name: cuda_ms(fn) for name, fn in stage_calls(q, k, v, cfg).calls.items()}
    times["attn"] = times["mask+attn"] - times["mask"]
    return times


# Ops that only make a new view or alias of existing storage: they launch no kernel.
METADATA_OPS = {
    "view",
    "_unsafe_view",
    "slice",
    "select",
    "expand",
    "as_strided",
    "transpose",
    "t",
    "permute",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "unflatten",
    "reshape",
    "diagonal",
    "split",
    "unbind",
    "lift_fresh",
    "view_as",
    "expand_as",
    "_reshape_alias",
    "split_with_sizes",
    "chunk",
    "narrow",
}


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active, by name (in-place variants under their own name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        """Operators that launch a kernel (not :data:`METADATA_OPS`)."""
        return sum(n for name, n in self.ops.items() if name.rstrip("_") not in METADATA_OPS)


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """The operators ``fn()`` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter


def print_op_counts(lengths: list[int], top: int) -> None:
    """Prints a markdown table of launching and metadata ops per stage (meta device, importance on its
    PyTorch path)."""
    print("| N | stage | launching ops | metadata ops |\n|---|---|---|---|")
    for n in lengths:
        q = torch.empty(1, 32, n, 128, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, 8, n, 128, dtype=torch.bfloat16, device="meta")
        calls = stage_calls(q, k, k, PBSConfig(importance_kernel="torch")).calls
        del calls["mask+attn"]  # FlexAttention does not run on the meta device
        for name, fn in calls.items():
            counter = count_ops(fn)
            total = sum(counter.ops.values())
            print(f"| {n} | {name} | {counter.launches()} | {total - counter.launches()} |")
            if top:
                print("   ", counter.ops.most_common(top))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 131072])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "flash"])
    parser.add_argument("--key-order", default="sorted", choices=["sorted", "original"])
    parser.add_argument("--estimator", default="mean_pool", choices=["mean_pool", "antidiagonal"])
    parser.add_argument("--antidiagonal-stride", type=int, default=PBSConfig.antidiagonal_stride)
    parser.add_argument(
        "--count-ops", action="store_true", help="count operators per stage on the meta device (CPU)"
    )
    parser.add_argument(
        "--top", type=int, default=0, help="with --count-ops: also list the most frequent ops"
    )


def run(args: argparse.Namespace) -> None:
    if args.count_ops:
        print_op_counts(args.lengths, args.top)
        return
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = PBSConfig(
        threshold=args.threshold,
        backend=args.backend,
        key_order=args.key_order,
        estimator=args.estimator,
        antidiagonal_stride=args.antidiagonal_stride,
    )
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device="cuda")
        rows.append((n, resolve(cfg, q, v).backend, time_stages(q, k, v, cfg)))
        print(n, rows[-1][1], {name: round(t, 3) for name, t in rows[-1][2].items()}, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print(
        f"\nkey_order={args.key_order}, estimator={args.estimator} (stride {args.antidiagonal_stride}), "
        f"threshold {args.threshold}; ms, each stage alone\n"
    )
    print("| N | backend | " + " | ".join(STAGES) + " |\n|---|---|" + "---|" * len(STAGES))
    for n, backend, times in rows:
        cells = " | ".join(f"{times[s]:.2f}" if s in times else "-" for s in STAGES)
        print(f"| {n} | {backend} | {cells} |")
