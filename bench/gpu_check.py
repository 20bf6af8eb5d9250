"""GPU correctness check of flexpbs (timings: bench/attention.py).

    PYTHONPATH=$PWD python bench/gpu_check.py

threshold=1.0 vs dense SDPA in float32/bfloat16/float16, sparse thresholds vs flexpbs.reference
(identical tiles, output error), eager vs compiled FlexAttention on the same BlockMask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import flexpbs
from flexpbs import PBSConfig, reference
from flexpbs.block_mask import build_block_mask
from flexpbs.permutation import permute_kv
from workloads import synthetic_qkv

DEV = torch.device("cuda")


def check_correctness() -> None:
    for n, dtype, gqa in [(300, torch.float32, "shared"), (1000, torch.bfloat16, "per_head"),
                          (4097, torch.bfloat16, "shared"), (8192, torch.float16, "shared")]:
        q, k, v = synthetic_qkv(1, 8, 2, n, 64, dtype=dtype, device=DEV, seed=n)
        out = flexpbs.attention(q, k, v, threshold=1.0, gqa=gqa)
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        err = (out.float() - dense).abs().max().item()
        print(f"threshold 1.0 vs SDPA  n={n:5d} {str(dtype):15s} {gqa:8s} max err {err:.2e}")
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), err
    for n, gqa, thr in [(1000, "shared", 0.8), (1500, "per_head", 0.5), (2048, "shared", 0.9)]:
        q, k, v = synthetic_qkv(2, 4, 2, n, 64, dtype=torch.float32, device=DEV, seed=n)
        cfg = PBSConfig(threshold=thr, gqa=gqa)
        out, st = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
        ref_tiles = reference.selection(q.cpu(), k.cpu(), st.key_positions.cpu(), cfg)
        mask = reference.token_mask(st.tiles.cpu(), st.key_positions.cpu(), 128)
        want = reference.masked_attention(q, k, v, mask, 64**-0.5)
        err = (out.cpu() - want).abs().max().item()
        same = torch.equal(ref_tiles, st.tiles.cpu())
        k_p, v_p = permute_kv(k, v, st.key_positions)
        bm = build_block_mask(st.tiles, st.key_positions, 128, 256)
        eager = flex_attention(q, k_p, v_p, block_mask=bm, enable_gqa=k_p.shape[1] != q.shape[1])
        e_err = (eager - out).abs().max().item()
        print(f"threshold {thr} vs reference n={n} {gqa}: density {st.density.mean():.3f}, same tiles {same}, "
              f"max err {err:.2e}, eager-vs-compiled {e_err:.2e}")
        assert same and err < 1e-4 and e_err < 1e-4


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    check_correctness()


if __name__ == "__main__":
    main()
