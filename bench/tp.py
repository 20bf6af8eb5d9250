"""GPUs: one attention layer with its heads split over GPUs (tensor parallel) against one GPU.

    torchrun --standalone --nproc-per-node 2 -m bench tp --lengths 131072 262144

Rank r takes query heads [r*Hq/W, (r+1)*Hq/W) and their KV heads, as transformers' tensor-parallel plan
splits them, and runs flexpbs.attention on them; no communication is needed inside attention. Reported
per length: the slowest rank's median time, rank 0's time for ALL heads on its own GPU (the one-GPU
baseline, when it fits), the speedup, each rank's density and peak memory beyond its inputs. The
synthetic workload, D=128, bf16, the sparse path (``min_seq_len=0``) on the backend flexpbs picks.
Prints a markdown table last (rank 0).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import flexpbs

from .timing import cuda_ms, peak_extra_gib
from .workloads import synthetic_qkv


def split_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of ``q [B, Hq, N, D]`` and ``k``/``v [B, Hkv, N, D]``: contiguous head slices."""
    q_heads, kv_heads = q.shape[1], k.shape[1]
    qh = slice(rank * q_heads // world, (rank + 1) * q_heads // world)
    kv = slice(rank * kv_heads // world, (rank + 1) * kv_heads // world)
    return q[:, qh].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()


def measure(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: float, rank: int, world: int
) -> tuple:
    """(slowest rank's ms, one GPU's ms on rank 0 or NaN, [(ms, density, peak GiB) per rank])."""
    options = dict(threshold=threshold, min_seq_len=0)
    q_l, k_l, v_l = split_heads(q, k, v, rank, world)
    _, stats = flexpbs.attention(q_l, k_l, v_l, return_stats=True, **options)
    peak = peak_extra_gib(lambda: flexpbs.attention(q_l, k_l, v_l, **options))
    dist.barrier()
    local = cuda_ms(lambda: flexpbs.attention(q_l, k_l, v_l, **options))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (local, stats.density.mean().item(), peak))
    single = float("nan")
    if rank == 0:
        try:
            single = cuda_ms(lambda: flexpbs.attention(q, k, v, **options))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    return max(t for t, _, _ in per_rank), single, per_rank


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)


def run(args: argparse.Namespace) -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    if args.kv_heads % world:
        raise ValueError(f"--kv-heads {args.kv_heads} must be a multiple of the world size {world}")
    rows = []
    for n in args.lengths:
        qkv = synthetic_qkv(1, args.q_heads, args.kv_heads, n, 128, device=device)  # the same on every rank
        rows.append((n, *measure(*qkv, args.threshold, rank, world)))
        del qkv
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        print(
            f"\n{world} GPUs ({torch.cuda.get_device_name()}), Hq={args.q_heads}, "
            f"Hkv={args.kv_heads}, D=128, bf16"
        )
        print(
            "| N | split ms (slowest rank) | one GPU ms | speedup | density per rank | peak "
            "extra GiB per rank |"
        )
        print("|---|---|---|---|---|---|")
        for n, split, single, per_rank in rows:
            densities = ", ".join(f"{d:.3f}" for _, d, _ in per_rank)
            peaks = ", ".join(f"{m:.2f}" for _, _, m in per_rank)
            print(f"| {n} | {split:.1f} | {single:.1f} | {single / split:.2f}x | {densities} | {peaks} |")
    dist.destroy_process_group()
