"""GPU: where one flexpbs call spends its time, kernel by kernel (torch.profiler).

    PYTHONPATH=$PWD python bench/profile_call.py --lengths 131072

Profiles a few warm calls on the synthetic workload and prints the CUDA kernels sorted by total
time (per call), so the non-attention stages can be attributed to the PyTorch ops behind them.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import flexpbs
from flexpbs import PBSConfig
from workloads import synthetic_qkv

DEV = torch.device("cuda")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device=DEV)
        cfg = PBSConfig()
        for _ in range(2):
            flexpbs.attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                flexpbs.attention(q, k, v, config=cfg)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        events.sort(key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events) / args.calls / 1e3
        print(f"\nN={n}: {total:.2f} ms of CUDA kernels per call\n")
        print("| kernel | ms per call | launches per call |\n|---|---|---|")
        for e in events[: args.top]:
            print(f"| {e.key[:90]} | {e.device_time_total / args.calls / 1e3:.3f} | {e.count // args.calls} |")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
