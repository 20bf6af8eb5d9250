"""``flexpbs.attention``: validation, options, the dense fallback and the PBS pipeline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from flexpbs.config import PBSConfig, PBSStats
from flexpbs.head_guard import keep_sorted_order, mix_orders
from flexpbs.importance import key_importance, resolve_scorer
from flexpbs.last_block import last_block_tiles
from flexpbs.padding import check_valid_keys, padded_attention
from flexpbs.permutation import identity_permutation, permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.dense import dense_causal_attention
from flexpbs.dispatch import resolve
from flexpbs.sparse_attention import check_block_size, sparse_attention

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Extra memory the pipeline may always use (below it, no head chunking), and the bytes one tile costs
# in selection and BlockMask tables (bool tiles, full/partial masks, two int32 index lists, argsort).
_MIN_CHUNK_BYTES = 2**30
_TABLE_BYTES_PER_TILE = 14
_MAX_TABLE_TILES = 2**31  # mask_mod table lookups may use int32 indices (FLEX_NOTES)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    valid_keys: torch.Tensor | None = None,
    config: PBSConfig | None = None,
    return_stats: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, PBSStats | list[PBSStats]]:
    """Causal prefill attention with Permuted Block-Sparse selection (PBS-Attn).

    Keys are reordered by importance inside fixed segments, tiles are selected by cumulative
    pooled attention mass, and only those tiles are computed by compiled FlexAttention with the
    causal mask evaluated on original positions. For Nq == N, the same conventions as
    ``scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``.

    Chunked prefill (Nq < N): the queries are the LAST Nq of the N key positions (the earlier keys
    come from a cache), so query i sits at key position ``N - Nq + i`` and attends keys ``<=`` that
    position: the causal mask is aligned bottom-right, like flash-attn and
    ``torch.nn.attention.bias.causal_lower_right``, NOT like SDPA's ``is_causal=True`` (top-left).

    Args:
        query: ``[B, Hq, Nq, D]`` float16, bfloat16 or float32.
        key: ``[B, Hkv, N, D]``, N >= Nq, Hq a multiple of Hkv, same dtype and device as ``query``.
        value: ``[B, Hkv, N, Dv]``.
        valid_keys: optional ``[B, N]`` bool (or 0/1 integer) on the query's device, True (1)
            where key j of sequence b is a real token, False (0) where it is padding (HF's
            ``attention_mask`` convention; the opposite of ``nn.MultiheadAttention``'s
            ``key_padding_mask``). Sequence b then gives exactly what a call on its real tokens
            alone gives (its real keys in order; its real queries are the real ones among the last
            Nq positions); query rows at padded positions return zeros. Left, right and inner
            padding alike. Each sequence with padding runs on its own (the lengths are read on the
            host: not CUDA-graph capturable); sequences without padding run batched.
        config: a :class:`PBSConfig`, or None to build one from ``options``.
        **options: :class:`PBSConfig` fields (``threshold=0.9``, ``backend="triton"``, ...); not
            together with ``config`` (ValueError).
        return_stats: also return a :class:`PBSStats`; with ``valid_keys``, a list of B
            PBSStats, element b describing sequence b's call on its real tokens.

    Returns:
        ``[B, Hq, Nq, Dv]`` in ``query.dtype``, rows in the original query order; with
        ``return_stats``, a tuple ``(output, stats)``.

    Raises:
        TypeError: an input is not a tensor, has a non-float or mismatched dtype, ``valid_keys``
            is not bool or integer, or an option has the wrong type.
        ValueError: wrong ranks, mismatched batch/length/head dim/device, N < Nq, Hq not a
            multiple of Hkv, inputs requiring grad (inference only), ``valid_keys`` of the wrong
            shape or device or with values other than 0 and 1, or an option out of range.

    Inputs of at most ``segment_size`` keys (or fewer than ``min_seq_len``) run dense causal
    SDPA (bottom-right aligned). Inference only: no backward pass.

    Inside ``torch.compile`` the pipeline is the opaque custom op ``flexpbs::attention`` (no graph
    break, any dynamic length: FlexAttention's CPU template cannot compile a dynamic length, and CPU
    inductor cannot lower a mask_mod over tables computed in the same graph); behind it the eager
    pipeline runs. ``return_stats`` is then unsupported (ValueError).
    """
    cfg = PBSConfig.resolve(config, options)
    _check_inputs(query, key, value)
    check_block_size(query.device, cfg.block_size)
    if valid_keys is not None:
        check_valid_keys(valid_keys, key)
    if torch.compiler.is_compiling():
        if return_stats:
            raise ValueError("return_stats is not supported inside torch.compile; call eagerly")
        # "auto" options are resolved behind the op, on the real device
        return _attention_op(query, key, value, valid_keys, cfg.to_string())
    cfg = resolve(cfg, query, value)  # "auto" options; an unsupported backend fails before any work
    if valid_keys is not None:
        return padded_attention(query, key, value, valid_keys, cfg, _pbs_attention, return_stats)
    return _pbs_attention(query, key, value, cfg, return_stats)


def _pbs_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PBSConfig, return_stats: bool
) -> torch.Tensor | tuple[torch.Tensor, PBSStats]:
    """The pipeline on validated inputs without padding, eagerly; Nq <= N."""
    # Inference only: inputs that require grad (under no_grad or inference_mode) must not reach
    # FlexAttention, whose CPU kernel refuses them whatever the grad mode.
    query, key, value = query.detach(), key.detach(), value.detach()
    scorer_used = resolve_scorer(cfg.scorer, query.device)
    batch, q_heads, n_queries, head_dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    softmax_scale = cfg.scale if cfg.scale is not None else head_dim**-0.5
    perm_heads = q_heads if cfg.gqa == "per_head" else kv_heads

    if cfg.runs_dense(seq_len) or n_queries == 0:
        out = dense_causal_attention(query, key, value, softmax_scale)
        if not return_stats:
            return out
        return out, _dense_stats(
            batch, q_heads, perm_heads, n_queries, seq_len, cfg.block_size, query.device
        )

    heads_per_chunk = _kv_heads_per_chunk(query, key, value, cfg.block_size, cfg.gqa == "per_head")
    if heads_per_chunk == kv_heads:
        out, tiles, perm, sorted_rows = _pbs_heads(query, key, value, cfg, scorer_used, softmax_scale)
    else:
        out, tiles, perm, sorted_rows = _pbs_head_chunks(
            query, key, value, cfg, scorer_used, softmax_scale, heads_per_chunk, return_stats
        )
    if not return_stats:
        return out
    return out, PBSStats(
        block_mask=tiles,
        permutation=perm,
        density=_density(tiles),
        dense=False,
        scorer=None if cfg.permutation == "none" and not cfg.exact_last_block else scorer_used,
        sorted_rows=sorted_rows,
        backend=cfg.backend,
    )


def _pbs_head_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: PBSConfig,
    scorer: str,
    scale: float,
    kv_heads_per_chunk: int,
    keep_stats: bool,
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
            query[:, q_chunk], key[:, kv_chunk], value[:, kv_chunk], cfg, scorer, scale
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
    scorer: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance, permutation, selection and sparse attention for some heads.

    Returns:
        ``(out [B, Hq, Nq, Dv], tiles [B, Hq, nbq, nb] bool, perm [B, Hp, N] int64,
        sorted_rows [B, Hp] bool)``.
    """
    batch, seq_len = key.shape[0], key.shape[2]
    importance = None
    if cfg.permutation == "segment" or cfg.exact_last_block:
        importance = key_importance(
            query,
            key,
            block_size=cfg.block_size,
            segment_size=cfg.segment_size,
            scale=scale,
            per_query_head=cfg.gqa == "per_head" and cfg.permutation == "segment",
            scorer=scorer,
        )
    if cfg.permutation == "none":  # identity order is shared by all heads: no K/V copies
        perm = identity_permutation(batch, key.shape[1], seq_len, query.device)
        key_p, value_p = key, value
    else:
        perm = segment_permutation(importance, seq_len, cfg.segment_size)
        key_p, value_p = permute_kv(key, value, perm)
    select = dict(
        block_size=cfg.block_size, segment_size=cfg.segment_size, threshold=cfg.threshold, scale=scale
    )
    tiles = select_tiles(query, key_p, perm, **select)
    sorted_rows = torch.full(perm.shape[:2], cfg.permutation == "segment", device=query.device)
    if cfg.max_shrink is not None:  # head guard: the original order where sorting shrinks the selection
        identity = identity_permutation(batch, perm.shape[1], seq_len, query.device)
        tiles_original = select_tiles(query, key, identity[:, : key.shape[1]], **select)
        sorted_rows = keep_sorted_order(tiles, tiles_original, perm.shape[1], cfg.max_shrink)
        perm, tiles = mix_orders(sorted_rows, perm, identity, tiles, tiles_original)
        key_p, value_p = permute_kv(key, value, perm)
    if cfg.exact_last_block:  # the block of the last query trusts the exact mass, not the pooled one
        last_row = last_block_tiles(
            importance,
            perm,
            block_size=cfg.block_size,
            segment_size=cfg.segment_size,
            threshold=cfg.threshold,
        )
        tiles[:, :, -1] |= last_row.repeat_interleave(query.shape[1] // perm.shape[1], dim=1)
    out = sparse_attention(
        query, key_p, value_p, tiles, perm, block_size=cfg.block_size, segment_size=cfg.segment_size, scale=scale,
        backend=cfg.backend,
    )
    return out, tiles, perm, sorted_rows


def _kv_heads_per_chunk(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int, per_query_head: bool
) -> int:
    """KV heads the pipeline processes together: all of them, unless the extra memory they need
    (gathered K/V, tile tables and BlockMask index lists, a chunk's output) would exceed
    ``max(_MIN_CHUNK_BYTES, 25% of the q/k/v bytes)``, or the chunk's tile table would reach
    ``_MAX_TABLE_TILES`` (the kernel may index it with int32); then the largest divisor of Hkv
    that fits both (one KV head at least, if only the memory budget is exceeded)."""
    batch, q_heads, n_queries, _ = query.shape
    kv_heads, group, seq_len = key.shape[1], q_heads // key.shape[1], key.shape[2]
    n_blocks = -(-seq_len // block_size)
    q_blocks = n_blocks - (seq_len - n_queries) // block_size  # query blocks aligned to key blocks
    tiles_per_kv_head = group * batch * q_blocks * n_blocks
    if tiles_per_kv_head >= _MAX_TABLE_TILES:
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
    budget = max(_MIN_CHUNK_BYTES, inputs // 4)
    if kv_heads * (kv_copy + tables) <= budget and kv_heads * tiles_per_kv_head < _MAX_TABLE_TILES:
        return kv_heads
    per_head = kv_copy + tables + out_chunk
    fits = [
        d
        for d in range(1, kv_heads + 1)
        if kv_heads % d == 0 and d * per_head <= budget and d * tiles_per_kv_head < _MAX_TABLE_TILES
    ]
    return max(fits, default=1)


@torch.library.custom_op("flexpbs::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid_keys: torch.Tensor | None, config: str
) -> torch.Tensor:
    cfg = resolve(PBSConfig.from_string(config), query, value)
    if valid_keys is not None:
        out = padded_attention(query, key, value, valid_keys, cfg, _pbs_attention, return_stats=False)
    else:
        out = _pbs_attention(query, key, value, cfg, return_stats=False)
    # The fake kernel promises a contiguous result; SDPA and flex follow the query's strides.
    return out.contiguous()


@_attention_op.register_fake
def _(query, key, value, valid_keys, config):
    return query.new_empty(*query.shape[:3], value.shape[-1])


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    tensors = {"query": query, "key": key, "value": value}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have shape [batch, heads, seq_len, head_dim], got {list(x.shape)}"
            )
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad: flexpbs.attention is inference-only; call it under "
                "torch.no_grad() or torch.inference_mode()"
            )
    for name in ("key", "value"):
        x = tensors[name]
        if x.dtype != query.dtype:
            raise TypeError(f"{name} dtype {x.dtype} does not match query dtype {query.dtype}")
        if x.device != query.device:
            raise ValueError(f"{name} device {x.device} does not match query device {query.device}")
        if x.shape[0] != query.shape[0]:
            raise ValueError(f"{name} batch {x.shape[0]} does not match query batch {query.shape[0]}")
    if key.shape[2] < query.shape[2]:
        raise ValueError(
            f"key seq_len {key.shape[2]} must be >= query seq_len {query.shape[2]} "
            "(the queries are the last query-seq_len key positions)"
        )
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value seq_len {value.shape[2]} does not match key seq_len {key.shape[2]}")
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key head_dim {key.shape[3]} does not match query head_dim {query.shape[3]}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value heads {value.shape[1]} do not match key heads {key.shape[1]}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query heads {query.shape[1]} must be a positive multiple of key heads {key.shape[1]}"
        )


def _density(tiles: torch.Tensor) -> torch.Tensor:
    """Computed tiles over the causal tiles of the (query block, key block) rectangle: query
    block i (aligned to key block nb - nbq + i) has nb - nbq + i + 1 causal key blocks."""
    q_blocks, n_blocks = tiles.shape[-2:]
    causal = q_blocks * (n_blocks - q_blocks) + q_blocks * (q_blocks + 1) / 2
    return tiles.sum(dim=(-2, -1), dtype=torch.float32) / causal


def _dense_stats(
    batch: int,
    q_heads: int,
    perm_heads: int,
    n_queries: int,
    seq_len: int,
    block_size: int,
    device: torch.device,
) -> PBSStats:
    n_blocks = -(-seq_len // block_size)
    first_query_block = (seq_len - n_queries) // block_size if n_queries else n_blocks
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()[first_query_block:]
    tiles = causal.expand(batch, q_heads, *causal.shape).contiguous()
    return PBSStats(
        block_mask=tiles,
        permutation=identity_permutation(batch, perm_heads, seq_len, device),
        density=torch.ones(batch, q_heads, device=device),
        dense=True,
    )
