"""GPU: where PBS starts to beat dense attention, and what the defaults give at every length.

    PYTHONPATH=$PWD python bench/breakeven.py                 # 2K-512K, every method, one run
    PYTHONPATH=$PWD python bench/breakeven.py --lengths 4096 8192 16384

Per length, side by side on the same inputs: SDPA cuDNN, SDPA with its own default backend choice, SDPA
FlashAttention-2 (K/V repeated to the query heads: it takes no GQA), flexpbs forced sparse
(``min_seq_len=0``) on each backend, and flexpbs with its defaults (``backend="auto"``,
``min_seq_len="auto"``). Prints a table, the break-even of each backend (the shortest measured length
from which PBS beats cuDNN at every longer measured length: the value for ``flexpbs.dispatch.BREAK_EVEN``)
and writes ``--json``. B=1, Hq=32, Hkv=8, D=128, bf16, the synthetic workload at threshold 0.9 (one
131072-token draw: shorter lengths are its prefixes, longer ones repeat it); medians of CUDA-event
timings (``triton.testing.do_bench``), host time included when a call is host-bound.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flexpbs
from flexpbs.dispatch import flash_importable
from workloads import synthetic_qkv

DEV = torch.device("cuda")


def ms(fn) -> float:
    t = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if t > 10:  # long calls: a few repetitions rather than one
        t = do_bench(fn, warmup=2 * t, rep=min(10, max(3, int(3000 / t))) * t, return_mode="median")
    return t


def prefix(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // x.shape[2])
    return (x.repeat(1, 1, reps, 1) if reps > 1 else x)[:, :, :n].contiguous()


def break_even(rows: list[dict], method: str) -> int | None:
    """Shortest length from which ``method`` beats cuDNN at every longer length measured."""
    winning = None
    for row in sorted(rows, key=lambda r: -r["n"]):
        if method not in row or row[method] >= row["cudnn"]:
            break
        winning = row["n"]
    return winning


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[2048, 4096, 6144, 8192, 10240, 12288, 14336, 16384, 20480, 24576, 32768, 65536,
                                 131072, 262144, 524288])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    backends = ["triton"] + (["flash"] if flash_importable() else [])
    q0, k0, v0 = synthetic_qkv(1, 32, 8, 131072, 128, device=DEV)
    rows = []
    for n in args.lengths:
        q, k, v = prefix(q0, n), prefix(k0, n), prefix(v0, n)
        row: dict = {"n": n}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        row["sdpa_default"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["fa2"] = ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        del kr, vr
        for backend in backends:
            opts = dict(threshold=args.threshold, backend=backend, min_seq_len=0)
            _, stats = flexpbs.attention(q, k, v, return_stats=True, **opts)
            row[f"density_{backend}"] = stats.density.mean().item()
            row[f"pbs_{backend}"] = ms(lambda: flexpbs.attention(q, k, v, **opts))
        _, stats = flexpbs.attention(q, k, v, threshold=args.threshold, return_stats=True)
        row["defaults_path"] = "dense" if stats.dense else stats.backend
        row["defaults"] = ms(lambda: flexpbs.attention(q, k, v, threshold=args.threshold))
        rows.append(row)
        print({key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()}, flush=True)
        del q, k, v
    cols = ["sdpa_default", "fa2"] + [f"pbs_{b}" for b in backends] + ["defaults"]
    print("\n| N | cuDNN ms | " + " | ".join(f"{c} (x cuDNN)" for c in cols) + " | density | defaults ran |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        cells = " | ".join(f"{r[c]:.2f} ({r['cudnn'] / r[c]:.2f}x)" for c in cols)
        print(f"| {r['n']} | {r['cudnn']:.2f} | {cells} | {r['density_triton']:.3f} | {r['defaults_path']} |")
    result = {"rows": rows, "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
              "torch": torch.__version__, "break_even": {b: break_even(rows, f"pbs_{b}") for b in backends}}
    print("\nbreak-even (PBS faster than cuDNN from this length on):", result["break_even"])
    print("defaults never slower than cuDNN by more than 5%:",
          all(r["defaults"] <= 1.05 * r["cudnn"] for r in rows),
          "; worst defaults / cuDNN:", max(r["defaults"] / r["cudnn"] for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
