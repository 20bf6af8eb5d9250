"""The PBS pipeline on validated inputs: importance, permutation, selection, attention, per head chunk.

Stages in order, each taking and returning tensors (:mod:`flexpbs.importance`, :mod:`flexpbs.permutation`,
:mod:`flexpbs.selection`, :mod:`flexpbs.block_mask` inside :mod:`flexpbs.sparse_attention`), with the
options beyond the paper (:mod:`flexpbs.head_guard`, :mod:`flexpbs.last_block`) and the dense path for
short inputs. Memory is bounded by running a few KV heads at a time (:func:`kv_heads_per_chunk`).
"""

from __future__ import annotations

import torch

from flexpbs import head_guard
from flexpbs.config import PBSConfig, PBSStats
from flexpbs.dense import dense_causal_attention
from flexpbs.importance import key_importance, resolve_importance_kernel
from flexpbs.last_block import last_block_tiles
from flexpbs.lengths import SequenceLengths
from flexpbs.limits import LIMITS
from flexpbs.permutation import identity_permutation, permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention
from flexpbs.tile_grid import cdiv, density

# Bytes one tile costs in selection and BlockMask tables (bool tiles, full/partial masks, two int32
# index lists, argsort).
_TABLE_BYTES_PER_TILE = 14


def pbs_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: PBSConfig,
    return_stats: bool,
    lengths: SequenceLengths | None = None,
    chunk_heads: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, PBSStats]:
    """The pipeline on validated inputs, eagerly; Nq <= N; ``cfg`` resolved (:mod:`flexpbs.dispatch`).

    With ``lengths`` the inputs are a frame of sequences of different lengths (:mod:`flexpbs.lengths`:
    ``query [B, Hq, L, D]``, ``key``/``value [B, Hkv, L, D]``): every sequence runs in the same calls,
    short ones with all their causal tiles, and the stats (``dense=False``) cover the whole frame.
    ``chunk_heads=False``: every head in one pass (the caller chose the heads, as
    :func:`flexpbs.varlen.frame_attention` does)."""
    # Inference only: inputs that require grad (under no_grad or inference_mode) must not reach
    # FlexAttention, whose CPU kernel refuses them whatever the grad mode.
    query, key, value = query.detach(), key.detach(), value.detach()
    kernel = resolve_importance_kernel(cfg.importance_kernel, query.device)
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    softmax_scale = cfg.softmax_scale(head_dim)
    perm_heads = q_heads if cfg.gqa == "per_head" else kv_heads

    if lengths is None and (cfg.runs_dense(n_keys) or n_queries == 0):
        out = dense_causal_attention(query, key, value, softmax_scale)
        if not return_stats:
            return out
        return out, _dense_stats(batch, q_heads, perm_heads, n_queries, n_keys, cfg.block_size, query.device)

    heads_per_chunk = kv_heads
    if chunk_heads:
        heads_per_chunk = kv_heads_per_chunk(query, key, value, cfg.block_size, cfg.gqa == "per_head")
    if heads_per_chunk == kv_heads:
        out, tiles, perm, sorted_rows = _pbs_heads(query, key, value, cfg, kernel, softmax_scale, lengths)
    else:
        out, tiles, perm, sorted_rows = _pbs_head_chunks(
            query, key, value, cfg, kernel, softmax_scale, heads_per_chunk, return_stats, lengths
        )
    if not return_stats:
        return out
    return out, PBSStats(
        tiles=tiles,
        key_positions=perm,
        density=density(tiles),
        dense=False,
        importance_kernel=kernel if cfg.uses_importance() else None,
        sorted_rows=sorted_rows,
        backend=cfg.backend,
    )


def importance_pass(
    query: torch.Tensor,
    key: torch.Tensor,
    cfg: PBSConfig,
    kernel: str,
    scale: float,
    lengths: SequenceLengths | None = None,
) -> torch.Tensor:
    """The importance pass of a call with ``cfg`` (:func:`flexpbs.importance.key_importance` by
    ``kernel``): ``[B, Hp, Nc]`` float32, one row per query head when keys are sorted per query head."""
    return key_importance(
        query,
        key,
        block_size=cfg.block_size,
        segment_size=cfg.segment_size,
        scale=scale,
        per_query_head=cfg.gqa == "per_head" and cfg.key_order == "sorted",
        kernel=kernel,
        lengths=lengths,
    )


