"""CPU: operators each eager stage dispatches, counted on the meta device (no data, any shape).

    PYTHONPATH=$PWD:$PWD/bench python bench/op_count.py --lengths 16384 32768 131072

A stage's host time on the GPU is roughly its number of launched operators times the per-op cost of
eager PyTorch (tens of microseconds on the H100 host, bench/RESULTS.md): below ~32K tokens a call is
host-bound, so these counts predict its time there. Views and other metadata-only ops launch no
kernel and are counted apart. The importance stage is counted on its PyTorch path (on the GPU the Triton
kernel is three launches); the attention call itself is compiled and not counted.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flexpbs import PBSConfig
from stages import stage_calls

_METADATA_OPS = {
    "view", "_unsafe_view", "slice", "select", "expand", "as_strided", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "alias", "detach", "unflatten", "reshape", "diagonal", "split", "unbind",
    "lift_fresh", "view_as", "expand_as", "_reshape_alias", "split_with_sizes", "chunk", "narrow",
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        return sum(n for name, n in self.ops.items() if name.rstrip("_") not in _METADATA_OPS)


def count(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 131072])
    parser.add_argument("--top", type=int, default=0, help="also list the most frequent ops")
    args = parser.parse_args()
    dev = torch.device("meta")
    print("| N | stage | launching ops | metadata ops |\n|---|---|---|---|")
    for n in args.lengths:
        q = torch.empty(1, 32, n, 128, dtype=torch.bfloat16, device=dev)
        k = torch.empty(1, 8, n, 128, dtype=torch.bfloat16, device=dev)
        stages = stage_calls(q, k, k, PBSConfig(importance_kernel="torch"))
        del stages["mask+attn"]  # FlexAttention does not run on the meta device
        for name, fn in stages.items():
            counter = count(fn)
            total = sum(counter.ops.values())
            print(f"| {n} | {name} | {counter.launches()} | {total - counter.launches()} |")
            if args.top:
                print("   ", counter.ops.most_common(args.top))


if __name__ == "__main__":
    main()
