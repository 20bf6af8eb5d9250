"""GPU: what each speed lever buys, measured side by side on the synthetic workload.

    PYTHONPATH=$PWD python bench/levers.py --lengths 32768 131072

Levers: FlexAttention kernel_options for the attention stage (tile sizes, warps, pipeline stages, TMA,
the FLASH backend: ``--levers kernel_options --options default FLASH``);
torch.compile of the selection stage; host synchronisations in one flexpbs call; capture of the whole
call in a CUDA graph (replay time vs eager); the number of row bands of the selection and block
lists; the head-chunking memory floor (time and peak memory of a
call when every call is split into one-KV-head chunks against the default floor). ``--levers`` picks
some. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexpbs
import flexpbs.api as api
import flexpbs.selection as selection
from flexpbs import PBSConfig
from flexpbs.importance import key_importance
from flexpbs.permutation import permute_kv, segment_permutation
from flexpbs.sparse_attention import sparse_attention
from attention import host_syncs, ms, peak_extra_gib
from workloads import synthetic_qkv

DEV = torch.device("cuda")
KERNEL_OPTIONS = {
    "default": None,  # flexpbs's: tuned_kernel_options where they apply (sm90 half, D=128), else torch's
    # torch 2.11's H100 default for bf16 and head dim 128, spelled out
    "128x64 w8 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "USE_TMA": {"USE_TMA": True},
    "USE_TMA 128x128 w8 s2": {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "PRESCALE_QK": {"PRESCALE_QK": True},
    "64x128 w4 s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    # FlexAttention's FLASH backend (backend="flash"); reported as failed when flash-attn-4 is missing
    "FLASH": {"BACKEND": "FLASH"},
}
# Kernel options are timed in interleaved rounds: a long run drifts (clocks, heat) by several percent.
ROUNDS = 3


def median_and_rounds(times: list[float]) -> tuple[float, str]:
    """The median of a lever's interleaved rounds (NaN when none ran) and the rounds as a note."""
    ordered = sorted(times)
    return (ordered[len(ordered) // 2] if ordered else float("nan"),
            "rounds " + " / ".join(f"{t:.2f}" for t in times))


LEVERS = ("kernel_options", "compile_select", "graph", "chunk_floor", "bands")


def chunk_floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple]:
    """One call with the default head-chunking floor against one KV head per chunk (floor 0 and a
    budget too small for two heads): time, peak memory beyond the inputs and output, whether the
    tiles are identical and the largest output difference (each chunk compiles its own flex kernel
    for fewer heads, which may accumulate in another order)."""
    n, rows = q.shape[2], []
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    call = lambda: flexpbs.attention(q, k, v)  # noqa: E731
    ref, ref_stats = flexpbs.attention(q, k, v, return_stats=True)
    default_floor = api._MIN_CHUNK_BYTES
    for label, floor in (("default floor (1 GiB)", default_floor), ("floor 0 (25% of q/k/v)", 0)):
        api._MIN_CHUNK_BYTES = floor
        try:
            chunks = k.shape[1] // api._kv_heads_per_chunk(q, k, v, 128, False)
            out, stats = flexpbs.attention(q, k, v, return_stats=True)
            same_tiles = torch.equal(stats.tiles, ref_stats.tiles)
            diff = (out.float() - ref.float()).abs().max().item()
            extra = peak_extra_gib(call) - ref.numel() * ref.element_size() / 2**30
            note = (f"{chunks} chunks, extra beyond q/k/v/out {extra:.3f} GiB = {extra * 2**30 / inputs:.2f}x q/k/v, "
                    f"same tiles {same_tiles}, max diff {diff:.1e}")
            rows.append((n, f"head chunking, {label}", ms(call), note))
        finally:
            api._MIN_CHUNK_BYTES = default_floor
        print(rows[-1], flush=True)
    return rows


def kernel_options(n: int, density: float, attend, options: list[str]) -> list[tuple]:
    """The attention stage under each of KERNEL_OPTIONS: median of ROUNDS interleaved timings, and
    the largest difference from the default options' output."""
    ref, fns, times, notes = attend(None), {}, {}, {}
    for name, opts in ((name, KERNEL_OPTIONS[name]) for name in options):
        try:  # a config that does not fit shared memory fails to compile
            fns[name] = lambda opts=opts: attend(opts)
            notes[name] = f"density {density:.3f}, diff {(fns[name]().float() - ref.float()).abs().max().item():.1e}"
            times[name] = []
        except Exception as e:
            fns.pop(name)
            notes[name] = f"failed: {type(e).__name__}: {e}"[:160]
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(ms(fn))
    rows = []
    for name in options:
        t, rounds = median_and_rounds(times.get(name, []))
        rows.append((n, f"attention kernel_options {name}", t, f"{notes[name]}; {rounds}"))
        print(rows[-1], flush=True)
    return rows


