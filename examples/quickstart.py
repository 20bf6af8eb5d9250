"""flexpbs in one call: PBS attention on LLM-like inputs, checked against dense causal attention.

    python examples/quickstart.py            # CPU: 8K tokens, about half a minute (first compile)
    python examples/quickstart.py --n 65536  # on a GPU

Prints the shapes, the density of computed tiles, a PASS/FAIL check of the output against the float32
oracle on the tiles flexpbs selected (the README's tolerance), the difference from dense attention that
the skipped tiles make, and times.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import flexpbs
from flexpbs import reference


def llm_like_qkv(batch, q_heads, kv_heads, n, d, dtype, device, seed=0):
    """q/k/v with what makes real attention sparse: a sink at token 0, a local band and a few
    heavy-hitter keys that many queries attend to."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    group = q_heads // kv_heads
    q = torch.randn(batch, q_heads, n, d, generator=gen)
    k = torch.randn(batch, kv_heads, n, d, generator=gen)
    v = torch.randn(batch, kv_heads, n, d, generator=gen)
    topic = torch.randn(batch, kv_heads, 1, d, generator=gen)
    heavy = torch.rand(batch, kv_heads, n, 1, generator=gen) < 0.02
    k = k + 3.0 * heavy * topic  # scattered keys that share a direction...
    q = q + 1.5 * topic.repeat_interleave(group, dim=1)  # ...that every query looks for
    k[:, :, 0] += 4.0 * topic[:, :, 0]  # attention sink
    pos = torch.arange(n, dtype=torch.float32)
    wave = torch.stack([torch.cos(pos / 64 * (i + 1)) for i in range(d // 2)], -1)
    band = torch.cat([wave, wave], -1) * 0.6  # nearby tokens look alike: a local band
    q, k = q + band, k + band
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


CHECKED_ROWS = 256
# README, "Numerics and limits": max|v| * (TOLERANCE + 4 * 2^-24 * L), L the largest scale * sum_d |q_d k_d|
TOLERANCE = {torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def error_on_the_selection(q, k, v, out, stats) -> tuple[float, float]:
    """(max abs error, documented tolerance) of the last CHECKED_ROWS output rows against the float32
    oracle over the tiles and permutation flexpbs reported (a block-aligned slice of the rows)."""
    n, block = q.shape[2], 128
    rows = min(CHECKED_ROWS, n) // block * block or n
    mask = reference.token_mask(
        stats.tiles[:, :, -(rows // block) :].cpu(), stats.key_positions.cpu(), block, rows
    )
    scale = q.shape[-1] ** -0.5
    want = reference.masked_attention(q[:, :, -rows:], k, v, mask, scale)
    err = (out[:, :, -rows:].float().cpu() - want).abs().max().item()
    q_rows, kv = q[:, :, -rows:].float().abs(), k.float().abs().repeat_interleave(q.shape[1] // k.shape[1], 1)
    logit_bound = scale * (q_rows @ kv.transpose(-1, -2)).max().item()
    tol = v.float().abs().max().item() * (TOLERANCE[q.dtype] + 4 * 2**-24 * logit_bound)
    return err, tol


def timed(fn, device, repeat=3):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="sequence length")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, q_heads, kv_heads, d = 1, 8, 2, 64
    q, k, v = llm_like_qkv(batch, q_heads, kv_heads, args.n, d, dtype, device)
    print(
        f"device {device}, dtype {dtype}: q [{batch}, {q_heads}, {args.n}, {d}], "
        f"k/v [{batch}, {kv_heads}, {args.n}, {d}]"
    )

    start = time.perf_counter()
    out, stats = flexpbs.attention(q, k, v, threshold=args.threshold, return_stats=True)
    print(f"first call (includes compiling FlexAttention): {time.perf_counter() - start:.1f} s")

    print(
        f"threshold {args.threshold}: density {stats.density.mean():.3f} "
        f"(min {stats.density.min():.3f}, max {stats.density.max():.3f}) of causal tiles"
    )
    err, tol = error_on_the_selection(q, k, v, out, stats)
    verdict = "PASS, within" if err <= tol else "FAIL, beyond"
    print(
        f"{verdict} the documented tolerance: the last {CHECKED_ROWS} rows against float32 attention "
        f"over the tiles flexpbs reports, max abs error {err:.2e} (tolerance {tol:.2e})"
    )

    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rel = (out.float() - dense.float()).norm() / dense.float().norm()
    print(
        f"skipped tiles: relative L2 difference from dense causal SDPA {rel:.2e} (what the threshold "
        f"trades for speed; 1.0 computes every causal tile)"
    )

    _, t_pbs = timed(lambda: flexpbs.attention(q, k, v, threshold=args.threshold), device)
    _, t_dense = timed(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device
    )
    print(
        f"time: flexpbs {t_pbs:.1f} ms, dense SDPA {t_dense:.1f} ms "
        f"(ratio {t_dense / t_pbs:.2f}x; on CPU dense usually wins, PBS pays off on GPUs past ~16K)"
    )


if __name__ == "__main__":
    main()
