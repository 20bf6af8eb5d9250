"""GPU: what each speed lever buys, measured side by side on the synthetic workload.

    python -m bench levers --lengths 32768 131072
    python -m bench levers --lengths 131072 --levers kernel_options --options default FLASH
    python -m bench levers --lengths 131072 --levers graph bands --backend flash

Levers (``--levers`` picks some):

- ``kernel_options``: FlexAttention kernel options for the attention stage (tile sizes, warps, pipeline
  stages, TMA, the FLASH backend), each against the same tiles. flexpbs picks its own options
  (``tuned_kernel_options``) and takes none from callers, so this lever calls the compiled FlexAttention
  function flexpbs calls (``flexpbs.sparse_attention.compiled_flex_call``) on the stage's block lists,
  in flexpbs's layout, with static shapes; "default" is flexpbs's tuned set for the device (torch's
  defaults where none is tuned).
- ``compile_select``: the selection stage under ``torch.compile`` against eager.
- ``graph``: host synchronisations in one flexpbs call, and the whole call captured in a CUDA graph
  (replay time vs eager), beside SDPA cuDNN.
- ``chunk_floor``: time and peak memory of a call split into one-KV-head chunks (memory floor 0,
  ``flexpbs.limits.override``) against the default floor.
- ``bands``: the number of row bands of the selection and block lists (``max_bands``), selection alone and
  whole calls.

B=1, Hq=32, Hkv=8, D=128, bf16, threshold 0.9, the sparse path (``min_seq_len=0``). Kernel options and
bands are timed in interleaved rounds: a long run drifts (clocks, heat) by several percent. Prints a
markdown table last.
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexpbs
from flexpbs import PBSConfig, limits
from flexpbs.block_mask import block_lists
from flexpbs.pipeline import kv_heads_per_chunk
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import compiled_flex_call, tuned_kernel_options
from flexpbs.tile_grid import density

from .stages import StageRun, stage_calls
from .timing import cuda_ms, peak_extra_gib
from .workloads import synthetic_qkv

KERNEL_OPTIONS: dict[str, dict | None] = {
    "default": None,  # flexpbs's tuned options for the device where they apply, else torch's defaults
    # torch 2.11's H100 default for bf16 and head dim 128, spelled out
    "128x64 w8 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "USE_TMA": {"USE_TMA": True},
    "USE_TMA 128x128 w8 s2": {
        "USE_TMA": True,
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "num_warps": 8,
        "num_stages": 2,
    },
    "PRESCALE_QK": {"PRESCALE_QK": True},
    "64x128 w4 s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    # FlexAttention's FLASH backend; reported as failed when flash-attn-4 is missing
    "FLASH": {"BACKEND": "FLASH"},
}
LEVERS = ("kernel_options", "compile_select", "graph", "chunk_floor", "bands")
ROUNDS = 3  # interleaved rounds of the kernel_options and bands levers
Row = tuple[int, str, float, str]  # (N, lever, ms, note)


def median_and_rounds(times: list[float]) -> tuple[float, str]:
    """The median of a lever's interleaved rounds (NaN when none ran) and the rounds as a note."""
    ordered = sorted(times)
    return (
        ordered[len(ordered) // 2] if ordered else float("nan"),
        "rounds " + " / ".join(f"{t:.2f}" for t in times),
    )


def host_syncs(fn: Callable[[], object]) -> int:
    """Device-to-host synchronisations during ``fn()`` (CUDA sync debug mode warnings)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def attention_with_options(q: torch.Tensor, run: StageRun, options: dict | None) -> torch.Tensor:
    """The attention stage of ``run`` (prefill, N a whole number of blocks) through compiled FlexAttention
    with the kernel ``options``.

    flexpbs's layout: each permutation row (batch element, KV head) is a batch element holding its group of
    query heads (``[B * Hkv, G, N, D]`` queries against ``[B * Hkv, 1, N, D]`` keys), the block lists of
    the selected tiles and the causal test on a table of original positions. Returns ``[B, Hq, N, Dv]``.
    """
    cfg = run.config
    batch, q_heads, n, head_dim = q.shape
    if n % cfg.block_size:  # flexpbs pads a partial last block; this lever does not
        raise ValueError(f"the kernel_options lever needs whole blocks of {cfg.block_size}, got N={n}")
    rows, group = batch * run.perm.shape[1], q_heads // run.perm.shape[1]
    lists = tuple(
        x.reshape(rows, group, *x.shape[2:])
        for x in block_lists(run.tiles, run.perm, cfg.block_size, cfg.segment_size)
    )
    positions = run.perm.to(torch.int32).reshape(rows, 1, n)
    key_p, value_p = (x.reshape(rows, 1, n, x.shape[-1]) for x in (run.key_p, run.value_p))
    # one graph per option set and length: more than dynamo's default recompile limit
    with torch._dynamo.config.patch(recompile_limit=64):
        out = compiled_flex_call(
            q.reshape(rows, group, n, head_dim),
            key_p,
            value_p,
            lists,
            positions,
            cfg.block_size,
            run.scale,
            options,
        )
    return out.view(batch, q_heads, n, -1)


def kernel_options(q: torch.Tensor, run: StageRun, names: list[str]) -> list[Row]:
    """The attention stage under each of ``KERNEL_OPTIONS[names]``: median of ROUNDS interleaved timings,
    and the largest difference from the default options' output."""
    capability = torch.cuda.get_device_capability(q.device)
    tuned = tuned_kernel_options(capability, q.dtype, q.shape[-1], run.config.block_size)
    n, selected = q.shape[2], density(run.tiles).mean().item()
    ref = attention_with_options(q, run, tuned)
    calls, times, notes = {}, {}, {}
    for name in names:
        options = tuned if name == "default" else KERNEL_OPTIONS[name]
        try:  # a config that does not fit shared memory fails to compile
            diff = (attention_with_options(q, run, options).float() - ref.float()).abs().max().item()
        except Exception as err:
            notes[name] = f"failed: {type(err).__name__}: {err}"[:160]
            continue
        calls[name] = lambda options=options: attention_with_options(q, run, options)
        notes[name], times[name] = f"density {selected:.3f}, diff {diff:.1e}", []
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            times[name].append(cuda_ms(fn))
    rows = []
    for name in names:
        t, rounds = median_and_rounds(times.get(name, []))
        rows.append((n, f"attention kernel_options {name}", t, f"{notes[name]}; {rounds}"))
        print(rows[-1], flush=True)
    return rows


def compile_select(q: torch.Tensor, run: StageRun) -> list[Row]:
    """The selection stage eager and under torch.compile (static shapes), on the same inputs."""
    n, cfg = q.shape[2], run.config
    compiled = torch.compile(select_tiles, dynamic=False)
    rows = [(n, "select eager", cuda_ms(run.calls["select"]), "")]
    try:

        def select() -> torch.Tensor:
            return compiled(
                q,
                run.key_p,
                run.perm,
                block_size=cfg.block_size,
                segment_size=cfg.segment_size,
                threshold=cfg.threshold,
                scale=run.scale,
            )

        same = torch.equal(select(), run.tiles)
        rows.append((n, "select, torch.compile(select_tiles)", cuda_ms(select), f"same tiles {same}"))
    except Exception as err:
        rows.append((n, "select compiled", float("nan"), f"failed: {type(err).__name__}: {err}"[:200]))
    print(rows[-1], flush=True)
    return rows


def cuda_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> list[Row]:
    """SDPA cuDNN, an eager flexpbs call (with its host syncs) and the call replayed from a CUDA graph."""
    n = q.shape[2]
    cfg = PBSConfig(backend=backend, min_seq_len=0)

    def call() -> torch.Tensor:
        return flexpbs.attention(q, k, v, config=cfg)

    ref = call()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # the ratio's baseline, in the same run
        rows = [
            (
                n,
                "SDPA cuDNN dense causal",
                cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
                "",
            )
        ]
    rows.append(
        (
            n,
            f"flexpbs eager call, backend={backend}",
            cuda_ms(call),
            f"host syncs per call: {host_syncs(call)}",
        )
    )
    print(rows[-1], flush=True)
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            call()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            static_out = call()
        graph.replay()
        diff = (static_out.float() - ref.float()).abs().max().item()
        rows.append(
            (
                n,
                f"flexpbs in a CUDA graph (replay), backend={backend}",
                cuda_ms(graph.replay),
                f"diff vs eager {diff:.1e}",
            )
        )
    except Exception as err:
        traceback.print_exc()
        rows.append(
            (n, "flexpbs in a CUDA graph", float("nan"), f"capture failed: {type(err).__name__}: {err}"[:200])
        )
    print(rows[-1], flush=True)
    return rows


def chunk_floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[Row]:
    """One call with the default head-chunking floor against one KV head per chunk (floor 0 and a
    budget too small for two heads): time, peak memory beyond the inputs and output, whether the
    tiles are identical and the largest output difference (each chunk runs FlexAttention on fewer
    heads, which may accumulate in another order)."""
    n, rows = q.shape[2], []
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v))
    cfg = PBSConfig(backend="triton", min_seq_len=0)

    def call() -> torch.Tensor:
        return flexpbs.attention(q, k, v, config=cfg)

    ref, ref_stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    default = limits.LIMITS.min_chunk_bytes
    for label, floor in (
        (f"default floor ({default / 2**30:g} GiB)", default),
        ("floor 0 (25% of q/k/v)", 0),
    ):
        with limits.override(min_chunk_bytes=floor):
            chunks = k.shape[1] // kv_heads_per_chunk(q, k, v, cfg.block_size, per_query_head=False)
            out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
            same_tiles = torch.equal(stats.tiles, ref_stats.tiles)
            diff = (out.float() - ref.float()).abs().max().item()
            extra = peak_extra_gib(call) - ref.numel() * ref.element_size() / 2**30
            rows.append(
                (
                    n,
                    f"head chunking, {label}",
                    cuda_ms(call),
                    f"{chunks} chunks, extra beyond q/k/v/out {extra:.3f} GiB = "
                    f"{extra * 2**30 / inputs:.2f}x "
                    f"q/k/v, same tiles {same_tiles}, max diff {diff:.1e}",
                )
            )
        print(rows[-1], flush=True)
    return rows


