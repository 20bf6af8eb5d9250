"""Memory of each PBS stage, counted on the meta device (no memory, no GPU needed): any N.

    PYTHONPATH=$PWD python bench/memory_model.py                       # B=1, Hq=32, Hkv=8, D=128, bf16
    PYTHONPATH=$PWD python bench/memory_model.py --lengths 131072 524288 --gqa per_head

The stages run on meta tensors under a TorchDispatchMode that sees every tensor an op returns and,
through weak references, when its storage dies: live bytes beyond q/k/v, their peak per stage and the
largest tensors. This is what ``torch.cuda.max_memory_allocated`` would count, minus allocator rounding
and the workspaces kernels take internally (e.g. the GPU radix sort's temporary storage). The
importance row is the PyTorch path (the CPU fallback); the Triton kernel keeps O(N) (bench/RESULTS.md).
FlexAttention cannot run on meta: its row is the output and log-sum-exp it allocates, plus the copies
of q/k/v padded to the length bucket when N is not a bucket length.
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flexpbs.block_mask import build_block_mask
from flexpbs.importance import key_importance
from flexpbs.permutation import permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import bucket_length

GiB = 2**30


class MemoryCensus(TorchDispatchMode):
    """Live bytes of storages created by ops while active (pre-existing storages excluded)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, python references]
        self.current = self.peak = 0
        self.largest: list[tuple[int, str, tuple[int, ...], str]] = []
        self.stage = ""

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
            self.live[key] = [size, 0]
            self.current += size
            self.peak = max(self.peak, self.current)
            self.largest.append((size, str(func.__name__), tuple(t.shape), self.stage))
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def run(self, stage: str, fn: Callable[[], object]) -> tuple[object, int]:
        """``fn()`` and the peak bytes live during it (everything created since the census began)."""
        self.stage, self.peak = stage, self.current
        result = fn()
        return result, self.peak


def stage_table(batch: int, q_heads: int, kv_heads: int, n: int, d: int, dtype: torch.dtype, gqa: str,
                block: int = 128, segment: int = 256, threshold: float = 0.9) -> tuple[list[dict], list]:
    """Per stage: peak live bytes beyond q/k/v (``peak``) and what stays live after it (``after``)."""
    q = torch.empty(batch, q_heads, n, d, device="meta", dtype=dtype)
    k = torch.empty(batch, kv_heads, n, d, device="meta", dtype=dtype)
    v = torch.empty_like(k)
    scale = d**-0.5
    rows = []
    with MemoryCensus([q, k, v]) as census:
        imp, peak = census.run("importance", lambda: key_importance(
            q, k, block_size=block, segment_size=segment, scale=scale, per_query_head=gqa == "per_head", scorer="torch"))
        rows.append(dict(stage="importance (PyTorch path)", peak=peak, after=census.current))
        perm, peak = census.run("permutation", lambda: segment_permutation(imp, n, segment))
        del imp
        rows.append(dict(stage="permutation", peak=peak, after=census.current))
        (k_p, v_p), peak = census.run("gather K/V", lambda: permute_kv(k, v, perm))
        rows.append(dict(stage="gather K/V", peak=peak, after=census.current))
        tiles, peak = census.run("selection", lambda: select_tiles(
            q, k_p, perm, block_size=block, segment_size=segment, threshold=threshold, scale=scale))
        rows.append(dict(stage="selection", peak=peak, after=census.current))
        mask, peak = census.run("block mask", lambda: build_block_mask(tiles, perm, block))
        rows.append(dict(stage="block mask (held during attention)", peak=peak, after=census.current))
        padded = bucket_length(n, block)
        pad_copies = 0 if padded == n else (q.numel() + k_p.numel() + v_p.numel()) // n * padded * q.element_size()
        out_bytes = batch * q_heads * padded * d * q.element_size() + batch * q_heads * padded * 4  # output + lse
        rows.append(dict(stage="attention (analytic: output, lse, bucket padding)",
                         peak=census.current + pad_copies + out_bytes, after=census.current + out_bytes))
        del mask, tiles, k_p, v_p, perm
    largest = sorted(census.largest, reverse=True)[:8]
    return rows, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--gqa", default="shared", choices=["shared", "per_head"])
    args = parser.parse_args()
    dtype = torch.bfloat16
    lines = []
    for n in args.lengths:
        rows, largest = stage_table(args.batch, args.q_heads, args.kv_heads, n, args.head_dim, dtype, args.gqa)
        elem = dtype.itemsize
        qkv = args.batch * n * args.head_dim * (args.q_heads + 2 * args.kv_heads) * elem
        out = args.batch * n * args.head_dim * args.q_heads * elem
        print(f"\nN={n}: q/k/v {qkv / GiB:.2f} GiB, output {out / GiB:.2f} GiB; largest tensors:")
        for size, op, shape, stage in largest:
            print(f"  {size / GiB:7.3f} GiB  {stage:12s} {op:28s} {list(shape)}")
        for r in rows:
            lines.append(f"| {n} | {r['stage']} | {r['peak'] / GiB:.3f} | {r['after'] / GiB:.3f} | "
                         f"{r['peak'] / qkv:.2f} |")
        worst = max(r["peak"] for r in rows[:-1])
        lines.append(f"| {n} | **peak before attention** | {worst / GiB:.3f} | | {worst / qkv:.2f} |")
    print(f"\nB={args.batch}, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, bf16, gqa={args.gqa}; "
          "GiB live beyond q/k/v (meta-device census)\n")
    print("| N | stage | peak GiB | live after GiB | peak / q+k+v bytes |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
