"""GPU: where one flexpbs call spends its GPU time, kernel by kernel and stage by stage (torch.profiler).

    PYTHONPATH=$PWD:$PWD/bench python bench/profile_call.py --lengths 131072

Profiles a few warm calls on the synthetic workload (B=1, Hq=32, Hkv=8, D=128, bf16) and prints:
the CUDA kernels of a whole call sorted by total time; the kernel time of each stage run alone
(``bench/stages.py``); and the kernel time outside FlexAttention's kernel as a share of SDPA cuDNN's
dense causal time, timed in the same run. Kernel time is the sum of kernel durations: it leaves out
host time and the gaps between launches.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import flexpbs
from attention import ms
from flexpbs import PBSConfig
from stages import stage_calls
from workloads import synthetic_qkv

DEV = torch.device("cuda")
# FlexAttention's compiled forward kernel (an inductor template); everything else is overhead.
FLEX_KERNEL_PREFIX = "triton_tem_fused"


def kernel_events(fn, calls: int) -> list:
    """CUDA kernel events of ``calls`` runs of ``fn`` (warm), aggregated by kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    return sorted(events, key=lambda e: e.device_time_total, reverse=True)


def per_call(events: list, calls: int, flex: bool | None = None) -> tuple[float, int]:
    """(ms, launches) per call, over all kernels, FlexAttention's only (True) or all others (False)."""
    picked = [e for e in events if flex is None or e.key.startswith(FLEX_KERNEL_PREFIX) == flex]
    return sum(e.device_time_total for e in picked) / calls / 1e3, sum(e.count for e in picked) // calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    summary = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device=DEV)
        cfg = PBSConfig()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        events = kernel_events(lambda: flexpbs.attention(q, k, v, config=cfg), args.calls)
        total, launches = per_call(events, args.calls)
        other, other_launches = per_call(events, args.calls, flex=False)
        print(f"\nN={n}: {total:.2f} ms of CUDA kernels per call ({launches} launches), "
              f"outside FlexAttention {other:.3f} ms ({other_launches} launches) = {100 * other / cudnn:.2f}% "
              f"of cuDNN's {cudnn:.2f} ms\n")
        print("| kernel | ms per call | launches per call |\n|---|---|---|")
        for e in events[: args.top]:
            print(f"| {e.key[:90]} | {e.device_time_total / args.calls / 1e3:.3f} | {e.count // args.calls} |")
        stages = stage_calls(q, k, v, cfg)
        print(f"\nN={n}, each stage alone:\n\n| stage | kernel ms | launches | % of cuDNN |\n|---|---|---|---|")
        for name, fn in stages.items():
            t, count = per_call(kernel_events(fn, args.calls), args.calls, flex=False)
            print(f"| {name} (outside FlexAttention) | {t:.3f} | {count} | {100 * t / cudnn:.2f}% |", flush=True)
        summary.append((n, cudnn, total, other, other_launches))
        del q, k, v, stages
        torch.cuda.empty_cache()
    print("\n| N | cuDNN ms | flexpbs kernel ms | outside FlexAttention ms | launches | % of cuDNN |")
    print("|---|---|---|---|---|---|")
    for n, cudnn, total, other, launches in summary:
        print(f"| {n} | {cudnn:.2f} | {total:.2f} | {other:.3f} | {launches} | {100 * other / cudnn:.2f}% |")


if __name__ == "__main__":
    main()
