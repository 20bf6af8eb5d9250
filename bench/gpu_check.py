"""GPU correctness check and per-stage timing of flexpbs (one call on the device machine).

    python bench/gpu_check.py --lengths 32768 131072
    python bench/gpu_check.py --skip-checks --modes --lengths 32768 131072   # options beyond the paper

Correctness: threshold=1.0 vs dense SDPA, sparse thresholds vs flexpbs.reference (small N), eager vs
compiled flex; then, per length, the time of each stage, flexpbs end to end and the dense baselines
(SDPA cuDNN, SDPA flash, flex causal), on the same LLM-like inputs, medians of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import flexpbs  # noqa: E402
from flexpbs import PBSConfig, reference  # noqa: E402
from flexpbs.block_mask import build_block_mask  # noqa: E402
from flexpbs.importance import key_importance, last_block_importance  # noqa: E402
from flexpbs.permutation import permute_kv, segment_permutation  # noqa: E402
from flexpbs.selection import select_tiles  # noqa: E402
from flexpbs.sparse_attention import _compiled_flex_attention, sparse_attention  # noqa: E402
from quickstart import llm_like_qkv  # noqa: E402

DEV = torch.device("cuda")


def check_correctness() -> None:
    for n, dtype, gqa in [(300, torch.float32, "shared"), (1000, torch.bfloat16, "per_head"),
                          (4097, torch.bfloat16, "shared"), (8192, torch.float16, "shared")]:
        q, k, v = llm_like_qkv(1, 8, 2, n, 64, dtype, DEV, seed=n)
        out = flexpbs.attention(q, k, v, threshold=1.0, gqa=gqa)
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        err = (out.float() - dense).abs().max().item()
        print(f"threshold 1.0 vs SDPA  n={n:5d} {str(dtype):15s} {gqa:8s} max err {err:.2e}")
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), err
    for n, gqa, thr in [(1000, "shared", 0.8), (1500, "per_head", 0.5), (2048, "shared", 0.9)]:
        q, k, v = llm_like_qkv(2, 4, 2, n, 64, torch.float32, DEV, seed=n)
        cfg = PBSConfig(threshold=thr, gqa=gqa)
        out, st = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        ref_tiles = reference.selection(q.cpu(), k.cpu(), st.permutation.cpu(), cfg)
        mask = reference.token_mask(st.block_mask.cpu(), st.permutation.cpu(), 128)
        want = reference.masked_attention(q, k, v, mask, 64**-0.5)
        err = (out.cpu() - want).abs().max().item()
        same = torch.equal(ref_tiles, st.block_mask.cpu())
        k_p, v_p = permute_kv(k, v, st.permutation)
        bm = build_block_mask(st.block_mask, st.permutation, 128)
        eager = flex_attention(q, k_p, v_p, block_mask=bm, enable_gqa=k_p.shape[1] != q.shape[1])
        e_err = (eager - out).abs().max().item()
        print(f"threshold {thr} vs reference n={n} {gqa}: density {st.density.mean():.3f}, same tiles {same}, "
              f"max err {err:.2e}, eager-vs-compiled {e_err:.2e}")
        assert same and err < 1e-4 and e_err < 1e-4


def ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def time_length(n: int, args) -> dict:
    b, hq, hkv, d = 1, args.q_heads, args.kv_heads, args.head_dim
    q, k, v = llm_like_qkv(b, hq, hkv, n, d, torch.bfloat16, DEV, seed=0)
    cfg = PBSConfig(threshold=args.threshold)
    scale = d**-0.5
    row: dict = {"n": n}
    imp = last_block_importance(q, k, block_size=128, segment_size=256, scale=scale, per_query_head=False)
    perm = segment_permutation(imp, n, 256)
    k_p, v_p = permute_kv(k, v, perm)
    tiles = select_tiles(q, k_p, perm, block_size=128, segment_size=256, threshold=cfg.threshold, scale=scale)
    bm = build_block_mask(tiles, perm, 128)
    row["density"] = tiles.float().sum().item() / (hq * (tiles.shape[-1] * (tiles.shape[-1] + 1) / 2))
    row["importance"] = ms(lambda: key_importance(q, k, block_size=128, segment_size=256, scale=scale,
                                                  per_query_head=False, scorer="triton"))
    row["importance_torch"] = ms(lambda: last_block_importance(q, k, block_size=128, segment_size=256, scale=scale, per_query_head=False))
    row["permute"] = ms(lambda: permute_kv(k, v, segment_permutation(imp, n, 256)))
    row["select"] = ms(lambda: select_tiles(q, k_p, perm, block_size=128, segment_size=256, threshold=cfg.threshold, scale=scale))
    row["mask"] = ms(lambda: build_block_mask(tiles, perm, 128))
    row["attn"] = ms(lambda: sparse_attention(q, k_p, v_p, tiles, perm, block_size=128, scale=scale))
    row["total"] = ms(lambda: flexpbs.attention(q, k, v, config=cfg))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flexpbs.attention(q, k, v, config=cfg)
    row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["cudnn"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        row["fa2"] = ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        del kr, vr
    causal = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=DEV, _compile=True)
    # flex_attention's recompile limit (8) is shared by every compiled call site: raise it here too
    with torch._dynamo.config.patch(recompile_limit=512):
        row["flex_causal"] = ms(lambda: _compiled_flex_attention(q, k, v, block_mask=causal, scale=scale, enable_gqa=True))
    return row


# Options beyond the paper, timed end to end against the published algorithm (--modes).
MODES: dict[str, dict] = {
    "published": {},
    "no permutation": {"permutation": "none"},
    "head guard 0.1": {"max_shrink": 0.1},
    "exact last block": {"exact_last_block": True},
    "head guard 0.1 + exact last block": {"max_shrink": 0.1, "exact_last_block": True},
    "no permutation + exact last block": {"permutation": "none", "exact_last_block": True},
}


def time_modes(n: int, args) -> list[dict]:
    """flexpbs.attention end to end per mode, same inputs: time, density, share of sorted heads."""
    q, k, v = llm_like_qkv(1, args.q_heads, args.kv_heads, n, args.head_dim, torch.bfloat16, DEV, seed=0)
    rows = []
    for name, options in MODES.items():
        cfg = PBSConfig(threshold=args.threshold, **options)
        _, st = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        rows.append({"n": n, "mode": name, "density": st.density.mean().item(),
                     "sorted_heads": st.sorted_rows.float().mean().item(),
                     "total": ms(lambda: flexpbs.attention(q, k, v, config=cfg))})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--modes", action="store_true",
                        help="only time flexpbs.attention per option set of MODES (beyond the paper)")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    if not args.skip_checks:
        check_correctness()
    if args.modes:
        rows = [row for n in args.lengths for row in time_modes(n, args)]
        print("\n| N | mode | density | sorted heads | flexpbs total ms | vs published |\n|---|---|---|---|---|---|")
        for r in rows:
            base = next(x["total"] for x in rows if x["n"] == r["n"] and x["mode"] == "published")
            print(f"| {r['n']} | {r['mode']} | {r['density']:.3f} | {r['sorted_heads']:.2f} | {r['total']:.3f} "
                  f"| {r['total'] / base:.2f}x |")
        return
    rows = []
    for n in args.lengths:
        rows.append(time_length(n, args))
        print(rows[-1], flush=True)
    cols = ["n", "density", "importance", "importance_torch", "permute", "select", "mask", "attn", "total", "cudnn", "fa2",
            "flex_causal", "peak_extra_gib"]
    print("\n| " + " | ".join(cols) + " | cuDNN/total | FA2/total |")
    print("|" + "---|" * (len(cols) + 2))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + f" | {r['cudnn'] / r['total']:.2f}x | {r['fa2'] / r['total']:.2f}x |")


if __name__ == "__main__":
    main()
