"""flexpbs in one call: PBS attention on LLM-like inputs, checked against dense causal attention.

    python examples/quickstart.py            # CPU: 8K tokens, about half a minute (first compile)
    python examples/quickstart.py --n 65536  # on a GPU

Prints the shapes, the density of computed tiles, the error against dense attention and times.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import flexpbs


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
    print(f"device {device}, dtype {dtype}: q [{batch}, {q_heads}, {args.n}, {d}], "
          f"k/v [{batch}, {kv_heads}, {args.n}, {d}]")

    start = time.perf_counter()
    out, stats = flexpbs.attention(q, k, v, threshold=args.threshold, return_stats=True)
    print(f"first call (includes compiling FlexAttention): {time.perf_counter() - start:.1f} s")

    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err = (out.float() - dense.float()).abs()
    rel = (out.float() - dense.float()).norm() / dense.float().norm()
    print(f"threshold {args.threshold}: density {stats.density.mean():.3f} "
          f"(min {stats.density.min():.3f}, max {stats.density.max():.3f}) of causal tiles")
    print(f"error vs dense causal SDPA: max abs {err.max():.2e}, relative L2 {rel:.2e}")

    _, t_pbs = timed(lambda: flexpbs.attention(q, k, v, threshold=args.threshold), device)
    _, t_dense = timed(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device
    )
    print(f"time: flexpbs {t_pbs:.1f} ms, dense SDPA {t_dense:.1f} ms "
          f"(ratio {t_dense / t_pbs:.2f}x; on CPU dense usually wins, PBS pays off on GPUs past ~16K)")


if __name__ == "__main__":
    main()
