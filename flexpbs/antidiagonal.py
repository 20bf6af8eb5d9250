"""Antidiagonal block scores (PBS-Attn+): XAttention's estimator on the permuted keys.

Mean pooling scores a tile by the dot product of its mean query and mean key, which averages away a
single strongly matching token. The antidiagonal estimator keeps token-level evidence at a stride S:
within a query block, each group of S consecutive queries forms one strided row whose logit against a
group of S consecutive (permuted) keys is the sum of q . k along the group's antidiagonal,

    l(row g of block i, column h of block j) = scale / S * sum_t q[i*B + g*S + S-1-t] . k_p[j*B + h*S + t],

a softmax over the strided columns of the candidate blocks (earlier segments) normalises each row, and
a tile's score is the mass its strided columns get, averaged over the block's strided rows that hold a
query. Scores of a query block sum to 1 over its candidates, like mean pooling's, and the same
cumulative-threshold selection follows (:func:`flexpbs.selection.select_tiles`). Queries outside the
chunk (dummy rows aligning it to blocks) and keys past the end count as zeros.

:func:`tile_scores` is the PyTorch path, the reference of the fused Triton kernel
(:mod:`flexpbs.kernels.antidiagonal`) and its fallback: it holds the strided logits of a few query
blocks at a time (``LIMITS.step_bytes``), never ``[N, N / S]``; the kernel holds none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from flexpbs.importance import triton_importable
from flexpbs.lengths import SequenceLengths
from flexpbs.limits import LIMITS


def strided_rows(query: torch.Tensor, first_row: int, end_row: int, lead: int, stride: int) -> torch.Tensor:
    """Aligned query rows ``first_row..end_row`` as strided rows: ``[B, H, (end - first) / S, S * D]``,
    each S consecutive rows concatenated in reverse order (the antidiagonal's pairing); rows before
    ``lead`` or past the queries are zeros."""
    n_queries = query.shape[2]
    start, stop = first_row - lead, end_row - lead
    rows = query[:, :, max(start, 0) : min(stop, n_queries)]
    rows = F.pad(rows, (0, 0, max(-start, 0), max(stop - n_queries, 0)))
    grouped = rows.unflatten(2, (-1, stride)).flip(-2)
    return grouped.flatten(-2).float()


def strided_columns(key_p: torch.Tensor, columns: int, block_size: int, stride: int) -> torch.Tensor:
    """The first ``columns`` key blocks as strided columns: ``[B, H, columns * B / S, S * D]``."""
    keys = key_p[:, :, : columns * block_size]
    return keys.unflatten(2, (-1, stride)).flatten(-2).float()


def valid_strided_rows(
    first_block: int,
    end_block: int,
    block_size: int,
    stride: int,
    first_query: torch.Tensor | int,
    end_query: torch.Tensor | int,
    device: torch.device,
) -> torch.Tensor:
    """``[B or 1, blocks, B / S]`` float32: 1 where strided row g of a block holds a query (aligned rows
    ``first_query..end_query``, per sequence when given as ``[B]`` tensors), else 0."""
    starts = torch.arange(first_block * block_size, end_block * block_size, stride, device=device)
    first = torch.as_tensor(first_query, device=device).reshape(-1, 1)
    end = torch.as_tensor(end_query, device=device).reshape(-1, 1)
    valid = (starts[None] + stride > first) & (starts[None] < end)
    return valid.to(torch.float32).unflatten(1, (end_block - first_block, block_size // stride))


def tile_scores(
    query: torch.Tensor,
    key_p: torch.Tensor,
    *,
    first_block: int,
    end_block: int,
    columns: int,
    bias: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    lead: int,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """Tile scores of query blocks ``first_block..end_block`` over the first ``columns`` key blocks.

    Args:
        query: ``[B, Hq, Nq, D]`` queries of these heads (aligned rows: ``lead`` dummy rows first;
            with ``lengths``, a frame).
        key_p: ``[B, Hp, N, D]`` permuted keys, Hq = G * Hp.
        bias: ``[blocks, columns]`` float32, 0 on candidates, -inf elsewhere (every row has one).
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`).

    Returns:
        ``[B, Hp, blocks * G, columns]`` float32, rows ordered (query block, head in group) like
        :func:`flexpbs.selection.select_tiles`'s; 0 off the candidates.
    """
    batch, q_heads = query.shape[:2]
    group = q_heads // key_p.shape[1]
    per_block = block_size // stride
    keys = strided_columns(key_p, columns, block_size, stride)  # [B, Hp, C*R, S*D]
    if lengths is None:
        first_query, end_query = lead, lead + query.shape[2]
    else:
        first_query, end_query = lengths.n_keys - lengths.n_queries, lengths.n_keys
    out = []
    # strided logits of a few query blocks at a time: [B, Hp, G, blocks * R, C * R] float32
    row_bytes = batch * q_heads * per_block * columns * per_block * 4 * 3
    step = max(1, LIMITS.step_bytes // max(row_bytes, 1))
    for b0 in range(first_block, end_block, step):
        b1 = min(b0 + step, end_block)
        rows = strided_rows(query, b0 * block_size, b1 * block_size, lead, stride)
        rows = rearrange(rows, "b (k g) r e -> b k g r e", g=group)
        logits = torch.einsum("bkgre,bkce->bkgrc", rows, keys) * (scale / stride)
        row_bias = bias[b0 - first_block : b1 - first_block].repeat_interleave(per_block, dim=0)
        row_bias = row_bias.repeat_interleave(per_block, dim=1)
        probs = (logits + row_bias).softmax(dim=-1)  # every row has a candidate column
        probs = probs.unflatten(-1, (columns, per_block)).sum(-1)  # [B, Hp, G, rows, C]
        probs = probs.unflatten(-2, (b1 - b0, per_block))  # [B, Hp, G, blocks, R, C]
        valid = valid_strided_rows(b0, b1, block_size, stride, first_query, end_query, query.device)
        weights = valid / valid.sum(-1, keepdim=True).clamp_min(1)  # mean over the block's query rows
        scores = torch.einsum("bkgirc,bir->bkgic", probs, weights.expand(batch, -1, -1))
        out.append(rearrange(scores, "b k g i c -> b k (i g) c"))
    return torch.cat(out, dim=2)


def antidiagonal_scores(query: torch.Tensor, key_p: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`tile_scores` (same arguments), by the Triton kernel on CUDA when Triton is importable,
    else by the PyTorch path."""
    if query.is_cuda and triton_importable():
        from flexpbs.kernels.antidiagonal import triton_tile_scores

        return triton_tile_scores(query, key_p, **kwargs)
    return tile_scores(query, key_p, **kwargs)
