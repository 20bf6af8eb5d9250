"""CPU micro-benchmarks of each PBS stage (pytest-benchmark): ``pytest bench/test_stages.py``.

Small shapes (B=1, Hq=8, Hkv=2, N=4096, D=64, float32) so a laptop runs them in seconds; the stages are
the harness's (:func:`bench.stages.stage_calls`), GPU tables come from ``python -m bench``. Compare stages
side by side within one run only.
"""

from __future__ import annotations

import pytest
import torch

import flexpbs
from flexpbs import PBSConfig

from .stages import StageRun, stage_calls

N, THRESHOLD = 4096, 0.9


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, N, 64, generator=gen) * 2
    k = torch.randn(1, 2, N, 64, generator=gen)
    v = torch.randn(1, 2, N, 64, generator=gen)
    return q, k, v


@pytest.fixture(scope="module")
def stages(inputs) -> StageRun:
    return stage_calls(*inputs, PBSConfig(threshold=THRESHOLD, importance_kernel="torch"))


@pytest.mark.parametrize("stage", ["importance", "permute", "select", "mask", "mask+attn"])
def test_stage(benchmark, stages, stage):
    stages.calls[stage]()  # the attention stage compiles on its first call
    benchmark(stages.calls[stage])


def test_end_to_end(benchmark, inputs):
    q, k, v = inputs
    flexpbs.attention(q, k, v, threshold=THRESHOLD, min_seq_len=0)
    benchmark(flexpbs.attention, q, k, v, threshold=THRESHOLD, min_seq_len=0)


def test_dense_sdpa_baseline(benchmark, inputs):
    q, k, v = inputs
    benchmark(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
