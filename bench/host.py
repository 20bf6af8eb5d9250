"""GPU: host (CPU) time of each flexpbs stage, and whether a stage waits for the GPU.

    python -m bench host --lengths 32768 131072 [--backend flash]

Each stage (:func:`bench.stages.stage_calls`) is called while the GPU is still busy with a ~0.5 s sleep
kernel (:func:`bench.timing.host_ms`): the host time it takes is then its launch overhead, unless it waits
for the GPU (a hidden synchronisation, e.g. an allocator call), which shows up as ~500 ms. Also prints the
host ops of one whole call, by self CPU time. When the host time of a call exceeds its GPU kernel time,
the GPU idles between kernels. B=1, Hq=32, Hkv=8, D=128, bf16, the synthetic workload, threshold 0.9.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import flexpbs
from flexpbs import PBSConfig
from flexpbs.kernels.importance import launch as importance_kernels

from .stages import stage_calls
from .timing import SLEEP_CYCLES, host_ms
from .workloads import synthetic_qkv


def yardsticks(q: torch.Tensor, k: torch.Tensor) -> dict[str, Callable[[], object]]:
    """What one launch costs, beside the stage times: the importance kernels without the custom op
    around them, and ten plain eager ops."""
    small = torch.zeros(16, device=q.device)

    def importance_kernels_only() -> torch.Tensor:
        return importance_kernels(
            q, k, block_size=128, segment_size=256, scale=q.shape[-1] ** -0.5, per_query_head=False
        )

    def ten_small_eager_ops() -> None:
        for _ in range(10):
            small.add_(1)

    return {"importance kernels only": importance_kernels_only, "10 small eager ops": ten_small_eager_ops}


def host_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig) -> dict[str, float]:
    """Host milliseconds behind a busy GPU of each stage, a whole call and the yardsticks."""
    calls = stage_calls(q, k, v, cfg).calls
    calls["whole call"] = lambda: flexpbs.attention(q, k, v, config=cfg)
    calls.update(yardsticks(q, k))
    times = {}
    for name, fn in calls.items():
        fn()  # warm: compiled graphs, caches
        times[name] = host_ms(fn)
        print((q.shape[2], name, times[name]), flush=True)
    return times


def host_profile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, top: int) -> str:
    """The host ops of one warm call by self CPU time (torch.profiler table)."""
    flexpbs.attention(q, k, v, config=cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        flexpbs.attention(q, k, v, config=cfg)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--top", type=int, default=25, help="host ops listed per length")
    parser.add_argument("--backend", default="triton", choices=["triton", "flash"])


def run(args: argparse.Namespace) -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()
    print(f"sleep kernel: {(time.perf_counter() - start) * 1e3:.0f} ms", flush=True)
    cfg = PBSConfig(importance_kernel="triton", backend=args.backend, min_seq_len=0)
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device="cuda")
        rows += [(n, name, t) for name, t in host_times(q, k, v, cfg).items()]
        print(f"\nN={n}: host ops of one call by self CPU time")
        print(host_profile(q, k, v, cfg, args.top))
        del q, k, v
        torch.cuda.empty_cache()
    print("\n| N | stage | host ms (behind a busy GPU) |\n|---|---|---|")
    for n, name, t in rows:
        print(f"| {n} | {name} | {t:.2f} |")
