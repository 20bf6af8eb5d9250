"""GPU: where one flexpbs call spends its GPU time, kernel by kernel and stage by stage (torch.profiler).

    python -m bench profile --lengths 131072

Profiles a few warm calls on the synthetic workload (B=1, Hq=32, Hkv=8, D=128, bf16, threshold 0.9, the
sparse path on the Triton backend) and prints: the CUDA kernels of a whole call sorted by total time; the
kernel time of each stage run alone (:func:`bench.stages.stage_calls`); and the kernel time outside
FlexAttention's kernel as a share of SDPA cuDNN's dense causal time, timed in the same run. Kernel time is
the sum of kernel durations: it leaves out host time and the gaps between launches. (The module is not
named ``profile``, the name of a standard-library module.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import flexpbs
from flexpbs import PBSConfig

from .stages import stage_calls
from .timing import cuda_ms
from .workloads import synthetic_qkv

# FlexAttention's compiled forward kernel on the Triton backend (an inductor template); every other kernel
# is overhead. The FLASH backend's kernels have other names (not profiled here).
FLEX_KERNEL_PREFIX = "triton_tem_fused"


def kernel_events(fn: Callable[[], object], calls: int) -> list:
    """CUDA kernel events of ``calls`` runs of ``fn`` (warm), aggregated by kernel name, longest first."""
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


def profile_length(n: int, cfg: PBSConfig, calls: int, top: int) -> tuple[float, float, float, int]:
    """Prints the kernel and stage tables of one length; returns (cuDNN ms, flexpbs kernel ms, kernel ms
    outside FlexAttention, their launches), per call."""
    q, k, v = synthetic_qkv(1, 32, 8, n, 128, device="cuda")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = cuda_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
    events = kernel_events(lambda: flexpbs.attention(q, k, v, config=cfg), calls)
    total, launches = per_call(events, calls)
    other, other_launches = per_call(events, calls, flex=False)
    print(
        f"\nN={n}: {total:.2f} ms of CUDA kernels per call ({launches} launches), "
        f"outside FlexAttention {other:.3f} ms ({other_launches} launches) = {100 * other / cudnn:.2f}% "
        f"of cuDNN's {cudnn:.2f} ms\n"
    )
    print("| kernel | ms per call | launches per call |\n|---|---|---|")
    for e in events[:top]:
        print(f"| {e.key[:90]} | {e.device_time_total / calls / 1e3:.3f} | {e.count // calls} |")
    print(f"\nN={n}, each stage alone:\n\n| stage | kernel ms | launches | % of cuDNN |\n|---|---|---|---|")
    for name, fn in stage_calls(q, k, v, cfg).calls.items():
        t, count = per_call(kernel_events(fn, calls), calls, flex=False)
        print(f"| {name} (outside FlexAttention) | {t:.3f} | {count} | {100 * t / cudnn:.2f}% |", flush=True)
    return cudnn, total, other, other_launches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--calls", type=int, default=3, help="warm calls profiled per measurement")
    parser.add_argument("--top", type=int, default=40, help="kernels listed per length")


def run(args: argparse.Namespace) -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = PBSConfig(backend="triton", min_seq_len=0)
    summary = []
    for n in args.lengths:
        summary.append((n, *profile_length(n, cfg, args.calls, args.top)))
        torch.cuda.empty_cache()
    print("\n| N | cuDNN ms | flexpbs kernel ms | outside FlexAttention ms | launches | % of cuDNN |")
    print("|---|---|---|---|---|---|")
    for n, cudnn, total, other, launches in summary:
        print(f"| {n} | {cudnn:.2f} | {total:.2f} | {other:.3f} | {launches} | {100 * other / cudnn:.2f}% |")