def _pbs_head_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: PBSConfig,
    importance_kernel: str,
    scale: float,
    kv_heads_per_chunk: int,
    keep_stats: bool,
    lengths: SequenceLengths | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_pbs_heads` a few KV heads (and their query heads) at a time, to bound extra memory.

    Every stage works per KV head: the same tiles and permutations as one call (the output may differ
    in rounding on the GPU, where FlexAttention is compiled for fewer heads). Tiles and permutations
    are kept only if ``keep_stats``.
    """
    group = query.shape[1] // key.shape[1]
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    tiles_parts, perm_parts, sorted_parts = [], [], []
    for k0 in range(0, key.shape[1], kv_heads_per_chunk):
        kv_chunk = slice(k0, k0 + kv_heads_per_chunk)
        q_chunk = slice(k0 * group, (k0 + kv_heads_per_chunk) * group)
        out_chunk, tiles, perm, sorted_rows = _pbs_heads(
            query[:, q_chunk], key[:, kv_chunk], value[:, kv_chunk], cfg, importance_kernel, scale, lengths
        )
        out[:, q_chunk] = out_chunk
        del out_chunk
        if keep_stats:
            tiles_parts.append(tiles)
            perm_parts.append(perm)
            sorted_parts.append(sorted_rows)
    if not keep_stats:
        return out, None, None, None
    return out, *(torch.cat(parts, dim=1) for parts in (tiles_parts, perm_parts, sorted_parts))


def _pbs_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: PBSConfig,
    importance_kernel: str,
    scale: float,
    lengths: SequenceLengths | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance, permutation, selection and sparse attention for some heads (of a frame with ``lengths``).

    Returns:
        ``(out [B, Hq, Nq, Dv], tiles [B, Hq, nbq, nb] bool, perm [B, Hp, N] int64,
        sorted_rows [B, Hp] bool)``.
    """
    batch, n_keys = key.shape[0], key.shape[2]
    importance = None
    if cfg.uses_importance():
        importance = importance_pass(query, key, cfg, importance_kernel, scale, lengths)
    if cfg.key_order == "original":  # identity order is shared by all heads: no K/V copies
        perm = identity_permutation(batch, key.shape[1], n_keys, query.device)
        key_p, value_p = key, value
    else:
        ranked = importance
        if lengths is not None:  # tails and dense sequences keep their order (a stable sort of equals)
            complete = lengths.complete_keys(cfg.segment_size)[:, None, None]
            ranked = importance.masked_fill(
                torch.arange(importance.shape[-1], device=query.device) >= complete, float("-inf")
            )
        perm = segment_permutation(ranked, n_keys, cfg.segment_size)
        key_p, value_p = permute_kv(key, value, perm)
    select = dict(
        block_size=cfg.block_size,
        segment_size=cfg.segment_size,
        threshold=cfg.threshold,
        scale=scale,
        lengths=lengths,
        estimator=cfg.estimator,
        stride=cfg.antidiagonal_stride,
    )
    tiles = select_tiles(query, key_p, perm, **select)
    sorted_rows = torch.full(perm.shape[:2], cfg.key_order == "sorted", device=query.device)
    if cfg.max_shrink is not None:  # head guard: the original order where sorting shrinks the selection
        identity = identity_permutation(batch, perm.shape[1], n_keys, query.device)
        tiles_original = select_tiles(query, key, identity[:, : key.shape[1]], **select)
        sorted_rows = head_guard.sorted_rows(tiles, tiles_original, perm.shape[1], cfg.max_shrink)
        perm, tiles = head_guard.mix_orders(sorted_rows, perm, identity, tiles, tiles_original)
        key_p, value_p = permute_kv(key, value, perm)
    if cfg.exact_last_block:  # the block of the last query trusts the exact mass, not the pooled one
        last_row = last_block_tiles(
            importance,
            perm,
            block_size=cfg.block_size,
            segment_size=cfg.segment_size,
            threshold=cfg.threshold,
            lengths=lengths,
        ).repeat_interleave(query.shape[1] // perm.shape[1], dim=1)
        if lengths is None:
            tiles[:, :, -1] |= last_row
        else:  # each sequence's own last query block
            rows = torch.arange(tiles.shape[2], device=tiles.device)
            at_last = rows == lengths.last_query_block(cfg.block_size)[:, None]
            tiles |= at_last[:, None, :, None] & last_row[:, :, None, :] & ~lengths.dense[:, None, None, None]
    out = sparse_attention(
        query,
        key_p,
        value_p,
        tiles,
        perm,
        block_size=cfg.block_size,
        segment_size=cfg.segment_size,
        scale=scale,
        backend=cfg.backend,
    )
    return out, tiles, perm, sorted_rows


def kv_heads_per_chunk(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    per_query_head: bool,
    frames_built_per_chunk: bool = False,
) -> int:
    """KV heads the pipeline processes together: all of them, unless the extra memory they need
    (gathered K/V, tile tables and BlockMask index lists, a chunk's output) would exceed
    ``max(LIMITS.min_chunk_bytes, LIMITS.chunk_share x the q/k/v bytes)`` (:mod:`flexpbs.limits`), or
    the chunk's tile table would reach ``LIMITS.max_table_tiles`` (the kernel may index it with int32);
    then the largest divisor of Hkv that fits both (one KV head at least, if only the memory budget is
    exceeded).

    ``frames_built_per_chunk``: q/k/v are the frames of a batch (:func:`flexpbs.varlen.frame_attention`),
    built one chunk at a time rather than whole: a chunk's frames count in its memory, and the budget
    grows by half the whole frames' bytes, so fewer, larger chunks run while the peak stays below that
    of whole frames with one-head chunks (``python -m bench traffic``'s batches: 9.7 and 6.2 GB
    beyond q/k/v, 24.7 and 14.0 GB with whole frames at 502ea5e)."""
    batch, q_heads, n_queries, _ = query.shape
    kv_heads, group, n_keys = key.shape[1], q_heads // key.shape[1], key.shape[2]
    n_blocks = cdiv(n_keys, block_size)
    q_blocks = n_blocks - (n_keys - n_queries) // block_size  # query blocks aligned to key blocks
    tiles_per_kv_head = group * batch * q_blocks * n_blocks
    if tiles_per_kv_head >= LIMITS.max_table_tiles:
        raise ValueError(
            f"the tile table of one KV head ({batch} sequences x {group} query heads x {q_blocks} x "
            f"{n_blocks} blocks) has >= 2^31 entries, beyond FlexAttention's int32 indexing: use a "
            f"smaller batch or a larger block_size"
        )
    copies = group if per_query_head else 1  # gqa="per_head" gathers K/V once per query head
    kv_copy = copies * (key[:, :1].numel() + value[:, :1].numel()) * key.element_size()
    tables = tiles_per_kv_head * _TABLE_BYTES_PER_TILE
    out_chunk = group * batch * n_queries * value.shape[-1] * value.element_size()
    inputs = sum(x.numel() * x.element_size() for x in (query, key, value))
    budget = max(LIMITS.min_chunk_bytes, int(inputs * LIMITS.chunk_share))
    if kv_heads * (kv_copy + tables) <= budget and kv_heads * tiles_per_kv_head < LIMITS.max_table_tiles:
        return kv_heads
    per_head = kv_copy + tables + out_chunk
    if frames_built_per_chunk:
        per_head += inputs // kv_heads
        budget += inputs // 2
    fits = [
        d
        for d in range(1, kv_heads + 1)
        if kv_heads % d == 0 and d * per_head <= budget and d * tiles_per_kv_head < LIMITS.max_table_tiles
    ]
    return max(fits, default=1)


def kv_heads_per_chunk_of_size(
    batch: int,
    q_heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    block_size: int,
    per_query_head: bool,
    frames_built_per_chunk: bool = False,
) -> int:
    """:func:`kv_heads_per_chunk` of inputs of these sizes (as many queries as keys, ``length``),
    asked without memory (meta tensors)."""

    def meta(heads: int, dim: int) -> torch.Tensor:
        return torch.empty(batch, heads, length, dim, dtype=dtype, device="meta")

    q, k, v = meta(q_heads, head_dim), meta(kv_heads, head_dim), meta(kv_heads, value_dim)
    return kv_heads_per_chunk(q, k, v, block_size, per_query_head, frames_built_per_chunk)


def _dense_stats(
    batch: int,
    q_heads: int,
    perm_heads: int,
    n_queries: int,
    n_keys: int,
    block_size: int,
    device: torch.device,
) -> PBSStats:
    n_blocks = cdiv(n_keys, block_size)
    first_query_block = (n_keys - n_queries) // block_size if n_queries else n_blocks
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()[first_query_block:]
    tiles = causal.expand(batch, q_heads, *causal.shape).contiguous()
    return PBSStats(
        tiles=tiles,
        key_positions=identity_permutation(batch, perm_heads, n_keys, device),
        density=torch.ones(batch, q_heads, device=device),
        dense=True,
    )
