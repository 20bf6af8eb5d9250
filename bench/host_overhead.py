"""GPU: host (CPU) time of each flexpbs stage, and whether a stage waits for the GPU.

    PYTHONPATH=$PWD python bench/host_overhead.py --lengths 32768 131072 [--backend flash]

Each stage is called while the GPU is still busy with a ~0.5 s sleep kernel: the host time it takes
is then its launch overhead, unless it waits for the GPU (a hidden synchronisation, e.g. an
allocator call), which shows up as ~500 ms. Also prints the host ops of one whole call, by self
CPU time. When the host time of a call exceeds its GPU kernel time, the GPU idles between kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flexpbs
from flexpbs import PBSConfig
from flexpbs.kernels.importance import launch as importance_kernels
from stages import stage_calls
from workloads import synthetic_qkv

DEV = torch.device("cuda")
SLEEP_CYCLES = 10**9  # ~0.5 s on an H100


def host_ms(fn, reps: int = 5) -> float:
    """Median host milliseconds of ``fn()`` issued behind a sleeping GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--backend", default="triton", choices=["triton", "flash"])
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()
    print(f"sleep kernel: {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device=DEV)
        cfg = PBSConfig(importance_kernel="triton", backend=args.backend)
        stages = stage_calls(q, k, v, cfg)
        stages["whole call"] = lambda: flexpbs.attention(q, k, v, config=cfg)
        # What one launch costs: the importance kernels without the custom op around them, and a
        # plain eager op, as yardsticks for the stage times above.
        scale = q.shape[-1] ** -0.5
        stages["importance kernels only"] = lambda: importance_kernels(
            q, k, block_size=128, segment_size=256, scale=scale, per_query_head=False
        )
        small = torch.zeros(16, device=DEV)
        stages["10 small eager ops"] = lambda: [small.add_(1) for _ in range(10)]
        for name, fn in stages.items():
            fn()
            rows.append((n, name, host_ms(fn)))
            print(rows[-1], flush=True)
        flexpbs.attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            flexpbs.attention(q, k, v, config=cfg)
            torch.cuda.synchronize()
        print(f"\nN={n}: host ops of one call by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        del stages  # q, k, v are replaced by the next length's
        torch.cuda.empty_cache()
    print("\n| N | stage | host ms (behind a busy GPU) |\n|---|---|---|")
    for n, name, t in rows:
        print(f"| {n} | {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
