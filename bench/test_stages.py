"""CPU micro-benchmarks of each PBS stage (pytest-benchmark): ``pytest bench/``.

Small shapes (B=1, Hq=8, Hkv=2, N=4096, D=64, float32) so a laptop runs them in seconds; GPU tables come
from the scripts in bench/. Compare stages side by side within one run only.
"""

from __future__ import annotations

import pytest
import torch

import flexpbs
from flexpbs.block_mask import build_block_mask
from flexpbs.importance import last_block_importance
from flexpbs.permutation import permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention

N, BLOCK, SEGMENT, THRESHOLD = 4096, 128, 256, 0.9


@pytest.fixture(scope="module")
def pipeline():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, N, 64, generator=gen) * 2
    k = torch.randn(1, 2, N, 64, generator=gen)
    v = torch.randn(1, 2, N, 64, generator=gen)
    scale = 64**-0.5
    imp = last_block_importance(q, k, block_size=BLOCK, segment_size=SEGMENT, scale=scale, per_query_head=False)
    perm = segment_permutation(imp, N, SEGMENT)
    k_p, v_p = permute_kv(k, v, perm)
    tiles = select_tiles(q, k_p, perm, block_size=BLOCK, segment_size=SEGMENT, threshold=THRESHOLD, scale=scale)
    return dict(q=q, k=k, v=v, scale=scale, imp=imp, perm=perm, k_p=k_p, v_p=v_p, tiles=tiles)


def test_importance(benchmark, pipeline):
    p = pipeline
    benchmark(last_block_importance, p["q"], p["k"], block_size=BLOCK, segment_size=SEGMENT,
              scale=p["scale"], per_query_head=False)


def test_permutation_and_gather(benchmark, pipeline):
    p = pipeline
    benchmark(lambda: permute_kv(p["k"], p["v"], segment_permutation(p["imp"], N, SEGMENT)))


def test_selection(benchmark, pipeline):
    p = pipeline
    benchmark(select_tiles, p["q"], p["k_p"], p["perm"], block_size=BLOCK, segment_size=SEGMENT,
              threshold=THRESHOLD, scale=p["scale"])


def test_block_mask_build(benchmark, pipeline):
    benchmark(build_block_mask, pipeline["tiles"], pipeline["perm"], BLOCK, SEGMENT)


def test_sparse_attention(benchmark, pipeline):
    p = pipeline
    sparse_attention(p["q"], p["k_p"], p["v_p"], p["tiles"], p["perm"], block_size=BLOCK, segment_size=SEGMENT, scale=p["scale"])
    benchmark(sparse_attention, p["q"], p["k_p"], p["v_p"], p["tiles"], p["perm"],
              block_size=BLOCK, segment_size=SEGMENT, scale=p["scale"])


def test_end_to_end(benchmark, pipeline):
    p = pipeline
    flexpbs.attention(p["q"], p["k"], p["v"], threshold=THRESHOLD)
    benchmark(flexpbs.attention, p["q"], p["k"], p["v"], threshold=THRESHOLD)


def test_dense_sdpa_baseline(benchmark, pipeline):
    p = pipeline
    benchmark(torch.nn.functional.scaled_dot_product_attention, p["q"], p["k"], p["v"],
              is_causal=True, enable_gqa=True)
