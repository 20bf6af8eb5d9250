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
        (lambda t: _replace(t, 2, torch.randn(1, 2, 40, 16)), ValueError, "value seq_len 40 does not match key"),
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
