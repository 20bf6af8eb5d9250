"""Random-shape stress test of flexpbs against the reference, bounded in time (GPU, or tiny on the CPU).

    python -m bench stress --seconds 300                 # GPU
    python -m bench stress --cpu-smoke --seconds 60

Each case draws batch, heads (GQA groups), length (inside a few length buckets, including lengths that
are not multiples of the block), head dim 64/128, dtype, threshold, GQA mode and block/segment sizes, runs
``flexpbs.attention`` with stats and checks: finite output, valid stats (bijective segment
permutation, forced tiles, nothing wholly in the future, density), sampled rows against float32
attention over the reported tiles, and, when N and the head count are small, the permutation and
selection against ``flexpbs.reference``. Head layouts and lengths come from small menus so that most
cases reuse a compiled graph (each new one compiles for seconds). Stops starting new cases after
``--seconds``; prints every case, then a coverage summary and a markdown table. About 30% of the cases
force the pipeline's head chunks (memory budget floor 0, ``flexpbs.limits.override``), which otherwise
only long inputs get. Inputs: :func:`bench.workloads.stress_qkv`; checks: :mod:`bench.checks`.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
import traceback
from collections import Counter

import torch

import flexpbs
from flexpbs import PBSConfig, limits
from flexpbs.pipeline import kv_heads_per_chunk

from .checks import check_against_reference, check_rows, check_stats, sample_rows
from .workloads import stress_qkv

# (Hq, Hkv) layouts: GQA groups 1, 4 and 8; MHA.
HEAD_LAYOUTS = [(8, 2), (32, 8), (8, 8), (16, 2)]


def draw_case(rng: random.Random, buckets: list[int], small: bool) -> dict:
    """A random case. N is drawn near one of a few lengths L (in (L - L/16, L]): on the CPU such lengths
    share a compiled graph (its position table has a power-of-two capacity), and cases cost alike."""
    block = rng.choice([64, 128])
    segment = block * rng.choice([1, 2, 4])
    hq, hkv = rng.choice(HEAD_LAYOUTS[:2] if small else HEAD_LAYOUTS)
    if small:
        hq, hkv = hq // 4 or 1, max(1, hkv // 4)
    bucket = rng.choice(buckets)
    n = rng.randint(bucket - bucket // 16 + 1, bucket)
    kind = rng.choice(["any", "block multiple", "block multiple + 1", "bucket length"])
    if kind == "block multiple":
        n = n // block * block
    elif kind == "block multiple + 1":
        n = min(n // block * block + 1, bucket)
    elif kind == "bucket length":
        n = bucket
    return dict(
        batch=rng.choice([1, 1, 2]),
        q_heads=hq,
        kv_heads=hkv,
        n=max(n, segment + 1),
        kind=kind,
        head_dim=rng.choice([64, 128]),
        dtype=rng.choice([torch.bfloat16, torch.float16, torch.float32]),
        threshold=1.0 if rng.random() < 0.2 else round(rng.uniform(0.05, 0.99), 3),
        gqa=rng.choice(["shared", "per_head"]),
        block=block,
        segment=segment,
        magnitude=rng.choice([1.0, 1.0, 30.0]),
        seed=rng.randrange(2**31),
        chunked=rng.random() < 0.3,  # force head chunks (budget floor 0), as long inputs get them
    )


def run_case(case: dict, dev: torch.device, reference_n: int) -> dict:
    """Runs and checks one case (AssertionError on a failed check); returns what was checked."""
    # the sparse path at every length; the backend flexpbs picks ("auto")
    cfg = PBSConfig(
        block_size=case["block"],
        segment_size=case["segment"],
        threshold=case["threshold"],
        gqa=case["gqa"],
        min_seq_len=0,
    )
    b, hq, hkv, n, d = case["batch"], case["q_heads"], case["kv_heads"], case["n"], case["head_dim"]
    magnitude = case["magnitude"] if case["dtype"] != torch.float16 else min(case["magnitude"], 10.0)
    q, k, v = stress_qkv(b, hq, hkv, n, d, case["dtype"], dev, seed=case["seed"], magnitude=magnitude)
    with limits.override(min_chunk_bytes=0) if case["chunked"] else contextlib.nullcontext():
        chunks = hkv // kv_heads_per_chunk(q, k, v, cfg.block_size, cfg.gqa == "per_head")
        out, stats = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(out.isfinite().all()), "non-finite output"
    assert not stats.dense
    check_stats(stats, n, cfg)
    rng = random.Random(case["seed"])
    heads = sorted({(0, 0), (b - 1, hq - 1), (rng.randrange(b), rng.randrange(hq))})
    res = check_rows(
        q, k, v, out, stats, cfg, heads, sample_rows(n, cfg.block_size, cfg.segment_size, 16, case["seed"])
    )
    assert res["bad"] == 0, (
        f"{res['bad']} of {res['rows']} sampled rows outside tolerance (worst {res['worst']:.2f})"
    )
    result = dict(
        rows=res["rows"],
        worst=res["worst"],
        density=stats.density.mean().item(),
        reference=False,
        chunks=chunks,
        backend=stats.backend,
    )
    if n <= reference_n and b * hq <= 16:
        same = check_against_reference(q, k, stats, cfg)
        assert same["permutation"], "permutation differs from flexpbs.reference"
        assert same["selection"], "selection differs from flexpbs.reference"
        result["reference"] = True
    return result


def length_range(n: int) -> str:
    """The coverage label of length ``n``."""
    for top, label in [(1024, "<=1K"), (4096, "1K-4K"), (16384, "4K-16K"), (65536, "16K-64K")]:
        if n <= top:
            return label
    return ">64K"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=300.0, help="start no new case after this long")
    parser.add_argument(
        "--buckets",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096, 12288, 32768, 65536],
        help="length buckets N is drawn from (each N in (L - L/16, L])",
    )
    parser.add_argument(
        "--reference-n", type=int, default=4096, help="check selection vs flexpbs.reference up to this N"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")


def run(args: argparse.Namespace) -> None:
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    buckets = [768, 1024, 1536] if args.cpu_smoke else args.buckets
    rng = random.Random(args.seed)
    print(torch.__version__, "cpu smoke" if args.cpu_smoke else torch.cuda.get_device_name())
    start = time.perf_counter()
    cover: dict[str, Counter] = {
        k: Counter()
        for k in [
            "dtype",
            "gqa",
            "block/segment",
            "heads",
            "head_dim",
            "length",
            "length kind",
            "threshold",
            "batch",
            "head chunks",
            "backend",
        ]
    }
    passed, failed, with_reference, rows, worst = 0, [], 0, 0, 0.0
    with torch.inference_mode():
        while time.perf_counter() - start < args.seconds:
            case = draw_case(rng, buckets, args.cpu_smoke)
            label = (
                f"B={case['batch']} Hq={case['q_heads']} Hkv={case['kv_heads']} N={case['n']} "
                f"D={case['head_dim']} "
                f"{str(case['dtype'])[6:]} thr={case['threshold']} {case['gqa']} block={case['block']} "
                f"segment={case['segment']} x{case['magnitude']:g}"
            )
            t0 = time.perf_counter()
            try:
                res = run_case(case, dev, args.reference_n)
            except Exception as err:  # every failure is recorded, the run goes on
                failed.append((label, f"{type(err).__name__}: {err}"))
                print(f"FAIL {label}: {type(err).__name__}: {err}", flush=True)
                traceback.print_exc()
                continue
            passed += 1
            rows += res["rows"]
            worst = max(worst, res["worst"])
            with_reference += res["reference"]
            print(
                f"ok   {label}: {res['chunks']} head chunk(s), density {res['density']:.3f}, "
                f"worst error/tolerance {res['worst']:.3f}"
                f"{', reference selection' if res['reference'] else ''}, {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            cover["dtype"][str(case["dtype"])[6:]] += 1
            cover["gqa"][case["gqa"]] += 1
            cover["block/segment"][f"{case['block']}/{case['segment']}"] += 1
            cover["heads"][f"{case['q_heads']}/{case['kv_heads']}"] += 1
            cover["head_dim"][case["head_dim"]] += 1
            cover["length"][length_range(case["n"])] += 1
            cover["length kind"][case["kind"]] += 1
            cover["threshold"][
                "1.0" if case["threshold"] == 1.0 else "<0.5" if case["threshold"] < 0.5 else "0.5-0.99"
            ] += 1
            cover["batch"][case["batch"]] += 1
            cover["head chunks"][res["chunks"]] += 1
            cover["backend"][res["backend"]] += 1
    elapsed = time.perf_counter() - start
    print(
        f"\n{passed + len(failed)} cases in {elapsed:.0f} s: {passed} passed, {len(failed)} failed; "
        f"{rows} sampled rows checked (worst error/tolerance {worst:.3f}); {with_reference} "
        "cases also checked "
        "permutation and selection against flexpbs.reference"
    )
    for label, err in failed:
        print(f"  FAILED {label}: {err}")
    print("\n| covered | cases |\n|---|---|")
    for name, counts in cover.items():
        print(
            f"| {name} | "
            + ", ".join(f"{key}: {count}" for key, count in sorted(counts.items(), key=str))
            + " |"
        )
    print(
        f"| total | {passed} passed, {len(failed)} failed, {elapsed:.0f} s, worst "
        f"error/tolerance {worst:.3f} |"
    )
