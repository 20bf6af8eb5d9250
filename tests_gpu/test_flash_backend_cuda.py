"""GPU checks of ``backend="flash"`` (FlexAttention's FLASH backend, flash-attn-4): ``pytest tests_gpu``.

Needs the optional ``flash-attn-4`` package; without it this module is skipped as a whole.
"""

import pytest
import torch

import flexpbs
from flexpbs import reference
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")
pytest.importorskip("flash_attn.cute", reason="backend='flash' needs flash-attn-4")


@pytest.mark.parametrize(
    "batch, kv_heads, group, seq_len, n_queries, gqa, head_dim",
    [
        (1, 2, 4, 8192, 8192, "shared", 128),  # whole blocks
        (2, 2, 2, 5000, 5000, "per_head", 128),  # a partial last block
        (1, 2, 4, 8200, 3000, "shared", 128),  # a chunk: queries at the last positions
        (1, 3, 3, 6000, 6000, "shared", 64),  # head dim 64 (SmolLM2's heads: 9 query, 3 KV)
        (2, 2, 2, 4200, 1500, "per_head", 64),
    ],
)
def test_flash_backend_matches_triton_and_the_reference(
    batch, kv_heads, group, seq_len, n_queries, gqa, head_dim
):
    case = Case(
        batch=batch,
        kv_heads=kv_heads,
        group=group,
        seq_len=seq_len,
        head_dim=head_dim,
        block_size=128,
        segment_size=256,
        seed=seq_len,
        sharpness=2.0,
    )
    q, k, v = (x.cuda() for x in make_qkv(case, torch.bfloat16))
    q = q[:, :, seq_len - n_queries :]
    options = dict(gqa=gqa, min_seq_len=0, return_stats=True)
    out, stats = flexpbs.attention(q, k, v, backend="flash", **options)
    triton_out, triton_stats = flexpbs.attention(q, k, v, backend="triton", **options)
    assert (stats.backend, triton_stats.backend) == ("flash", "triton")
    assert torch.equal(stats.tiles, triton_stats.tiles)  # selection does not depend on it
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), triton_out.float(), rtol=0, atol=3e-2)
    # float32 attention over exactly the reported tiles, causal on original positions
    mask = reference.token_mask(stats.tiles, stats.key_positions, 128, n_queries)
    want = reference.masked_attention(q, k, v, mask, head_dim**-0.5)
    torch.testing.assert_close(out.float().cpu(), want, rtol=0, atol=3e-2)
    # backend="auto" takes flash here (Hopper, flash-attn-4 installed) and gives the same result
    auto, auto_stats = flexpbs.attention(q, k, v, **options)
    assert auto_stats.backend == "flash"
    assert torch.equal(auto, out)
