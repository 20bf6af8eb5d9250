"""Robustness at scale on the GPU: peak memory, int32 overflow, determinism, numerics.

    python -m bench robustness                                     # H100/H200, all sections
    python -m bench robustness --sections memory --memory-lengths 32768 131072 524288
    python -m bench robustness --cpu-smoke                         # tiny sizes, any machine

Sections (B=1, Hq=32, Hkv=8, D=128, bf16, threshold 0.9 unless stated):
  memory       peak device memory of one call and of each stage (every head chunk), beyond q/k/v; the
               output; the ratio of the extra beyond q/k/v/output to the q/k/v bytes (goal <= 0.25). A size
               that runs out of memory prints a line and is skipped.
  int32        shapes whose q holds >= 2^31 elements (B > 1: element offsets >= 2^31 even inside one head
               chunk of the pipeline): sampled rows (first, last, middle, block and segment boundaries,
               last batch and head) against a float32 attention over the keys the reported tiles give
               them; plus the selection against flexpbs.reference at a small N.
  determinism  three calls on the same inputs: bitwise-identical output, block mask, permutation, density;
               a sha256 of them to compare between processes (the inputs come from seeded generators).
  numerics     large magnitudes (x1e3), outlier channels, sinks, float16 logits beyond float16's range:
               finite outputs, sampled rows within the stated tolerance; non-finite inputs: the contract.
Prints a line per check, then a markdown table of every check. flexpbs runs its sparse path at every
length (``min_seq_len=0``) on the backend it picks. Inputs: :func:`bench.workloads.stress_qkv`; checks:
:mod:`bench.checks`; per-stage memory: :mod:`bench.memory_model`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import time

import torch

import flexpbs
from flexpbs import PBSConfig

from .checks import check_against_reference, check_rows, check_stats, finite_tile_rows, sample_rows
from .memory_model import StageProbe, census, stage_probe
from .workloads import stress_qkv

GiB = 2**30
CONFIG = PBSConfig(threshold=0.9, min_seq_len=0)  # the sparse path at every length
RESULTS: list[tuple[str, str, str]] = []  # (section, case, result) for the final table


def report(section: str, case: str, result: str) -> None:
    """Prints one check and keeps it for the final table."""
    print(f"[{section}] {case}: {result}", flush=True)
    RESULTS.append((section, case, result))


def free() -> None:
    """Releases what the previous check held (Python references, then cached device memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- memory -------------------------------------------------------------------------------------


def section_memory(args: argparse.Namespace, dev: torch.device) -> None:
    """Peak memory of one call and of each stage beyond q/k/v (meta-device census on the CPU)."""
    b, hq, hkv, d = 1, 32, 8, 128
    cfg = CONFIG
    for n in args.memory_lengths:
        free()
        try:
            qkv = b * n * d * (hq + 2 * hkv) * 2
            out_bytes = b * hq * n * d * 2
            if dev.type == "cuda":
                q, k, v = stress_qkv(b, hq, hkv, n, d, torch.bfloat16, dev, seed=0)
                flexpbs.attention(q, k, v, config=cfg)  # warm: compiled graph, caches
                free()
                probe = StageProbe(
                    torch.cuda.memory_allocated,
                    torch.cuda.max_memory_allocated,
                    torch.cuda.reset_peak_memory_stats,
                )
                with stage_probe(probe):
                    flexpbs.attention(q, k, v, config=cfg)
                peak, stages, how = probe.whole_call_peak(), probe.stages, "measured"
            else:  # no device counters: count on the meta device instead
                stages, peak, _ = census(b, hq, hkv, n, d, torch.bfloat16, "shared", importance="torch")
                how = "meta-device census"
            extra = peak - out_bytes
            report(
                "memory",
                f"N={n} one call ({how})",
                f"q/k/v {qkv / GiB:.2f} GiB, output {out_bytes / GiB:.2f} GiB, peak beyond q/k/v "
                f"{peak / GiB:.3f} GiB, extra beyond q/k/v/output {extra / GiB:.3f} GiB = "
                f"{extra / qkv:.2f} x "
                "q/k/v bytes (goal <= 0.25)",
            )
            for label, row in stages.items():
                report(
                    "memory",
                    f"N={n} stage {label} ({row['calls']} calls)",
                    f"peak beyond q/k/v {row['peak'] / GiB:.3f} GiB, live after {row['after'] / GiB:.3f} GiB",
                )
        except torch.OutOfMemoryError as err:
            report("memory", f"N={n}", f"out of memory, skipped ({str(err).splitlines()[0][:120]})")
        finally:
            q = k = v = None
            free()


# --- int32 overflow -----------------------------------------------------------------------------


def section_int32(args: argparse.Namespace, dev: torch.device) -> None:
    """Shapes whose q passes 2^31 elements: sampled rows against float32 attention over the reported tiles."""
    small = args.small_n
    cfg = CONFIG
    q, k, v = stress_qkv(1, 8, 2, small, 64, torch.float32, dev, seed=1)
    _, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    same = check_against_reference(q, k, stats, cfg)
    report(
        "int32",
        f"selection vs flexpbs.reference, N={small}, B=1 Hq=8 Hkv=2 D=64 fp32",
        f"permutation {'same' if same['permutation'] else 'DIFFERENT'} (up to ties), "
        f"selection {'same' if same['selection'] else 'DIFFERENT'}",
    )
    for shape in args.int32_shapes:
        b, hq, hkv, n, d = shape
        free()
        label = (
            f"B={b} Hq={hq} Hkv={hkv} N={n} D={d} bf16 (q: {b * hq * n * d / 2**31:.2f} x 2^31 elements, "
            f"last batch starts at {(b - 1) * hq * n * d / 2**31:.2f} x 2^31)"
        )
        try:
            q, k, v = stress_qkv(b, hq, hkv, n, d, torch.bfloat16, dev, seed=2)
            start = time.perf_counter()
            out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            check_stats(stats, n, cfg)
            rows = sample_rows(n, cfg.block_size, cfg.segment_size)
            heads = sorted({(0, 0), (0, hq - 1), (b - 1, hq // 2), (b - 1, hq - 1)})
            res = check_rows(q, k, v, out, stats, cfg, heads, rows)
            finite = bool(out.isfinite().all())
            verdict = "PASS" if res["bad"] == 0 and finite else "FAIL"
            report(
                "int32",
                label,
                f"{verdict}: {res['rows']} sampled rows, {res['bad']} outside tolerance, worst "
                f"error/tolerance {res['worst']:.3f}, all finite {finite}, density "
                f"{stats.density.mean():.3f}, "
                f"first call {seconds:.1f} s (compile included)",
            )
            del out, stats
        except torch.OutOfMemoryError as err:
            report("int32", label, f"out of memory, skipped ({str(err).splitlines()[0][:120]})")
        finally:
            q = k = v = None
            free()


# --- determinism --------------------------------------------------------------------------------


def fingerprint(*tensors: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the tensors' bytes (inputs come from seeded generators)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def section_determinism(args: argparse.Namespace, dev: torch.device) -> None:
    """Three calls on the same inputs: bitwise-identical outputs and stats, and their fingerprint."""
    for n, gqa, dtype in [
        (args.det_n, "shared", torch.bfloat16),
        (args.det_n, "per_head", torch.bfloat16),
        (args.det_n + 777, "shared", torch.float16),
    ]:
        q, k, v = stress_qkv(
            1, args.det_heads, args.det_heads // 4, n, 128 if dev.type == "cuda" else 64, dtype, dev, seed=3
        )
        runs = [
            flexpbs.attention(q, k, v, threshold=0.9, gqa=gqa, min_seq_len=0, return_stats=True)
            for _ in range(3)
        ]
        (o1, s1) = runs[0]
        same = all(
            torch.equal(o1, o)
            and torch.equal(s1.tiles, s.tiles)
            and torch.equal(s1.key_positions, s.key_positions)
            and torch.equal(s1.density, s.density)
            for o, s in runs[1:]
        )
        digest = fingerprint(o1, s1.tiles, s1.key_positions, s1.density)
        report(
            "determinism",
            f"N={n} {gqa} {str(dtype)[6:]}, 3 calls",
            f"{'bitwise identical' if same else 'DIFFERENT'} output, block mask, permutation, density; "
            f"sha256 {digest} (compare across processes on one machine)",
        )
        del runs, q, k, v
        free()


# --- numerics -----------------------------------------------------------------------------------


def section_numerics(args: argparse.Namespace, dev: torch.device) -> None:
    """Large magnitudes, outlier channels, sinks and non-finite inputs, against the stated tolerance and
    the non-finite input contract."""
    n, b, hq, hkv, d = args.num_n, 1, 8, 2, 128 if dev.type == "cuda" else 64
    cases = [
        ("bf16 x1", torch.bfloat16, 1.0, 0, 1.0),
        ("bf16 x1e3", torch.bfloat16, 1e3, 0, 1.0),
        ("bf16 x1e3, 4 outlier channels x50", torch.bfloat16, 1e3, 4, 50.0),
        ("fp32 x1e3, 4 outlier channels x50", torch.float32, 1e3, 4, 50.0),
        ("fp16 x1", torch.float16, 1.0, 0, 1.0),
        ("fp16 x100 (logits beyond fp16 range)", torch.float16, 100.0, 0, 1.0),
        ("fp16 x30, 2 outlier channels x8", torch.float16, 30.0, 2, 8.0),
    ]
    cfg = CONFIG
    rows = sample_rows(n, cfg.block_size, cfg.segment_size, count=64)
    heads = [(0, h) for h in range(hq)]
    for name, dtype, magnitude, outliers, gain in cases:
        q, k, v = stress_qkv(
            b, hq, hkv, n, d, dtype, dev, seed=4, magnitude=magnitude, outliers=outliers, outlier_gain=gain
        )
        logit_max = max(
            (q[0, h, rows].float() @ k[0, h // (hq // hkv)].float().T).abs().max().item() for h in (0, hq - 1)
        )  # over the sampled rows: no [N, N] product
        out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        check_stats(stats, n, cfg)
        res = check_rows(q, k, v, out, stats, cfg, heads, rows)
        finite = bool(out.isfinite().all())
        verdict = "PASS" if res["bad"] == 0 and finite else "FAIL"
        report(
            "numerics",
            f"{name}, N={n}",
            f"{verdict}: all finite {finite}, {res['rows']} rows, worst "
            f"error/tolerance {res['worst']:.3f}, largest abs q.k {logit_max:.3g}",
        )
    # attention sink: token 0 takes almost all the mass of every row
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = stress_qkv(b, hq, hkv, n, d, dtype, dev, seed=5)
        direction = torch.nn.functional.normalize(torch.randn(d, device=dev), dim=0)
        q = (0.1 * q.float() + 4.0 * direction).to(dtype)
        k = (0.1 * k.float()).to(dtype)
        k[:, :, 0] = (direction * 1e3 * d**0.5 / 4.0).to(dtype)  # logit ~1e3 for every query
        out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        check_stats(stats, n, cfg)
        v0 = v[:, :, :1].float().repeat_interleave(hq // hkv, dim=1)
        err = (out.float() - v0).abs().max().item()
        res = check_rows(q, k, v, out, stats, cfg, heads, rows)
        ok = res["bad"] == 0 and err <= 3e-2 * v.float().abs().max().item()
        report(
            "numerics",
            f"sink, near-one-hot rows, {str(dtype)[6:]}, N={n}",
            f"{'PASS' if ok else 'FAIL'}: largest abs(out - v[0]) {err:.2e}, worst "
            f"error/tolerance {res['worst']:.3f}",
        )
    # non-finite inputs: the documented contract
    q, k, v = stress_qkv(b, hq, hkv, n, d, torch.bfloat16, dev, seed=6)
    clean, clean_stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    for target, value in (
        ("key", float("nan")),
        ("value", float("nan")),
        ("query", float("nan")),
        ("key", float("inf")),
    ):
        x = {"query": q, "key": k, "value": v}
        bad = x[target].clone()
        bad[0, 0, n // 3, 5] = value
        x[target] = bad
        out, stats = flexpbs.attention(x["query"], x["key"], x["value"], config=cfg, return_stats=True)
        check_stats(stats, n, cfg)
        group = hq // hkv
        others_same = torch.equal(out[:, group:], clean[:, group:]) and torch.equal(
            stats.tiles[:, group:], clean_stats.tiles[:, group:]
        )
        exact = finite_tile_rows(x["query"], x["key"], x["value"], stats, cfg.block_size)
        affected_heads = [(0, h) for h in range(group)]
        rows_of = {bh: [i for i in rows if exact[bh[0], bh[1], i]] for bh in affected_heads}
        res = check_rows(x["query"], x["key"], x["value"], out, stats, cfg, affected_heads, rows_of=rows_of)
        nonfinite_rows = int((~out.isfinite()).any(-1).sum())
        unexpected = int((~out.isfinite()).any(-1)[exact].sum())
        bad_row = out[0, 0, n // 3].float()
        ok = others_same and res["bad"] == 0 and unexpected == 0
        report(
            "numerics",
            f"{value} in {target} (batch 0, KV head 0, row {n // 3})",
            f"{'PASS' if ok else 'FAIL'}: other KV groups bitwise unchanged {others_same}; "
            f"{res['rows']} sampled "
            f"finite-tile rows of KV group 0 within tolerance: {res['bad'] == 0}; "
            f"{nonfinite_rows} non-finite output rows, {unexpected} of them finite-tile rows; "
            f"row {n // 3} of "
            f"head 0 -> {'nan' if bad_row.isnan().any() else 'inf' if bad_row.isinf().any() else 'finite'}",
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["memory", "int32", "determinism", "numerics"],
        choices=["memory", "int32", "determinism", "numerics"],
    )
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument(
        "--int32-shapes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        nargs="+",
        default=[
            (1, 32, 8, 524288, 128),
            (2, 32, 8, 524288, 128),
            (4, 32, 8, 131072, 128),
            (1, 32, 8, 786432, 128),
            (1, 32, 8, 1048576, 128),
        ],
        help="B,Hq,Hkv,N,D tuples; q with >= 2^31 elements tests 64-bit offsets (with B > 1 also "
        "inside one head chunk, whose batch stride is Hq*N*D)",
    )
    parser.add_argument("--small-n", type=int, default=4096)
    parser.add_argument("--det-n", type=int, default=131072)
    parser.add_argument("--det-heads", type=int, default=32)
    parser.add_argument("--num-n", type=int, default=32768)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the subcommand runs)"
    )


def run(args: argparse.Namespace) -> None:
    if args.cpu_smoke:
        dev = torch.device("cpu")
        args.int32_shapes = [(2, 4, 2, 1500, 64)]
        args.small_n, args.det_n, args.det_heads, args.num_n = 1100, 1024, 4, 1024
        args.memory_lengths = [4096]
        print("cpu smoke run: tiny sizes; memory counted on the meta device")
    else:
        dev = torch.device("cuda")
        print(
            torch.__version__,
            torch.cuda.get_device_name(),
            f"{torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB",
        )
    sections = {
        "memory": section_memory,
        "int32": section_int32,
        "determinism": section_determinism,
        "numerics": section_numerics,
    }
    with torch.inference_mode():
        for name in args.sections:
            sections[name](args, dev)
    print("\n| section | case | result |\n|---|---|---|")
    for section, case, result in RESULTS:
        print(f"| {section} | {case} | {result} |")
