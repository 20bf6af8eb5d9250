"""One attention layer with heads split over GPUs (tensor parallel) vs one GPU, on the synthetic workload.

    torchrun --standalone --nproc-per-node 2 bench/tp_attention.py --lengths 131072 262144

Rank r takes query heads [r*Hq/W, (r+1)*Hq/W) and their KV heads, as transformers' tensor-parallel
plan splits them, and runs flexpbs.attention on them; no communication is needed inside attention.
Reported per length: the slowest rank's median time, rank 0's time for ALL heads on its own GPU
(the one-GPU baseline, when it fits), the speedup, each rank's density and peak memory beyond its
inputs. Prints a markdown table last (rank 0).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import flexpbs
from attention import ms, peak_extra_gib
from workloads import synthetic_qkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    if args.kv_heads % world:
        raise ValueError(f"--kv-heads {args.kv_heads} must be a multiple of the world size {world}")
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, args.q_heads, args.kv_heads, n, 128, device=device)  # same on every rank
        kv = slice(rank * args.kv_heads // world, (rank + 1) * args.kv_heads // world)
        qh = slice(rank * args.q_heads // world, (rank + 1) * args.q_heads // world)
        q_l, k_l, v_l = q[:, qh].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()
        _, stats = flexpbs.attention(q_l, k_l, v_l, threshold=args.threshold, return_stats=True)
        peak = peak_extra_gib(lambda: flexpbs.attention(q_l, k_l, v_l, threshold=args.threshold))
        dist.barrier()
        local = ms(lambda: flexpbs.attention(q_l, k_l, v_l, threshold=args.threshold))
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (local, stats.density.mean().item(), peak))
        single = float("nan")
        if rank == 0:
            try:
                single = ms(lambda: flexpbs.attention(q, k, v, threshold=args.threshold))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        rows.append((n, max(t for t, _, _ in per_rank), single, per_rank))
        del q, k, v, q_l, k_l, v_l
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        print(f"\n{world} GPUs ({torch.cuda.get_device_name()}), Hq={args.q_heads}, Hkv={args.kv_heads}, D=128, bf16")
        print("| N | split ms (slowest rank) | one GPU ms | speedup | density per rank | peak extra GiB per rank |")
        print("|---|---|---|---|---|---|")
        for n, split, single, per_rank in rows:
            dens = ", ".join(f"{d:.3f}" for _, d, _ in per_rank)
            mem = ", ".join(f"{m:.2f}" for _, _, m in per_rank)
            print(f"| {n} | {split:.1f} | {single:.1f} | {single / split:.2f}x | {dens} | {mem} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
