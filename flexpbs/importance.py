"""Key importance: how much attention the last block of queries pays to each key.

importance[j] = mean over the last ``block_size`` queries i (and, for gqa="shared", over the
query heads of j's KV group) of softmax_j(scale * q_i . k_j), the softmax taken in float32
over the keys of the complete segments only (no causal mask in this proxy). For a chunk (fewer
queries than keys) the rows are the chunk's last queries and the segments are laid on the keys.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from einops import rearrange

from flexpbs.lengths import SequenceLengths, last_queries
from flexpbs.limits import LIMITS


def last_block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Importance of every key of the complete segments.

    Args:
        query: ``[B, Hq, Nq, D]``, the queries at the last Nq key positions (Nq = N for prefill).
        key: ``[B, Hkv, N, D]``, Hq = G * Hkv, N >= Nq.
        block_size: the last ``min(block_size, Nq)`` queries are the proxy.
        segment_size: only the first ``floor(N / segment_size) * segment_size`` keys are scored.
        scale: logit scale.
        per_query_head: one importance row per query head instead of per KV head.
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`; ``query`` is then the
            ``[B, Hq, L, D]`` frame): each sequence's own last queries and complete segments.

    Returns:
        ``[B, Hp, Nc]`` float32, Nc = floor(N / segment_size) * segment_size, Hp = Hq if
        ``per_query_head`` else Hkv. Each row of each head sums to 1 before averaging. With
        ``lengths``, 0 past each sequence's complete segments.
    """
    batch, kv_heads, n_keys, _ = key.shape
    group = query.shape[1] // kv_heads
    n_complete = n_keys // segment_size * segment_size
    n_queries = query.shape[2]
    rows = min(block_size, n_queries)
    if lengths is None:
        q_last = query[:, :, n_queries - rows :]
        key_ok, row_ok, row_count = None, None, rows
    else:  # each sequence's last queries first (in order), unused rows after them
        used = lengths.n_queries.clamp(max=block_size)
        q_last = last_queries(query, lengths, block_size)
        row_ok = torch.arange(rows, device=query.device) < used[:, None]  # [B, rows]
        row_count = used.clamp_min(1)
        key_ok = torch.arange(n_complete, device=key.device) < lengths.complete_keys(segment_size)[:, None]
        row_ok = row_ok[:, None, None, :, None]  # [B, 1, 1, rows, 1]
        key_ok = key_ok[:, None, None, None, :]  # [B, 1, 1, 1, Nc]
        row_count = row_count.to(torch.float32)[:, None, None, None]
    q_last = rearrange(q_last, "b (k g) r d -> b k g r d", g=group)
    keys = key[:, :, :n_complete]

    total = torch.zeros(batch, kv_heads, group, n_complete, dtype=torch.float32, device=key.device)
    row_bytes = batch * group * max(n_complete, 1) * 4
    heads_step = max(1, LIMITS.step_bytes // (row_bytes * rows))
    rows_step = rows if heads_step > 1 else max(1, min(rows, LIMITS.step_bytes // row_bytes))
    for h0 in range(0, kv_heads, heads_step):
        k_chunk = keys[:, h0 : h0 + heads_step].float()
        for r0 in range(0, rows, rows_step):
            q_chunk = q_last[:, h0 : h0 + heads_step, :, r0 : r0 + rows_step].float()
            logits = torch.einsum("bkgrd,bknd->bkgrn", q_chunk, k_chunk) * scale
            if key_ok is not None:
                logits = logits.masked_fill(~key_ok, float("-inf"))
                # a sequence without complete segments has no column: its rows softmax to NaN
                probs = logits.softmax(dim=-1).nan_to_num_(0.0) * row_ok[:, :, :, r0 : r0 + rows_step]
            else:
                probs = logits.softmax(dim=-1)
            total[:, h0 : h0 + heads_step] += probs.sum(dim=-2)
    importance = total / row_count
    if per_query_head:
        return rearrange(importance, "b k g n -> b (k g) n")
    return importance.mean(dim=2)


@functools.cache
def triton_importable() -> bool:
    """Whether the triton package can be imported (looked up, not imported)."""
    return importlib.util.find_spec("triton") is not None


def resolve_importance_kernel(kernel: str, device: torch.device) -> str:
    """Which importance pass runs: ``"triton"`` or ``"torch"``.

    ``"auto"`` takes the Triton kernel for CUDA tensors when Triton is importable. ``"triton"`` on CPU
    tensors needs the Triton interpreter (TRITON_INTERPRET=1, set before Triton is imported).
    """
    if kernel == "torch":
        return "torch"
    usable = triton_importable() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if kernel == "triton" and not usable:
        raise ValueError(
            "importance_kernel='triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1 "
            f"for CPU tensors); got tensors on {device}"
        )
    return "triton" if usable and (kernel == "triton" or device.type == "cuda") else "torch"


def key_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    per_query_head: bool,
    kernel: str,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """:func:`last_block_importance` through the implementation ``kernel`` names ("triton", "torch")."""
    args = dict(block_size=block_size, segment_size=segment_size, scale=scale, per_query_head=per_query_head)
    if kernel == "triton":
        from flexpbs.kernels.importance import triton_last_block_importance

        return triton_last_block_importance(query, key, **args, lengths=lengths)
    return last_block_importance(query, key, **args, lengths=lengths)
