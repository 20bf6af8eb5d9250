"""GPU: q/k ×1e3 with ×50 outlier channels (logits ~1e9-1e11): finiteness of plain FlexAttention, SDPA and flexpbs.

    PYTHONPATH=$PWD python bench/flex_large_logits.py
"""
import sys, torch
sys.path.insert(0, "bench")
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from checks import make_inputs
from flexpbs.sparse_attention import _compiled_flex_attention
import flexpbs
dev = torch.device("cuda")
q, k, v = make_inputs(1, 8, 2, 32768, 128, torch.bfloat16, dev, seed=4, magnitude=1e3, outliers=4, outlier_gain=50.0)
bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 32768, 32768, device=dev)
with torch._dynamo.config.patch(recompile_limit=512):
    o = _compiled_flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
print("plain flex causal finite:", torch.isfinite(o).all().item(), "non-finite rows:", (~torch.isfinite(o)).any(-1).sum().item())
s = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
print("SDPA finite:", torch.isfinite(s).all().item())
o2 = flexpbs.attention(q, k, v)
print("flexpbs finite:", torch.isfinite(o2).all().item(), "non-finite rows:", (~torch.isfinite(o2)).any(-1).sum().item())
