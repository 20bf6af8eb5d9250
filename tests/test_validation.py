import subprocess
import sys

import pytest
import torch

import flexpbs


def _qkv(b=1, hq=4, hkv=2, n=32, d=16, dv=None, dtype=torch.float32):
    return (
        torch.randn(b, hq, n, d, dtype=dtype),
        torch.randn(b, hkv, n, d, dtype=dtype),
        torch.randn(b, hkv, n, dv or d, dtype=dtype),
    )


def _replace(qkv, index, value):
    items = list(qkv)
    items[index] = value
    return items


@pytest.mark.parametrize(
    "mutate, error, name",
    [
        (lambda t: _replace(t, 0, t[0][0]), ValueError, "query"),
        (lambda t: _replace(t, 1, t[1][..., None]), ValueError, "key"),
        (lambda t: _replace(t, 2, t[2][0, 0]), ValueError, "value"),
        (lambda t: _replace(t, 0, t[0].tolist()), TypeError, "query"),
        (lambda t: _replace(t, 1, None), TypeError, "key"),
        (lambda t: _replace(t, 0, torch.randn(1, 3, 32, 16)), ValueError, "query heads"),
        (lambda t: _replace(t, 1, torch.randn(2, 2, 32, 16)), ValueError, "key batch"),
        (lambda t: _replace(t, 2, torch.randn(1, 2, 31, 16)), ValueError, "value seq_len"),
        (lambda t: _replace(t, 1, torch.randn(1, 2, 24, 16)), ValueError, "key seq_len 24 must be >= query"),
        (
            lambda t: _replace(t, 2, torch.randn(1, 2, 40, 16)),
            ValueError,
            "value seq_len 40 does not match key",
        ),
        (lambda t: _replace(t, 1, torch.randn(1, 2, 32, 8)), ValueError, "key head_dim"),
        (lambda t: _replace(t, 2, torch.randn(1, 4, 32, 16)), ValueError, "value heads"),
        (lambda t: _replace(t, 1, t[1].double()), TypeError, "key"),
        (lambda t: _replace(t, 2, t[2].half()), TypeError, "value dtype"),
        (lambda t: _replace(t, 0, t[0].to(torch.int32)), TypeError, "query"),
        (lambda t: _replace(t, 1, t[1].to(torch.int64)), TypeError, "key"),
        (lambda t: _replace(t, 1, t[1].to("meta")), ValueError, "key device"),
        (lambda t: _replace(t, 0, t[0].requires_grad_()), ValueError, "query requires grad"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(mutate, error, name):
    with pytest.raises(error, match=name):
        flexpbs.attention(*mutate(_qkv()))


def test_zero_kv_heads_rejected():
    q = torch.randn(1, 2, 8, 16)
    kv = torch.randn(1, 0, 8, 16)
    with pytest.raises(ValueError, match="key heads"):
        flexpbs.attention(q, kv, kv)


def test_requires_grad_allowed_under_no_grad():
    q, k, v = _qkv()
    q.requires_grad_()
    with torch.no_grad():
        out = flexpbs.attention(q, k, v)
    assert out.shape == (1, 4, 32, 16)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_advice_for_inputs_requiring_grad_works_on_the_pbs_path(mode):
    """The error for inputs requiring grad advises no_grad or inference_mode; followed, a PBS call
    (N > segment_size, a length FlexAttention gets unpadded) must run, not fail in FlexAttention."""
    q, k, v = _qkv(n=1024, d=64)
    want = flexpbs.attention(q, k, v, block_size=64, segment_size=128, threshold=0.5)
    for x in (q, k, v):
        x.requires_grad_()
    with mode():
        got, stats = flexpbs.attention(
            q, k, v, block_size=64, segment_size=128, threshold=0.5, return_stats=True
        )
    assert not stats.dense
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_size_alone_is_named_when_it_does_not_divide_the_default_segment():
    with pytest.raises(ValueError, match="block_size 100 does not divide segment_size 256.*segment_size=200"):
        flexpbs.attention(*_qkv(), block_size=100)
    assert flexpbs.attention(*_qkv(), block_size=100, segment_size=200).shape == (1, 4, 32, 16)


def test_block_size_is_checked_against_the_gpu_tiles_before_any_work():
    from flexpbs.sparse_attention import check_block_size

    check_block_size(torch.device("cpu"), 100)  # any block size runs on the CPU
    check_block_size(torch.device("cuda"), 96)
    with pytest.raises(ValueError, match="block_size must be a multiple of 16 on CUDA.*got 100"):
        check_block_size(torch.device("cuda"), 100)


def test_the_nn_module_is_reachable_after_import_flexpbs():
    """``import flexpbs`` alone gives ``flexpbs.nn.PBSAttention`` (a fresh interpreter: this test
    process may have imported flexpbs.nn already)."""
    code = "import flexpbs; print(type(flexpbs.nn.PBSAttention(threshold=0.5)).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "PBSAttention"