def band_count(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: StageRun, backend: str) -> list[Row]:
    """Selection and block lists work in row bands: fewer launches (host time) against less work per
    launch (GPU time). The selection alone and the whole call (on ``backend``) at 1/2/4/8 bands, median
    of ROUNDS interleaved rounds."""
    n, counts = q.shape[2], (1, 2, 4, 8)
    cfg = PBSConfig(backend=backend, min_seq_len=0)

    def call() -> torch.Tensor:
        return flexpbs.attention(q, k, v, config=cfg)

    times: dict[tuple[int, str], list[float]] = {(b, what): [] for b in counts for what in ("select", "call")}
    same = {}
    for round_ in range(ROUNDS):
        for bands in counts:
            with limits.override(max_bands=bands):
                if round_ == 0:
                    same[bands] = torch.equal(run.calls["select"](), run.tiles)
                times[bands, "select"].append(cuda_ms(run.calls["select"]))
                times[bands, "call"].append(cuda_ms(call))
    rows = []
    for bands in counts:
        for what, label in (("select", "select alone"), ("call", f"whole call, backend={backend}")):
            t, note = median_and_rounds(times[bands, what])
            note += f"; same tiles {same[bands]}" if what == "select" else ""
            rows.append((n, f"at most {bands} row bands: {label}", t, note))
            print(rows[-1], flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    parser.add_argument(
        "--backend", default="triton", choices=["triton", "flash"], help="for the graph and bands levers"
    )
    parser.add_argument(
        "--options",
        nargs="+",
        default=list(KERNEL_OPTIONS),
        choices=list(KERNEL_OPTIONS),
        help="kernel options compared by the kernel_options lever",
    )


def run(args: argparse.Namespace) -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows: list[Row] = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device="cuda")
        stages = stage_calls(q, k, v, PBSConfig(importance_kernel="triton", backend="triton"))
        if "kernel_options" in args.levers:
            rows += kernel_options(q, stages, args.options)
        if "compile_select" in args.levers:
            rows += compile_select(q, stages)
        if "graph" in args.levers:
            rows += cuda_graph(q, k, v, args.backend)
        if "chunk_floor" in args.levers:
            rows += chunk_floor(q, k, v)
        if "bands" in args.levers:
            rows += band_count(q, k, v, stages, args.backend)
        del q, k, v, stages
        torch.cuda.empty_cache()
    print("\n| N | lever | ms | note |\n|---|---|---|---|")
    for n, name, t, note in rows:
        print(f"| {n} | {name} | {t:.2f} | {note} |")
