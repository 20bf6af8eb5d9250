"""GPU benchmark: flexpbs against what users would run instead, on the same inputs in one run.

    PYTHONPATH=$PWD python bench/attention.py                                   # synthetic, 8K-128K
    PYTHONPATH=$PWD python bench/attention.py --lengths 262144 524288 --methods flexpbs cudnn
    PYTHONPATH=$PWD python bench/attention.py --workload real --qkv qkv_licenses_8192.pt --layers 3 12 20
    PYTHONPATH=$PWD python bench/attention.py --densities 0.05 0.1 0.2 0.4 0.8 --lengths 131072
    PYTHONPATH=$PWD python bench/attention.py --lengths 131072 --seeds 0 1 2 3 --methods flexpbs cudnn
    PYTHONPATH=$PWD python bench/attention.py --lengths 131072 --target-density 0.22 --methods flexpbs cudnn

Methods (``--methods``): ``flexpbs`` (with a per-stage breakdown), ``flexpbs_flash`` (``backend="flash"``:
FlexAttention's FLASH backend, when flash-attn-4 is importable), ``noperm`` (the same selector
without permutation), the options beyond the paper end to end (``guard``: ``max_shrink=0.1``;
``guard_last``: with ``exact_last_block=True``; ``last``: PBS with ``exact_last_block=True``;
``noperm_last``: no permutation with ``exact_last_block=True``), ``flex_causal`` (dense compiled FlexAttention), ``cudnn`` and ``fa2`` (SDPA
backends, dense causal), ``pbs_attn`` (the original implementation, when ``pbs_attn`` is importable,
e.g. its repository's ``pbs_attn`` folder on PYTHONPATH; K/V repeated to Hq heads, as it requires).
Times are medians of CUDA-event timings after warm-up (``triton.testing.do_bench``). Per method and
length: time, speedups vs cuDNN and FA2, density, TFLOP/s on computed tiles (4 * BS^2 * D flops per
computed tile and head; dense methods count the nb(nb+1)/2 causal tiles), peak memory beyond the
inputs, max abs and relative L2 error vs dense float32 attention on sampled rows. ``--densities`` times the attention
stage alone on random tile sets of fixed density (time against density); ``--target-density`` runs
every method end to end at the threshold that gives flexpbs that density on each input (set by
bisection, reported in the JSON), i.e. the workload's operating point set by density rather than by
threshold. ``--seeds`` times several draws of the synthetic workload. Writes JSON and PNG plots
to ``--out`` and prints markdown tables last.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask
from triton.testing import do_bench

import flexpbs
from flexpbs import PBSConfig
from flexpbs.permutation import identity_permutation
from flexpbs.selection import candidate_tiles, forced_tiles
from flexpbs.sparse_attention import _compiled_flex_attention, _flash_available, sparse_attention
from checks import sample_rows
from stages import stage_calls
from workloads import real_qkv, synthetic_qkv, synthetic_spec

DEV = torch.device("cuda")
DENSE = ("flex_causal", "cudnn", "fa2")
# flexpbs option sets by method name; flexpbs, flexpbs_flash and noperm also get a per-stage breakdown.
PBS_METHODS: dict[str, dict] = {
    "flexpbs": {},
    "flexpbs_flash": {"backend": "flash"},
    "noperm": {"key_order": "original"},
    "guard": {"max_shrink": 0.1},
    "guard_last": {"max_shrink": 0.1, "exact_last_block": True},
    "last": {"exact_last_block": True},
    "noperm_last": {"key_order": "original", "exact_last_block": True},
}


def ms(fn) -> float:
    """Median milliseconds of ``fn()``. do_bench sizes its repetitions to a time budget, which is a
    single call for calls over 100 ms (a median of one): long calls get 3 to 10 repetitions."""
    t = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if t > 10:
        reps = min(10, max(3, int(5000 / t)))
        t = do_bench(fn, warmup=2 * t, rep=reps * t, return_mode="median")
    return t


def peak_extra_gib(fn) -> float:
    """Peak memory allocated during ``fn()`` beyond what was allocated before (its output included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def dense_rows(q, k, v, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention in float32 for the given query rows: ``[B, Hq, len(rows), Dv]``."""
    group = q.shape[1] // k.shape[1]
    out = []
    for h in range(q.shape[1]):  # one head at a time: [rows, N] scores stay small at 512K
        s = q[:, h, rows].float() @ k[:, h // group].float().transpose(-1, -2) * scale
        keys = torch.arange(k.shape[2], device=DEV)
        s = s.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
        out.append(s.softmax(-1) @ v[:, h // group].float())
    return torch.stack(out, dim=1)


def flexpbs_stages(q, k, v, cfg: PBSConfig) -> dict:
    """Each stage of the eager pipeline (``stages.stage_calls``), timed; attn = mask+attn - mask."""
    times = {name: ms(fn) for name, fn in stage_calls(q, k, v, cfg).items()}
    times["attn"] = times["mask+attn"] - times["mask"]
    return times


def tflops(tiles_per_head: float, heads: int, batch: int, block: int, head_dim: int, ms_: float) -> float:
    return 4 * block * block * head_dim * tiles_per_head * heads * batch / (ms_ * 1e-3) / 1e12


def threshold_for_density(q, k, v, target: float, steps: int = 14) -> float:
    """The threshold at which flexpbs (defaults otherwise) selects ``target`` of the causal tiles,
    by bisection (density grows with the threshold): sets a workload's operating point by density."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        _, stats = flexpbs.attention(q, k, v, threshold=mid, return_stats=True)
        lo, hi = (mid, hi) if stats.density.mean().item() < target else (lo, mid)
    return (lo + hi) / 2


def run_length(q, k, v, args, label: str) -> list[dict]:
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5
    nb = -(-n // 128)
    causal_tiles = nb * (nb + 1) / 2
    rows = torch.tensor(sample_rows(n, 128, 256, count=args.rows, seed=n), device=DEV)
    want = dense_rows(q, k, v, rows, scale)
    results = []
    threshold = args.threshold
    if args.target_density:
        threshold = threshold_for_density(q, k, v, args.target_density)
        print(f"{label} N={n}: threshold {threshold:.4f} for density {args.target_density}", flush=True)

    def record(method: str, fn, density: float, extra: dict | None = None) -> None:
        try:
            out = fn()
            got = out[:, :, rows].float()
            err = (got - want).abs().max().item()
            rel = ((got - want).norm() / want.norm()).item()
            del out, got
            t = ms(fn)
            mem = peak_extra_gib(fn)
        except torch.OutOfMemoryError:
            print(f"{label} N={n} {method}: out of memory, skipped", flush=True)
            torch.cuda.empty_cache()
            return
        r = dict(workload=label, n=n, method=method, ms=t, density=density, threshold=threshold, max_err=err, rel_err=rel,
                 peak_extra_gib=mem,
                 tflops=tflops(density * causal_tiles, hq, b, 128, d, t), **(extra or {}))
        results.append(r)
        print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}, flush=True)

    for method in args.methods:
        if method in PBS_METHODS:
            cfg = PBSConfig(threshold=threshold, **PBS_METHODS[method])
            if cfg.backend == "flash" and not _flash_available():
                print(f"{label} N={n} {method}: flash_attn.cute (flash-attn-4) is not importable, skipped")
                continue
            _, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
            density = stats.density.mean().item()
            extra = {"sorted_heads": stats.sorted_rows.float().mean().item()}
            if method in ("flexpbs", "flexpbs_flash", "noperm") and not args.no_stages:
                extra["stages"] = flexpbs_stages(q, k, v, cfg)
            record(method, lambda: flexpbs.attention(q, k, v, config=cfg), density, extra)
        elif method == "flex_causal":
            causal = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=DEV, _compile=True)
            with torch._dynamo.config.patch(recompile_limit=512):  # the limit is shared with flexpbs's graphs
                record(method, lambda: _compiled_flex_attention(q, k, v, block_mask=causal, scale=scale,
                                                                 enable_gqa=True), 1.0)
        elif method == "cudnn":
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                record(method, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1.0)
        elif method == "fa2":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FA2 in SDPA has no GQA: repeat K/V outside the timing
                kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                record(method, lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), 1.0)
                del kr, vr
        elif method == "pbs_attn":
            try:
                from pbs_attn.src.pbs import permuted_block_sparse_attn_fwd
            except ImportError:
                print(f"{label} N={n} pbs_attn: the original PBS-Attn package is not importable, skipped")
                continue
            kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            try:  # its own Triton kernel: report a failure instead of stopping the run
                record(method, lambda: permuted_block_sparse_attn_fwd(
                    q, kr, vr, block_size=128, segment_size=256, threshold=threshold, causal=True),
                    float("nan"))
            except Exception as e:  # noqa: BLE001
                print(f"{label} N={n} pbs_attn failed: {type(e).__name__}: {e}"[:500], flush=True)
            del kr, vr
    return results