def band_count(q, k, v, sel, tiles, backend: str) -> list[tuple]:
    """Selection and block lists work in row bands: fewer launches (host time) against less work
    per launch (GPU time). The selection alone and the whole call (on ``backend``) at 1/2/4/8 bands,
    median of ROUNDS interleaved rounds."""
    n, default, counts = q.shape[2], selection._MAX_BANDS, (1, 2, 4, 8)
    cfg = PBSConfig(backend=backend)
    call = lambda: flexpbs.attention(q, k, v, config=cfg)  # noqa: E731
    times = {(b, what): [] for b in counts for what in ("select", "call")}
    same = {}
    try:
        for round_ in range(ROUNDS):
            for b in counts:
                selection._MAX_BANDS = b
                if round_ == 0:
                    same[b] = torch.equal(sel(), tiles)
                times[b, "select"].append(ms(sel))
                times[b, "call"].append(ms(call))
    finally:
        selection._MAX_BANDS = default
    rows = []
    for b in counts:
        for what, label in (("select", "select alone"), ("call", f"whole call, backend={backend}")):
            t, note = median_and_rounds(times[b, what])
            note += f"; same tiles {same[b]}" if what == "select" else ""
            rows.append((n, f"at most {b} row bands: {label}", t, note))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--backend", default="triton", choices=["triton", "flash"], help="for the graph and bands levers")
    parser.add_argument("--options", nargs="+", default=list(KERNEL_OPTIONS), choices=list(KERNEL_OPTIONS),
                        help="kernel options compared by the kernel_options lever")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device=DEV)
        scale = 128**-0.5
        imp = key_importance(q, k, block_size=128, segment_size=256, scale=scale, per_query_head=False, importance_kernel="triton")
        perm = segment_permutation(imp, n, 256)
        k_p, v_p = permute_kv(k, v, perm)
        sel = lambda: selection.select_tiles(  # noqa: E731
            q, k_p, perm, block_size=128, segment_size=256, threshold=0.9, scale=scale)
        tiles = sel()
        density = tiles.float().sum().item() / (32 * tiles.shape[-1] * (tiles.shape[-1] + 1) / 2)
        ref = sparse_attention(q, k_p, v_p, tiles, perm, block_size=128, segment_size=256, scale=scale)
        if "kernel_options" in args.levers:
            rows += kernel_options(n, density, lambda opts: sparse_attention(
                q, k_p, v_p, tiles, perm, block_size=128, segment_size=256, scale=scale, kernel_options=opts),
                args.options)
        if "compile_select" in args.levers:
            rows.append((n, "select eager", ms(sel), ""))
            eager_scores, eager_threshold = selection.block_scores, selection.threshold_tiles
            try:
                selection.block_scores = torch.compile(eager_scores, dynamic=False)
                selection.threshold_tiles = torch.compile(eager_threshold, dynamic=False)
                same = torch.equal(sel(), tiles)
                rows.append((n, "select, block_scores + threshold_tiles compiled", ms(sel), f"same tiles {same}"))
            except Exception as e:
                rows.append((n, "select compiled", float("nan"), f"failed: {type(e).__name__}: {e}"[:200]))
            finally:
                selection.block_scores, selection.threshold_tiles = eager_scores, eager_threshold
            print(rows[-1], flush=True)
        if "graph" in args.levers:
            cfg = PBSConfig(backend=args.backend)
            call = lambda: flexpbs.attention(q, k, v, config=cfg)  # noqa: E731
            ref = call()
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # the ratio's baseline, in the same run
                cudnn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                rows.append((n, "SDPA cuDNN dense causal", ms(cudnn), ""))
            rows.append((n, f"flexpbs eager call, backend={args.backend}", ms(call),
                         f"host syncs per call: {host_syncs(call)}"))
            print(rows[-1], flush=True)
            try:
                static_out = call()
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    call()
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    static_out = call()
                graph.replay()
                diff = (static_out.float() - ref.float()).abs().max().item()
                rows.append((n, f"flexpbs in a CUDA graph (replay), backend={args.backend}", ms(graph.replay),
                             f"diff vs eager {diff:.1e}"))
            except Exception as e:
                traceback.print_exc()
                rows.append((n, "flexpbs in a CUDA graph", float("nan"), f"capture failed: {type(e).__name__}: {e}"[:200]))
            print(rows[-1], flush=True)
        if "chunk_floor" in args.levers:
            rows += chunk_floor(q, k, v)
        if "bands" in args.levers:
            rows += band_count(q, k, v, sel, tiles, args.backend)
        torch.cuda.empty_cache()

    print("\n| N | lever | ms | note |\n|---|---|---|---|")
    for n, name, t, note in rows:
        print(f"| {n} | {name} | {t:.2f} | {note} |")


if __name__ == "__main__":
    main()
