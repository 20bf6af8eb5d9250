import dataclasses
import math

import pytest
import torch

import flexpbs
from flexpbs import PBSConfig
from flexpbs.dispatch import BREAK_EVEN, FALLBACK_BREAK_EVEN, break_even, choose_backend


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=-64), ValueError, "block_size"),
        (dict(block_size=64.0), TypeError, "block_size"),
        (dict(segment_size=0), ValueError, "segment_size"),
        (dict(block_size=128, segment_size=192), ValueError, "segment_size"),
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(threshold=-0.1), ValueError, "threshold"),
        (dict(threshold=math.nan), ValueError, "threshold"),
        (dict(threshold="0.9"), TypeError, "threshold"),
        (dict(gqa="grouped"), ValueError, "gqa"),
        (dict(scale=math.inf), ValueError, "scale"),
        (dict(scale="1"), TypeError, "scale"),
        (dict(min_seq_len=-1), ValueError, "min_seq_len"),
        (dict(key_order="random"), ValueError, "key_order"),
        (dict(max_shrink=1.0), ValueError, "max_shrink"),
        (dict(max_shrink=-0.1), ValueError, "max_shrink"),
        (dict(max_shrink=math.nan), ValueError, "max_shrink"),
        (dict(max_shrink="0.1"), TypeError, "max_shrink"),
        (dict(max_shrink=True), TypeError, "max_shrink"),
        (dict(max_shrink=0.1, key_order="original"), ValueError, "max_shrink"),
        (dict(exact_last_block=1), TypeError, "exact_last_block"),
        (dict(backend="cudnn"), ValueError, "backend"),
    ],
)
def test_config_rejects_bad_options(kwargs, error, name):
    with pytest.raises(error, match=name):
        PBSConfig(**kwargs)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(error, match=name):
        flexpbs.attention(q, q, q, **kwargs)


def test_config_is_frozen_and_defaults_match_paper():
    cfg = PBSConfig()
    assert (cfg.block_size, cfg.segment_size, cfg.threshold, cfg.gqa) == (128, 256, 0.9, "shared")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 0.5  # type: ignore[misc]


def test_config_and_keywords_are_exclusive():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="threshold"):
        flexpbs.attention(q, q, q, config=PBSConfig(), threshold=0.5)
    with pytest.raises(TypeError, match="config"):
        flexpbs.attention(q, q, q, config={"threshold": 0.5})


def test_config_object_is_used():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16) * 3 for _ in range(3))
    cfg = PBSConfig(block_size=64, segment_size=128, threshold=0.5)
    out_cfg, stats_cfg = flexpbs.attention(q, k, v, config=cfg, return_stats=True)
    out_kw, stats_kw = flexpbs.attention(
        q, k, v, block_size=64, segment_size=128, threshold=0.5, return_stats=True
    )
    torch.testing.assert_close(out_cfg, out_kw, rtol=0, atol=0)
    assert torch.equal(stats_cfg.tiles, stats_kw.tiles)
    assert stats_cfg.tiles.shape[-1] == 5  # ceil(300 / 64)


def test_importance_kernel_option(monkeypatch):
    with pytest.raises(ValueError, match="importance_kernel"):
        PBSConfig(importance_kernel="cuda")
    q = torch.randn(1, 2, 300, 16)
    _, stats = flexpbs.attention(q, q, q, segment_size=128, return_stats=True)
    assert stats.importance_kernel == "torch"  # auto on CPU tensors
    _, stats = flexpbs.attention(q, q, q, segment_size=512, return_stats=True)  # N <= segment: dense
    assert stats.dense and stats.importance_kernel is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="importance_kernel"):
        flexpbs.attention(q, q, q, importance_kernel="triton")


@pytest.mark.parametrize(
    "dtype, head_dim, block_size, match",
    [
        (torch.bfloat16, 128, 128, "CUDA only"),  # CPU tensors: no FLASH backend
        (torch.float32, 128, 128, "CUDA only"),
    ],
)
def test_flash_backend_rejects_what_it_cannot_run(dtype, head_dim, block_size, match):
    """backend='flash' fails before any work, naming the backend, even where a call would run dense."""
    q = torch.randn(1, 2, 64, head_dim, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        flexpbs.attention(q, q, q, backend="flash", block_size=block_size)


FACTS = dict(
    device_type="cuda",
    capability=(9, 0),
    dtype=torch.bfloat16,
    head_dim=128,
    value_dim=128,
    block_size=128,
    flash_installed=True,
)


@pytest.mark.parametrize(
    "facts, want",
    [
        ({}, "flash"),
        (dict(head_dim=64, value_dim=64), "flash"),
        (dict(dtype=torch.float16), "flash"),
        (dict(flash_installed=False), "triton"),
        (dict(capability=(8, 0)), "triton"),  # not verified there
        (dict(capability=(10, 0)), "triton"),
        (dict(device_type="cpu", capability=None), "triton"),
        (dict(dtype=torch.float32), "triton"),
        (dict(head_dim=96, value_dim=96), "triton"),
        (dict(value_dim=64), "triton"),
        (dict(block_size=64), "triton"),
    ],
)
def test_auto_backend_takes_flash_only_where_installed_and_verified(facts, want):
    assert choose_backend("auto", **{**FACTS, **facts}) == want
    assert choose_backend("triton", **{**FACTS, **facts}) == "triton"


@pytest.mark.parametrize(
    "facts, error, match",
    [
        (dict(device_type="cpu", capability=None), ValueError, "CUDA only"),
        (dict(dtype=torch.float32), ValueError, "float16 or bfloat16"),
        (dict(head_dim=96, value_dim=96), ValueError, r"head dims \(64, 128\)"),
        (dict(block_size=64), ValueError, "block_size 128"),
        (dict(flash_installed=False), ImportError, r"flexpbs\[flash\]"),
    ],
)
def test_explicit_flash_backend_raises_where_it_cannot_run(facts, error, match):
    with pytest.raises(error, match=match):
        choose_backend("flash", **{**FACTS, **facts})
    assert choose_backend("flash", **FACTS) == "flash"
    assert choose_backend("flash", **{**FACTS, "capability": (10, 0)}) == "flash"  # explicit: unverified runs


def test_auto_min_seq_len_is_the_measured_break_even():
    for backend in ("triton", "flash"):
        assert break_even("cuda", (9, 0), torch.bfloat16, backend) == BREAK_EVEN[(9, 0)][backend]
        assert break_even("cuda", (9, 0), torch.float16, backend) == BREAK_EVEN[(9, 0)][backend]
        assert break_even("cuda", (12, 0), torch.bfloat16, backend) == FALLBACK_BREAK_EVEN  # not measured
        assert break_even("cuda", (9, 0), torch.float32, backend) == FALLBACK_BREAK_EVEN
        assert break_even("cpu", None, torch.float32, backend) == 0


def test_defaults_on_the_cpu_run_pbs_on_triton_and_stats_say_so():
    """On the CPU ``"auto"`` means the Triton backend (FlexAttention's C++ kernel there) and no dense
    minimum beyond one segment; the stats name the backend, and dense calls name none."""
    q = torch.randn(1, 2, 600, 16)
    _, stats = flexpbs.attention(q, q, q, return_stats=True)
    assert (stats.dense, stats.backend) == (False, "triton")
    _, stats = flexpbs.attention(q[:, :, :200], q[:, :, :200], q[:, :, :200], return_stats=True)
    assert (stats.dense, stats.backend) == (True, None)
    _, stats = flexpbs.attention(q, q, q, min_seq_len=1000, return_stats=True)
    assert stats.dense
