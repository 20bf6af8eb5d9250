"""GPU-only checks of the Triton importance kernel (not collected by the CPU suite): ``pytest tests_gpu``."""

import pytest
import torch

from flexpbs.importance import last_block_importance
from flexpbs.kernels.importance import triton_last_block_importance
from tests.helpers import Case, make_qkv

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")

TOL = dict(rtol=1e-4, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize(
    "dtype, head_dim",
    [
        (torch.float32, 128),
        (torch.float32, 256),
        (torch.bfloat16, 128),
        (torch.float16, 64),
        (torch.bfloat16, 100),
        (torch.bfloat16, 256),
    ],
)
def test_long_input_with_default_key_splits(dtype, head_dim):
    case = Case(
        batch=2, kv_heads=2, group=4, seq_len=20000, head_dim=head_dim, block_size=128, segment_size=256, seed=5
    )
    q, k, _ = make_qkv(case, dtype)
    q, k = q.cuda(), k.cuda()
    args = dict(block_size=128, segment_size=256, scale=head_dim**-0.5)
    for per_query_head in (False, True):  # long inputs: the kernel splits keys across programs
        got = triton_last_block_importance(q, k, **args, per_query_head=per_query_head)
        want = last_block_importance(q, k, **args, per_query_head=per_query_head)
        torch.testing.assert_close(got, want, **TOL)
