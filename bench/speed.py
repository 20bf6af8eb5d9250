"""GPU: flexpbs against what users would run instead, end to end, on the same inputs in one run.

    python -m bench speed                                                    # synthetic, 8K-128K
    python -m bench speed --lengths 262144 524288 --methods flexpbs flexpbs_flash cudnn
    python -m bench speed --workload real --qkv qkv_licenses_8192.pt --layers 3 12 20
    python -m bench speed --densities 0.05 0.1 0.2 0.4 0.8 --lengths 131072
    python -m bench speed --lengths 131072 --seeds 0 1 2 3 --methods flexpbs cudnn
    python -m bench speed --lengths 131072 --target-density 0.22 --methods flexpbs flexpbs_flash cudnn
    python -m bench speed --lengths 131072 --target-density 0.22 --match-density \
        --methods flexpbs antidiagonal flexpbs_flash antidiagonal_flash cudnn       # PBS-Attn+ at 22%

Methods (``--methods``): ``flexpbs`` (``backend="triton"``, with a per-stage breakdown), ``flexpbs_flash``
(``backend="flash"``: FlexAttention's FLASH backend, when flash-attn-4 is importable), ``noperm`` (the same
selector without permutation, ``key_order="original"``), the options beyond the paper end to end (``guard``:
``max_shrink=0.1``; ``guard_last``: with ``exact_last_block=True``; ``last``: PBS with
``exact_last_block=True``; ``noperm_last``: no permutation with ``exact_last_block=True``), PBS-Attn+
(``antidiagonal``, ``antidiagonal_flash``: ``estimator="antidiagonal"`` at its default stride, 32;
``antidiagonal8_flash``, ``antidiagonal16_flash``: strides 8 and 16), ``flex_causal``
(dense compiled FlexAttention), ``cudnn`` and ``fa2`` (SDPA backends, dense causal), ``pbs_attn`` (the
original implementation, when ``pbs_attn`` is importable, e.g. its repository's ``pbs_attn`` folder on
PYTHONPATH; K/V repeated to Hq heads, as it requires). Every flexpbs method runs its sparse path at every
length (``min_seq_len=0``) on the Triton backend unless named otherwise; ``python -m bench breakeven``
measures the defaults.

Times are medians of CUDA-event timings after warm-up (:func:`bench.timing.cuda_ms`). Per method and
length: time, speedups vs cuDNN and FA2, density, TFLOP/s on computed tiles (4 * BS^2 * D flops per
computed tile and head; dense methods count the nb(nb+1)/2 causal tiles), peak memory beyond the inputs,
max abs and relative L2 error vs dense float32 attention on sampled rows. ``--densities`` times the
attention stage alone on random tile sets of fixed density (time against density); ``--target-density``
runs every method end to end at the threshold that gives flexpbs that density on each input (set by
bisection on the selection, reported in the JSON), i.e. the workload's operating point set by density
rather than by threshold; with ``--match-density`` each flexpbs method gets its own threshold for that
density (estimators compared at equal work). ``--seeds`` times several draws of the synthetic workload.
Writes speed.json and speed.png to ``--out`` and prints markdown tables last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexpbs
from flexpbs import PBSConfig
from flexpbs.dispatch import flash_importable
from flexpbs.permutation import identity_permutation
from flexpbs.selection import candidate_tiles, forced_tiles
from flexpbs.sparse_attention import sparse_attention
from flexpbs.tile_grid import cdiv, density

from .checks import sample_rows
from .stages import STAGES, stage_calls, time_stages
from .timing import cuda_ms, peak_extra_gib
from .workloads import real_qkv, synthetic_qkv, synthetic_spec

# flexpbs option sets by method name: the sparse path at every length, on an explicit backend.
PBS_METHODS: dict[str, dict] = {
    "flexpbs": {"backend": "triton"},
    "flexpbs_flash": {"backend": "flash"},
    "noperm": {"key_order": "original", "backend": "triton"},
    "guard": {"max_shrink": 0.1, "backend": "triton"},
    "guard_last": {"max_shrink": 0.1, "exact_last_block": True, "backend": "triton"},
    "last": {"exact_last_block": True, "backend": "triton"},
    "noperm_last": {"key_order": "original", "exact_last_block": True, "backend": "triton"},
    "antidiagonal": {"estimator": "antidiagonal", "backend": "triton"},  # PBS-Attn+
    "antidiagonal_flash": {"estimator": "antidiagonal", "backend": "flash"},
    "antidiagonal8_flash": {"estimator": "antidiagonal", "antidiagonal_stride": 8, "backend": "flash"},
    "antidiagonal16_flash": {"estimator": "antidiagonal", "antidiagonal_stride": 16, "backend": "flash"},
}
STAGE_METHODS = (  # also by stage
    "flexpbs",
    "flexpbs_flash",
    "noperm",
    "antidiagonal",
    "antidiagonal_flash",
    "antidiagonal8_flash",
    "antidiagonal16_flash",
)
METHODS = (*PBS_METHODS, "flex_causal", "cudnn", "fa2", "pbs_attn")
# The dense FlexAttention baseline: the user's own compiled flex_attention, static shapes.
dense_flex = torch.compile(flex_attention, dynamic=False)


class Method(NamedTuple):
    """A method ready to time on one input: its call, the context it runs in, density and extra fields."""

    call: Callable[[], torch.Tensor]
    density: float
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    extra: dict | None = None


def dense_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense causal attention in float32 of ``q [B, Hq, N, D]`` over ``k``/``v [B, Hkv, N, D]`` for the
    query ``rows [R]``: ``[B, Hq, R, Dv]``."""
    group = q.shape[1] // k.shape[1]
    keys = torch.arange(k.shape[2], device=q.device)
    out = []
    for h in range(q.shape[1]):  # one head at a time: [R, N] scores stay small at 512K
        s = q[:, h, rows].float() @ k[:, h // group].float().transpose(-1, -2) * scale
        s = s.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
        out.append(s.softmax(-1) @ v[:, h // group].float())
    return torch.stack(out, dim=1)


def tflops(tiles_per_head: float, heads: int, batch: int, block: int, head_dim: int, ms: float) -> float:
    """TFLOP/s of ``ms`` milliseconds over ``tiles_per_head`` computed tiles per head (4 * block^2 * D
    flops each)."""
    return 4 * block * block * head_dim * tiles_per_head * heads * batch / (ms * 1e-3) / 1e12


def threshold_for_density(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, target: float, steps: int = 14, **options
) -> float:
    """The threshold at which flexpbs (defaults, or ``options``) selects ``target`` of the causal tiles,
    by bisection on the selection stage (density grows with the threshold)."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        tiles = stage_calls(q, k, v, PBSConfig(threshold=mid, **options)).tiles
        lo, hi = (mid, hi) if density(tiles).mean().item() < target else (lo, mid)
    return (lo + hi) / 2


def pbs_method(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PBSConfig, stages: bool) -> Method:
    """flexpbs with ``cfg``: its call, density and sorted-head share, and (``stages``) each stage timed."""
    _, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    extra = {"sorted_heads": stats.sorted_rows.float().mean().item()}
    if stages:
        extra["stages"] = time_stages(q, k, v, cfg)
    return Method(lambda: flexpbs.attention(q, k, v, config=cfg), stats.density.mean().item(), extra=extra)


def dense_method(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Method:
    """A dense causal baseline: ``flex_causal``, ``cudnn`` or ``fa2``."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    if method == "flex_causal":
        causal = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=q.device, _compile=True
        )
        # its graphs per length count against dynamo's recompile limit, which flexpbs's graphs do not touch
        return Method(
            lambda: dense_flex(q, k, v, block_mask=causal, enable_gqa=True),
            1.0,
            torch._dynamo.config.patch(recompile_limit=512),
        )
    if method == "cudnn":
        return Method(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            1.0,
            sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
        )
    # FA2 in SDPA has no GQA: K/V repeated outside the timing
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return Method(
        lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
        1.0,
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
    )


def pbs_attn_method(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: float) -> Method | None:
    """The original PBS-Attn implementation, when importable (it reports no tiles: density NaN)."""
    try:
        from pbs_attn.src.pbs import permuted_block_sparse_attn_fwd
    except ImportError:
        return None
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return Method(
        lambda: permuted_block_sparse_attn_fwd(
            q, kr, vr, block_size=128, segment_size=256, threshold=threshold, causal=True
        ),
        float("nan"),
    )


def run_length(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace, label: str
) -> list[dict]:
    """Every method of ``args.methods`` on one input ``q [B, Hq, N, D]``, ``k``/``v [B, Hkv, N, D]``."""
    b, hq, n, d = q.shape
    scale = d**-0.5
    causal_tiles = cdiv(n, 128) * (cdiv(n, 128) + 1) / 2
    rows = torch.tensor(sample_rows(n, 128, 256, count=args.rows, seed=n), device=q.device)
    want = dense_rows(q, k, v, rows, scale)
    threshold = args.threshold
    if args.target_density:
        threshold = threshold_for_density(q, k, v, args.target_density)
        print(f"{label} N={n}: threshold {threshold:.4f} for density {args.target_density}", flush=True)
    results = []
    for name in args.methods:
        if name == "flexpbs_flash" and not flash_importable():
            print(f"{label} N={n} {name}: flash_attn.cute (flash-attn-4) is not importable, skipped")
            continue
        if name in PBS_METHODS:
            own = threshold
            if args.target_density and args.match_density:  # each method at the density, not the threshold
                selection = {key: val for key, val in PBS_METHODS[name].items() if key != "backend"}
                own = threshold_for_density(q, k, v, args.target_density, **selection)
                print(f"{label} N={n} {name}: threshold {own:.4f}", flush=True)
            cfg = PBSConfig(threshold=own, min_seq_len=0, **PBS_METHODS[name])
            method = pbs_method(q, k, v, cfg, stages=name in STAGE_METHODS and not args.no_stages)
        elif name == "pbs_attn":
            method = pbs_attn_method(q, k, v, threshold)
            if method is None:
                print(f"{label} N={n} pbs_attn: the original PBS-Attn package is not importable, skipped")
                continue
        else:
            method = dense_method(name, q, k, v)
        try:
            with method.context:
                out = method.call()
                got = out[:, :, rows].float()
                del out
                t = cuda_ms(method.call)
                mem = peak_extra_gib(method.call)
        except torch.OutOfMemoryError:
            print(f"{label} N={n} {name}: out of memory, skipped", flush=True)
            torch.cuda.empty_cache()
            continue
        except Exception as err:  # the original PBS-Attn's own Triton kernel: report, do not stop the run
            if name != "pbs_attn":
                raise
            print(f"{label} N={n} pbs_attn failed: {type(err).__name__}: {err}"[:500], flush=True)
            continue
        r = dict(
            workload=label,
            n=n,
            method=name,
            ms=t,
            density=method.density,
            threshold=own if name in PBS_METHODS else threshold,
            max_err=(got - want).abs().max().item(),
            rel_err=((got - want).norm() / want.norm()).item(),
            peak_extra_gib=mem,
            tflops=tflops(method.density * causal_tiles, hq, b, 128, d, t),
            **(method.extra or {}),
        )
        results.append(r)
        print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()}, flush=True)
    return results


