"""CPU: the synthetic workload's density at a threshold, with PBS and without permutation.

    python -m bench calibrate                                   # 32K and 128K, seed 0 (the harness's input)
    python -m bench calibrate --seeds 0 1 2 3 4 5 --lengths 32768 131072
    python -m bench calibrate --passage-scale 1.5 --passage-exponent 0.6    # other knobs of Synthetic

Runs the selection stages only (importance on its PyTorch path, permutation, selection: no attention) of
:func:`bench.stages.stage_calls` on :func:`bench.workloads.synthetic_qkv` at block 128 / segment 256 and
prints the mean density of the causal tiles per length and draw, and the mean over draws. How the defaults
of :class:`bench.workloads.Synthetic` were chosen (module docstring there).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from flexpbs import PBSConfig
from flexpbs.tile_grid import density

from .stages import stage_calls
from .workloads import Synthetic, synthetic_qkv


def densities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Mean density of PBS and of no-permutation selection (importance on the PyTorch path) on
    ``q [B, Hq, N, D]``, ``k``/``v [B, Hkv, N, D]``."""
    return tuple(
        density(
            stage_calls(
                q, k, v, PBSConfig(threshold=threshold, key_order=order, importance_kernel="torch")
            ).tiles
        )
        .mean()
        .item()
        for order in ("sorted", "original")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="draws per length (the harness uses 0)"
    )
    for f in fields(Synthetic):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)


def run(args: argparse.Namespace) -> None:
    spec = Synthetic(**{f.name: getattr(args, f.name) for f in fields(Synthetic)})
    print(spec)
    for n in args.lengths:
        draws = []
        for seed in args.seeds:
            qkv = synthetic_qkv(1, *args.heads, n, 128, dtype=torch.float32, seed=seed, spec=spec)
            draws.append(densities(*qkv, args.threshold))
            del qkv
            print(
                f"N={n:7d} seed {seed}: PBS density {draws[-1][0]:.3f}, no permutation {draws[-1][1]:.3f}",
                flush=True,
            )
        if len(draws) > 1:
            pbs, original = (sum(d) / len(d) for d in zip(*draws, strict=True))
            print(
                f"N={n:7d} mean of {len(draws)} seeds: PBS density {pbs:.3f}, no permutation {original:.3f}",
                flush=True,
            )
