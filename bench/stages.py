"""The eager pipeline's stages as separate calls, for the scripts that time, profile or count them.

``stage_calls`` runs the pipeline once and returns each stage as a closure over the previous stage's
output, in order: importance, permute (permutation and K/V gather), select, mask (BlockMask build),
mask+attn (BlockMask build and the FlexAttention call). Without permutation the first two are absent.
"""

from __future__ import annotations

from typing import Callable

import torch

from flexpbs import PBSConfig
from flexpbs.block_mask import build_block_mask
from flexpbs.importance import key_importance, resolve_importance_kernel
from flexpbs.permutation import identity_permutation, permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention


def stage_calls(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: PBSConfig,
) -> dict[str, Callable[[], object]]:
    """Closures over ``q [B, Hq, N, D]``, ``k``/``v [B, Hkv, N, D]`` (gqa="shared", prefill); the
    attention stage runs on ``cfg.backend``."""
    n, scale = q.shape[2], q.shape[-1] ** -0.5
    bs, seg = cfg.block_size, cfg.segment_size
    calls: dict[str, Callable[[], object]] = {}
    if cfg.key_order == "original":
        perm = identity_permutation(q.shape[0], k.shape[1], n, q.device)
        k_p, v_p = k, v
    else:
        kernel = resolve_importance_kernel(cfg.importance_kernel, q.device)
        calls["importance"] = lambda: key_importance(
            q, k, block_size=bs, segment_size=seg, scale=scale, per_query_head=False, kernel=kernel
        )
        imp = calls["importance"]()
        calls["permute"] = lambda: permute_kv(k, v, segment_permutation(imp, n, seg))
        perm = segment_permutation(imp, n, seg)
        k_p, v_p = permute_kv(k, v, perm)
    calls["select"] = lambda: select_tiles(
        q, k_p, perm, block_size=bs, segment_size=seg, threshold=cfg.threshold, scale=scale
    )
    tiles = calls["select"]()
    calls["mask"] = lambda: build_block_mask(tiles, perm, bs, seg)
    calls["mask+attn"] = lambda: sparse_attention(
        q, k_p, v_p, tiles, perm, block_size=bs, segment_size=seg, scale=scale, backend=cfg.backend
    )
    return calls