def fixed_density(q, k, v, densities: list[float], kernel_options: dict | None) -> list[dict]:
    """Attention stage alone on random tile sets: forced tiles plus random candidates."""
    b, hq, n, d = q.shape
    scale = d**-0.5
    perm = identity_permutation(b, k.shape[1], n, DEV)
    nb = -(-n // 128)
    cand = candidate_tiles(nb, 128, 256, DEV)
    forced = forced_tiles(perm, 128, 256).repeat_interleave(hq // k.shape[1], dim=1)
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for target in densities:
        extra = target * nb * (nb + 1) / 2 - forced[0, 0].sum().item()
        p = max(0.0, extra / cand.sum().item())
        tiles = forced | (cand & (torch.rand(b, hq, nb, nb, device=DEV, generator=gen) < p))
        density = tiles.float().sum().item() / (b * hq * nb * (nb + 1) / 2)
        t = ms(lambda: sparse_attention(q, k, v, tiles, perm, block_size=128, segment_size=256, scale=scale, kernel_options=kernel_options))
        rows.append(dict(n=n, density=density, ms=t, tflops=tflops(density * nb * (nb + 1) / 2, hq, b, 128, d, t)))
        print(rows[-1], flush=True)
    return rows


def host_syncs(fn) -> int:
    """Device-to-host synchronisations during ``fn()`` (CUDA sync debug mode warnings)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def plot(results: list[dict], fixed: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if fixed else 1, figsize=(12 if fixed else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    synthetic = [r for r in results if r["workload"] == "synthetic"]
    for method in dict.fromkeys(r["method"] for r in synthetic):
        pts = sorted((r["n"], r["ms"]) for r in synthetic if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)", title="synthetic workload")
    ax.legend()
    if fixed:
        ax = axes[0, 1]
        for n in dict.fromkeys(r["n"] for r in fixed):
            pts = [r for r in fixed if r["n"] == n]
            ax.plot([r["density"] for r in pts], [r["ms"] for r in pts], marker="o", label=f"N={n}")
        ax.set(xlabel="density of causal tiles", ylabel="attention stage ms", title="time against density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=120)


def table(results: list[dict]) -> str:
    lines = ["| workload | N | method | ms | vs cuDNN | vs FA2 | density | TFLOP/s | peak extra GiB | max err | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = {m["method"]: m["ms"] for m in results if m["n"] == r["n"] and m["workload"] == r["workload"]}
        vs = lambda m: f"{base[m] / r['ms']:.2f}x" if m in base else "-"  # noqa: E731
        lines.append(f"| {r['workload']} | {r['n']} | {r['method']} | {r['ms']:.2f} | {vs('cudnn')} | {vs('fa2')} | "
                     f"{r['density']:.3f} | {r['tflops']:.0f} | {r['peak_extra_gib']:.2f} | {r['max_err']:.1e} | "
                     f"{r['rel_err']:.1e} |")
    stage_rows = [r for r in results if "stages" in r]
    if stage_rows:
        names = ["importance", "permute", "select", "mask", "attn"]
        lines += ["", "| workload | N | method | " + " | ".join(names) + " | non-attention % of cuDNN |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for r in stage_rows:
            st = r["stages"]
            cudnn = next((m["ms"] for m in results if m["n"] == r["n"] and m["method"] == "cudnn"
                          and m["workload"] == r["workload"]), None)
            overhead = sum(st.get(s, 0.0) for s in names[:4])
            pct = f"{100 * overhead / cudnn:.1f}%" if cudnn else "-"
            lines.append(f"| {r['workload']} | {r['n']} | {r['method']} | "
                         + " | ".join(f"{st[s]:.2f}" if s in st else "-" for s in names) + f" | {pct} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--target-density", type=float, default=None,
                        help="instead of --threshold: the threshold at which flexpbs selects this density, per input")
    parser.add_argument("--methods", nargs="+",
                        default=["flexpbs", "flexpbs_flash", "noperm", "flex_causal", "cudnn", "fa2", "pbs_attn"])
    parser.add_argument("--workload", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--qkv", help="q/k/v captured by bench/quality.py (--workload real)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12])
    parser.add_argument("--densities", type=float, nargs="*", default=[], help="fixed-density mode")
    parser.add_argument("--rows", type=int, default=64, help="random query rows checked against dense")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="synthetic draws per length (rows of seed s > 0 are labelled 'synthetic s<s>')")
    parser.add_argument("--spec", nargs="*", default=[], metavar="KNOB=VALUE",
                        help="synthetic workload knobs other than the defaults (workloads.Synthetic)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    results, fixed = [], []
    if args.workload == "real":
        for layer in args.layers:
            q, k, v = real_qkv(args.qkv, layer, device=DEV)
            results += run_length(q, k, v, args, f"real L{layer}")
    else:
        spec = synthetic_spec(args.spec)
        for n in args.lengths:
            for seed in args.seeds:
                q, k, v = synthetic_qkv(args.batch, args.q_heads, args.kv_heads, n, args.head_dim, device=DEV,
                                        seed=seed, spec=spec)
                if args.densities:
                    fixed += fixed_density(q, k, v, args.densities, None)
                else:
                    results += run_length(q, k, v, args, "synthetic" if seed == 0 else f"synthetic s{seed}")
                del q, k, v
                torch.cuda.empty_cache()
    (args.out / "attention.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                         "results": results, "fixed_density": fixed}, indent=1))
    plot(results, fixed, args.out)
    print()
    if results:
        print(table(results))
    if fixed:
        print("\n| N | density | attention ms | TFLOP/s |\n|---|---|---|---|")
        for r in fixed:
            print(f"| {r['n']} | {r['density']:.3f} | {r['ms']:.2f} | {r['tflops']:.0f} |")


if __name__ == "__main__":
    main()
