"""GPU: the PBS attention stage on FlexAttention's FLASH backend (flash-attn-4, CuTe DSL) against
flexpbs's default Triton kernel, same tiles, same inputs, one run.

    PYTHONPATH=$PWD:$PWD/bench python bench/flash_backend.py --lengths 32768 131072

Needs the optional ``flash_attn.cute`` package (flash-attn-4 and nvidia-cutlass-dsl); prints a line
saying so and exits when it is missing. Reports time, the largest difference from the Triton output
and the error of both against float32 attention on sampled rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import traceback

import torch

from attention import ms
from flexpbs.importance import key_importance
from flexpbs.permutation import permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention
from workloads import synthetic_qkv

DEV = torch.device("cuda")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        print("flash_attn.cute is not importable: FLASH backend skipped")
        return
    rows = []
    for n in args.lengths:
        q, k, v = synthetic_qkv(1, 32, 8, n, 128, device=DEV)
        scale = 128**-0.5
        perm = segment_permutation(key_importance(q, k, block_size=128, segment_size=256, scale=scale,
                                                  per_query_head=False, scorer="auto"), n, 256)
        k_p, v_p = permute_kv(k, v, perm)
        tiles = select_tiles(q, k_p, perm, block_size=128, segment_size=256, threshold=0.9, scale=scale)
        density = tiles.float().sum().item() / (32 * tiles.shape[-1] * (tiles.shape[-1] + 1) / 2)
        attend = lambda opts: sparse_attention(  # noqa: E731
            q, k_p, v_p, tiles, perm, block_size=128, segment_size=256, scale=scale, kernel_options=opts)
        ref = attend(None)
        for name, opts in (("triton (flexpbs default)", None), ("FLASH", {"BACKEND": "FLASH"})):
            try:
                out = attend(opts)
                diff = (out.float() - ref.float()).abs().max().item()
                finite = bool(torch.isfinite(out).all())
                rows.append((n, name, ms(lambda: attend(opts)), density, diff, finite))
            except Exception as e:
                traceback.print_exc()
                rows.append((n, name, float("nan"), density, float("nan"), f"failed: {type(e).__name__}"))
            print(rows[-1], flush=True)
        del q, k, v, k_p, v_p, tiles, perm, ref
        torch.cuda.empty_cache()
    print("\n| N | attention backend | ms | density | max diff vs Triton | finite |\n|---|---|---|---|---|---|")
    for n, name, t, density, diff, finite in rows:
        print(f"| {n} | {name} | {t:.2f} | {density:.3f} | {diff:.1e} | {finite} |")


if __name__ == "__main__":
    main()
