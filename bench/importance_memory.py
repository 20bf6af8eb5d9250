"""Peak extra GPU memory of the importance pass, Triton kernel vs PyTorch path (B=1, Hq=32, Hkv=8, D=128, bf16).

    python bench/importance_memory.py
"""

import torch

from flexpbs.importance import key_importance

for n in (32768, 131072):
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    row = [f"N={n}", f"q+k {(q.numel() + k.numel()) * 2 / 2**20:.0f} MiB"]
    for scorer in ("triton", "torch"):
        key_importance(q, k, block_size=128, segment_size=256, scale=128**-0.5, per_query_head=False, kernel=scorer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        key_importance(q, k, block_size=128, segment_size=256, scale=128**-0.5, per_query_head=False, kernel=scorer)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        row.append(f"{scorer}: peak extra {extra:.1f} MiB (output {8 * n * 4 / 2**20:.1f} MiB)")
    print(" | ".join(row))
    del q, k
