"""flexpbs.nn.PBSAttention: the module equals the function, eagerly and inside torch.compile."""

import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flexpbs
from flexpbs import PBSConfig
from flexpbs.nn import PBSAttention
from tests.helpers import Case, make_qkv

# One shape for the compiled tests here and in test_transformers.py (4 query heads, 2 KV heads,
# head dim 32, block 64): the statically compiled FlexAttention graphs are shared.
OPTIONS = dict(block_size=64, segment_size=128, threshold=0.9)


def qkv(seq_len, seed=0):
    case = Case(
        batch=1,
        kv_heads=2,
        group=2,
        seq_len=seq_len,
        head_dim=32,
        block_size=64,
        segment_size=128,
        seed=seed,
        sharpness=3.0,
    )
    return make_qkv(case)


def test_module_equals_function():
    q, k, v = qkv(600)
    module = PBSAttention(**OPTIONS)
    assert module.config == PBSConfig(**OPTIONS)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    want = flexpbs.attention(q, k, v, **OPTIONS)
    assert torch.equal(module(q, k, v), want)
    assert torch.equal(PBSAttention(PBSConfig(**OPTIONS))(q, k, v), want)
    valid = torch.ones(1, 600, dtype=torch.bool)
    valid[0, :10] = False
    chunk = q[:, :, 300:]
    assert torch.equal(
        module(chunk, k, v, valid), flexpbs.attention(chunk, k, v, valid_keys=valid, **OPTIONS)
    )
    assert "threshold=0.9" in repr(module)


def test_module_validates_options():
    with pytest.raises(ValueError, match="not both"):
        PBSAttention(PBSConfig(), threshold=0.5)
    with pytest.raises(TypeError, match="config must be a PBSConfig"):
        PBSAttention({"threshold": 0.5})
    with pytest.raises(ValueError, match="threshold"):
        PBSAttention(threshold=1.5)


class TinyAttentionModel(torch.nn.Module):
    """Projections around PBSAttention, like an attention layer of a model."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 32)
        self.attn = PBSAttention(**OPTIONS)

    def forward(self, q, k, v):
        return self.attn(self.q(q), k, v) * 2.0


def test_module_compiles_fullgraph_and_stays_shape_generic():
    torch.manual_seed(0)
    model = TinyAttentionModel().eval()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for seq_len in (600, 700, 650):  # the second length makes the outer graph dynamic
            q, k, v = qkv(seq_len, seed=seq_len)
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=0, atol=1e-5)
    # flexpbs runs behind the custom op flexpbs::attention, so the outer graph is compiled
    # once static and once shape-generic; FlexAttention's own per-bucket graphs are not frames here.
    assert counter.frame_count == 2


def test_attention_function_compiles_fullgraph_over_lengths():
    """flexpbs.attention itself is the custom op flexpbs::attention under compile: no graph break."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(
        lambda q, k, v: flexpbs.attention(q, k, v, **OPTIONS), fullgraph=True, backend=counter
    )
    for seq_len in (600, 700, 650):
        q, k, v = qkv(seq_len, seed=seq_len)
        torch.testing.assert_close(
            compiled(q, k, v), flexpbs.attention(q, k, v, **OPTIONS), rtol=0, atol=1e-5
        )
    assert counter.frame_count == 2  # static, then shape-generic


def test_custom_op_takes_chunks_and_valid_keys_under_compile():
    """flexpbs::attention accepts Nq < N and the optional valid_keys tensor (fake kernel included)."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(
        lambda q, k, v, valid: flexpbs.attention(q, k, v, valid_keys=valid, **OPTIONS),
        fullgraph=True,
        backend=counter,
    )
    q, k, v = qkv(600, seed=3)
    q = q[:, :, 300:]  # a chunk: the last 300 of 600 positions
    valid = torch.ones(1, 600, dtype=torch.bool)
    valid[0, :50] = False  # left padding
    got = compiled(q, k, v, valid)
    assert counter.frame_count == 1 and got.shape == q.shape
    torch.testing.assert_close(
        got, flexpbs.attention(q, k, v, valid_keys=valid, **OPTIONS), rtol=0, atol=1e-6
    )


def test_stats_are_refused_inside_compile():
    q, k, v = qkv(600, seed=2)
    compiled = torch.compile(lambda q, k, v: flexpbs.attention(q, k, v, return_stats=True), fullgraph=True)
    with pytest.raises(Exception, match="return_stats"):
        compiled(q, k, v)


def test_importing_flexpbs_does_not_import_transformers():
    code = (
        "import sys, flexpbs, flexpbs.nn, flexpbs.integrations; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