def fixed_density(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, densities: list[float]) -> list[dict]:
    """The attention stage alone (Triton backend) on random tile sets: forced tiles plus random candidates."""
    b, hq, n, d = q.shape
    perm = identity_permutation(b, k.shape[1], n, q.device)
    nb = cdiv(n, 128)
    candidates = candidate_tiles(nb, 128, 256, q.device)
    forced = forced_tiles(perm, 128, 256).repeat_interleave(hq // k.shape[1], dim=1)
    gen = torch.Generator(device=q.device).manual_seed(0)
    rows = []
    for target in densities:
        extra = target * nb * (nb + 1) / 2 - forced[0, 0].sum().item()
        p = max(0.0, extra / candidates.sum().item())
        tiles = forced | (candidates & (torch.rand(b, hq, nb, nb, device=q.device, generator=gen) < p))
        got = density(tiles).mean().item()
        t = cuda_ms(
            lambda tiles=tiles: sparse_attention(
                q, k, v, tiles, perm, block_size=128, segment_size=256, scale=d**-0.5
            )
        )
        rows.append(dict(n=n, density=got, ms=t, tflops=tflops(got * nb * (nb + 1) / 2, hq, b, 128, d, t)))
        print(rows[-1], flush=True)
    return rows


def plot(results: list[dict], fixed: list[dict], out: Path) -> None:
    """speed.png: time against length per method (synthetic rows) and, with ``fixed``, against density."""
    from matplotlib.figure import Figure  # figures for files: no pyplot state, no GUI backend

    fig = Figure(figsize=(12 if fixed else 6, 4.5))
    axes = fig.subplots(1, 2 if fixed else 1, squeeze=False)
    ax = axes[0, 0]
    synthetic = [r for r in results if r["workload"] == "synthetic"]
    for method in dict.fromkeys(r["method"] for r in synthetic):
        pts = sorted((r["n"], r["ms"]) for r in synthetic if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(
        xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)", title="synthetic workload"
    )
    ax.legend()
    if fixed:
        ax = axes[0, 1]
        for n in dict.fromkeys(r["n"] for r in fixed):
            pts = [r for r in fixed if r["n"] == n]
            ax.plot([r["density"] for r in pts], [r["ms"] for r in pts], marker="o", label=f"N={n}")
        ax.set(xlabel="density of causal tiles", ylabel="attention stage ms", title="time against density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)


def table(results: list[dict]) -> str:
    """Markdown tables of ``results``: one row per method and length, then the stage breakdowns."""
    lines = [
        "| workload | N | method | ms | vs cuDNN | vs FA2 | density | TFLOP/s | peak extra GiB "
        "| max err | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = {m["method"]: m["ms"] for m in results if m["n"] == r["n"] and m["workload"] == r["workload"]}
        vs = {m: f"{base[m] / r['ms']:.2f}x" if m in base else "-" for m in ("cudnn", "fa2")}
        lines.append(
            f"| {r['workload']} | {r['n']} | {r['method']} | {r['ms']:.2f} | {vs['cudnn']} | {vs['fa2']} | "
            f"{r['density']:.3f} | {r['tflops']:.0f} | {r['peak_extra_gib']:.2f} | {r['max_err']:.1e} | "
            f"{r['rel_err']:.1e} |"
        )
    stage_rows = [r for r in results if "stages" in r]
    if stage_rows:
        lines += [
            "",
            "| workload | N | method | " + " | ".join(STAGES) + " | non-attention % of cuDNN |",
            "|---|---|---|" + "---|" * (len(STAGES) + 1),
        ]
        for r in stage_rows:
            st = r["stages"]
            cudnn = next(
                (
                    m["ms"]
                    for m in results
                    if m["n"] == r["n"] and m["method"] == "cudnn" and m["workload"] == r["workload"]
                ),
                None,
            )
            overhead = sum(st.get(s, 0.0) for s in STAGES[:4])
            pct = f"{100 * overhead / cudnn:.1f}%" if cudnn else "-"
            lines.append(
                f"| {r['workload']} | {r['n']} | {r['method']} | "
                + " | ".join(f"{st[s]:.2f}" if s in st else "-" for s in STAGES)
                + f" | {pct} |"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument(
        "--target-density",
        type=float,
        default=None,
        help="instead of --threshold: the threshold at which flexpbs selects this density, per input",
    )
    parser.add_argument(
        "--match-density",
        action="store_true",
        help="with --target-density: bisect the threshold of each flexpbs method, not of flexpbs only",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["flexpbs", "flexpbs_flash", "noperm", "flex_causal", "cudnn", "fa2", "pbs_attn"],
    )
    parser.add_argument("--workload", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--qkv", help="q/k/v captured by `python -m bench quality run` (--workload real)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12])
    parser.add_argument("--densities", type=float, nargs="*", default=[], help="fixed-density mode")
    parser.add_argument("--rows", type=int, default=64, help="random query rows checked against dense")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="synthetic draws per length (rows of seed s > 0 are labelled 'synthetic s<s>')",
    )
    parser.add_argument(
        "--spec",
        nargs="*",
        default=[],
        metavar="KNOB=VALUE",
        help="synthetic workload knobs other than the defaults (bench.workloads.Synthetic)",
    )
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    results, fixed = [], []
    if args.workload == "real":
        for layer in args.layers:
            results += run_length(*real_qkv(args.qkv, layer, device="cuda"), args, f"real L{layer}")
    else:
        spec = synthetic_spec(args.spec)
        for n in args.lengths:
            for seed in args.seeds:
                qkv = synthetic_qkv(
                    args.batch,
                    args.q_heads,
                    args.kv_heads,
                    n,
                    args.head_dim,
                    device="cuda",
                    seed=seed,
                    spec=spec,
                )
                if args.densities:
                    fixed += fixed_density(*qkv, args.densities)
                else:
                    results += run_length(*qkv, args, "synthetic" if seed == 0 else f"synthetic s{seed}")
                del qkv
                torch.cuda.empty_cache()
    (args.out / "speed.json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "results": results, "fixed_density": fixed},
            indent=1,
        )
    )
    plot(results, fixed, args.out)
    print()
    if results:
        print(table(results))
    if fixed:
        print("\n| N | density | attention ms | TFLOP/s |\n|---|---|---|---|")
        for r in fixed:
            print(f"| {r['n']} | {r['density']:.3f} | {r['ms']:.2f} | {r['tflops']:.0f} |")
