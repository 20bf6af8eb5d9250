"""GPU: where PBS starts to beat dense attention, and what the defaults give at every length.

    python -m bench breakeven                                 # 2K-512K, every method, one run
    python -m bench breakeven --lengths 4096 8192 16384 --json bench_out/breakeven.json

Per length, side by side on the same inputs: SDPA cuDNN, SDPA with its own default backend choice, SDPA
FlashAttention-2 (K/V repeated to the query heads: it takes no GQA), flexpbs forced sparse
(``min_seq_len=0``) on each backend, and flexpbs with its defaults (``backend="auto"``,
``min_seq_len="auto"``); beyond ``--other-dense-up-to`` (128K) cuDNN is the only dense method timed.
Prints a table, the break-even of each backend (the shortest measured length from which PBS runs at
least :data:`MARGIN` times cuDNN's speed at every longer measured length; ``flexpbs.dispatch.BREAK_EVEN``
holds the largest over the GPUs of a compute capability) and writes ``--json``. B=1, Hq=32, Hkv=8, D=128,
bf16, the synthetic workload at threshold 0.9 (one 131072-token draw: shorter lengths are its prefixes,
longer ones repeat it); medians of CUDA-event timings (:func:`bench.timing.cuda_ms`), host time
included when a call is host-bound. Where the defaults run dense attention (cuDNN's kernel, like the
baseline), cuDNN and the defaults are timed :data:`DENSE_ROUNDS` times in alternation and their medians
reported: the spread of one kernel's timings would otherwise decide the 5% check.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexpbs
from flexpbs.dispatch import flash_importable

from .timing import cuda_ms
from .workloads import prefix, synthetic_qkv

# How much faster than cuDNN PBS must be to count as beating it: repeated timings of one host-bound
# call near 16K differed by up to 10% (bench/RESULTS.md, session 8), and the defaults must never be
# more than 5% slower than cuDNN.
MARGIN = 1.10
# Alternating timings of cuDNN and of the defaults where the defaults run dense (medians kept).
DENSE_ROUNDS = 5


def break_even(rows: list[dict], method: str, margin: float = MARGIN) -> int | None:
    """Shortest length from which ``method`` beats cuDNN by ``margin`` (cuDNN's time over the method's)
    at every longer length measured."""
    winning = None
    for row in sorted(rows, key=lambda r: -r["n"]):
        if method not in row or row["cudnn"] < margin * row[method]:
            break
        winning = row["n"]
    return winning


def fa2_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """SDPA's FlashAttention-2, which takes no GQA: K/V repeated to the query heads outside the timing."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return cuda_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))


def measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: float,
    backends: list[str],
    other_dense: bool = True,
) -> dict:
    """One row of the table: milliseconds of each method on ``q [1, 32, N, 128]``, ``k``/``v [1, 8, N, 128]``,
    and flexpbs's densities and the path its defaults took. ``other_dense=False`` times cuDNN as the
    only dense method (SDPA's default and FA2 are None)."""
    row: dict = {"n": q.shape[2]}

    def cudnn_ms() -> float:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

    def defaults_ms() -> float:
        return cuda_ms(lambda: flexpbs.attention(q, k, v, threshold=threshold))

    row["cudnn"] = cudnn_ms()
    row["sdpa_default"] = row["fa2"] = None
    if other_dense:
        row["sdpa_default"] = cuda_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
        row["fa2"] = fa2_ms(q, k, v)
    for backend in backends:
        options = dict(threshold=threshold, backend=backend, min_seq_len=0)
        _, stats = flexpbs.attention(q, k, v, return_stats=True, **options)
        row[f"density_{backend}"] = stats.density.mean().item()
        row[f"pbs_{backend}"] = cuda_ms(lambda options=options: flexpbs.attention(q, k, v, **options))
    _, stats = flexpbs.attention(q, k, v, threshold=threshold, return_stats=True)
    row["defaults_path"] = "dense" if stats.dense else stats.backend
    row["defaults"] = defaults_ms()
    if stats.dense:
        # the defaults run cuDNN's own kernel: their ratio is the spread of repeated timings (up to 6% in
        # one run, session 9), so both are timed again in alternation and their medians kept
        cudnn, defaults = [row["cudnn"]], [row["defaults"]]
        for _ in range(DENSE_ROUNDS - 1):
            cudnn.append(cudnn_ms())
            defaults.append(defaults_ms())
        row["cudnn"], row["defaults"] = statistics.median(cudnn), statistics.median(defaults)
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[
            2048,
            4096,
            6144,
            8192,
            10240,
            12288,
            14336,
            16384,
            20480,
            24576,
            32768,
            65536,
            131072,
            262144,
            524288,
        ],
    )
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument(
        "--other-dense-up-to",
        type=int,
        default=131072,
        help="time SDPA's default choice and FA2 up to this length; longer ones time cuDNN alone "
        "(each of their calls takes seconds there and they decide nothing)",
    )
    parser.add_argument("--json", default=None, help="write the rows and break-even lengths here")


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    backends = ["triton"] + (["flash"] if flash_importable() else [])
    draw = synthetic_qkv(1, 32, 8, 131072, 128, device="cuda")
    rows = []
    for n in args.lengths:
        inputs = (prefix(x, n) for x in draw)
        rows.append(measure(*inputs, args.threshold, backends, n <= args.other_dense_up_to))
        print(
            {key: round(val, 3) if isinstance(val, float) else val for key, val in rows[-1].items()},
            flush=True,
        )
    cols = ["sdpa_default", "fa2"] + [f"pbs_{b}" for b in backends] + ["defaults"]
    print("\n| N | cuDNN ms | " + " | ".join(f"{c} (x cuDNN)" for c in cols) + " | density | defaults ran |")
    print("|---" * (len(cols) + 4) + "|")
    for r in rows:
        cells = " | ".join("-" if r[c] is None else f"{r[c]:.2f} ({r['cudnn'] / r[c]:.2f}x)" for c in cols)
        print(f"| {r['n']} | {r['cudnn']:.2f} | {cells} | {r['density_triton']:.3f} | {r['defaults_path']} |")
    result = {
        "rows": rows,
        "device": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "break_even": {b: break_even(rows, f"pbs_{b}") for b in backends},
    }
    print(f"\nbreak-even (PBS {MARGIN:.2f}x cuDNN or faster from this length on):", result["break_even"])
    print(
        "defaults never slower than cuDNN by more than 5%:",
        all(r["defaults"] <= 1.05 * r["cudnn"] for r in rows),
        "; worst defaults / cuDNN:",
        max(r["defaults"] / r["cudnn"] for r in rows),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
