"""``flexpbs.attention``: validation, options, the dense fallback and the PBS pipeline."""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from flexpbs.config import GQAMode, PBSConfig, PBSStats, Permutation, Scorer
from flexpbs.head_guard import keep_sorted_order, mix_orders
from flexpbs.importance import key_importance, resolve_scorer
from flexpbs.last_block import last_block_tiles
from flexpbs.permutation import identity_permutation, permute_kv, segment_permutation
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEFAULTS = PBSConfig()
_OP_OPTIONS = tuple(f.name for f in fields(PBSConfig))  # the op's option arguments, in order


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_size: int = 128,
    segment_size: int = 256,
    threshold: float = 0.9,
    gqa: GQAMode = "shared",
    scale: float | None = None,
    min_seq_len: int | None = None,
    scorer: Scorer = "auto",
    permutation: Permutation = "segment",
    max_shrink: float | None = None,
    exact_last_block: bool = False,
    config: PBSConfig | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PBSStats]:
    """Causal prefill attention with Permuted Block-Sparse selection (PBS-Attn).

    Keys are reordered by importance inside fixed segments, tiles are selected by cumulative
    pooled attention mass, and only those tiles are computed by compiled FlexAttention with the
    causal mask evaluated on original positions. Same conventions as
    ``scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``.

    Args:
        query: ``[B, Hq, N, D]`` float16, bfloat16 or float32.
        key: ``[B, Hkv, N, D]``, Hq a multiple of Hkv, same dtype and device as ``query``.
        value: ``[B, Hkv, N, Dv]``.
        block_size, segment_size, threshold, gqa, scale, min_seq_len, scorer, permutation,
            max_shrink, exact_last_block: see :class:`PBSConfig`.
        config: a :class:`PBSConfig`; when given, the keyword options above must stay at their
            defaults.
        return_stats: also return a :class:`PBSStats`.

    Returns:
        ``[B, Hq, N, Dv]`` in ``query.dtype``, rows in the original query order; with
        ``return_stats``, a tuple ``(output, stats)``.

    Raises:
        TypeError: an input is not a tensor, has a non-float or mismatched dtype, or an option
            has the wrong type.
        ValueError: wrong ranks, mismatched batch/length/head dim/device, Hq not a multiple of
            Hkv, inputs requiring grad (inference only), or an option out of range.

    Inputs of at most ``segment_size`` tokens (or fewer than ``min_seq_len``) run dense causal
    SDPA. Inference only: no backward pass.

    Inside ``torch.compile`` the pipeline is the opaque custom op ``flexpbs::attention`` (no graph
    break, any dynamic length: FlexAttention's CPU template cannot compile a dynamic length, and CPU
    inductor cannot lower a mask_mod over tables computed in the same graph); behind it the eager
    pipeline runs. ``return_stats`` is then unsupported (ValueError).
    """
    options = dict(
        block_size=block_size,
        segment_size=segment_size,
        threshold=threshold,
        gqa=gqa,
        scale=scale,
        min_seq_len=min_seq_len,
        scorer=scorer,
        permutation=permutation,
        max_shrink=max_shrink,
        exact_last_block=exact_last_block,
    )
    changed = {name: value for name, value in options.items() if value != getattr(_DEFAULTS, name)}
    cfg = PBSConfig.resolve(config, changed)
    _check_inputs(query, key, value)
    if torch.compiler.is_compiling():
        if return_stats:
            raise ValueError("return_stats is not supported inside torch.compile; call eagerly")
        return _attention_op(query, key, value, *(getattr(cfg, name) for name in _OP_OPTIONS))
    return _pbs_attention(query, key, value, cfg, return_stats)


def _pbs_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: PBSConfig, return_stats: bool
) -> torch.Tensor | tuple[torch.Tensor, PBSStats]:
    """The pipeline on validated inputs, eagerly."""
    scorer_used = resolve_scorer(cfg.scorer, query.device)
    batch, q_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    softmax_scale = cfg.scale if cfg.scale is not None else head_dim**-0.5
    perm_heads = q_heads if cfg.gqa == "per_head" else kv_heads

    if cfg.runs_dense(seq_len):
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=softmax_scale, enable_gqa=True
        )
        if not return_stats:
            return out
        return out, _dense_stats(batch, q_heads, perm_heads, seq_len, cfg.block_size, query.device)

    importance = None
    if cfg.permutation == "segment" or cfg.exact_last_block:
        importance = key_importance(
            query,
            key,
            block_size=cfg.block_size,
            segment_size=cfg.segment_size,
            scale=softmax_scale,
            per_query_head=cfg.gqa == "per_head" and cfg.permutation == "segment",
            scorer=scorer_used,
        )
    else:
        scorer_used = None
    if cfg.permutation == "none":  # identity order is shared by all heads: no K/V copies
        perm = identity_permutation(batch, kv_heads, seq_len, query.device)
        key_p, value_p = key, value
    else:
        perm = segment_permutation(importance, seq_len, cfg.segment_size)
        key_p, value_p = permute_kv(key, value, perm)
    select = dict(
        block_size=cfg.block_size,
        segment_size=cfg.segment_size,
        threshold=cfg.threshold,
        scale=softmax_scale,
    )
    tiles = select_tiles(query, key_p, perm, **select)
    sorted_rows = torch.full(perm.shape[:2], cfg.permutation == "segment", device=query.device)
    if cfg.max_shrink is not None:  # head guard: the original order where sorting shrinks the selection
        identity = identity_permutation(batch, perm.shape[1], seq_len, query.device)
        tiles_original = select_tiles(query, key, identity[:, :kv_heads], **select)
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
        tiles[:, :, -1] |= last_row.repeat_interleave(q_heads // perm.shape[1], dim=1)
    out = sparse_attention(
        query, key_p, value_p, tiles, perm, block_size=cfg.block_size, scale=softmax_scale
    )
    if not return_stats:
        return out
    return out, PBSStats(
        block_mask=tiles,
        permutation=perm,
        density=_density(tiles),
        dense=False,
        scorer=scorer_used,
        sorted_rows=sorted_rows,
    )


@torch.library.custom_op("flexpbs::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    segment_size: int,
    threshold: float,
    gqa: str,
    scale: float | None,
    min_seq_len: int | None,
    scorer: str,
    permutation: str,
    max_shrink: float | None,
    exact_last_block: bool,
) -> torch.Tensor:
    cfg = PBSConfig(
        block_size,
        segment_size,
        threshold,
        gqa,
        scale,
        min_seq_len,
        scorer,
        permutation,
        max_shrink,
        exact_last_block,
    )
    # The fake kernel promises a contiguous result; SDPA and flex follow the query's strides.
    return _pbs_attention(query, key, value, cfg, return_stats=False).contiguous()


@_attention_op.register_fake
def _(query, key, value, *options):
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
        if x.shape[2] != query.shape[2]:
            raise ValueError(
                f"{name} seq_len {x.shape[2]} does not match query seq_len {query.shape[2]} "
                "(causal prefill needs equal lengths)"
            )
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key head_dim {key.shape[3]} does not match query head_dim {query.shape[3]}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value heads {value.shape[1]} do not match key heads {key.shape[1]}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query heads {query.shape[1]} must be a positive multiple of key heads {key.shape[1]}"
        )


def _density(tiles: torch.Tensor) -> torch.Tensor:
    n_blocks = tiles.shape[-1]
    return tiles.sum(dim=(-2, -1), dtype=torch.float32) / (n_blocks * (n_blocks + 1) / 2)


def _dense_stats(
    batch: int, q_heads: int, perm_heads: int, seq_len: int, block_size: int, device: torch.device
) -> PBSStats:
    n_blocks = -(-seq_len // block_size)
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()
    tiles = causal.expand(batch, q_heads, n_blocks, n_blocks).contiguous()
    return PBSStats(
        block_mask=tiles,
        permutation=identity_permutation(batch, perm_heads, seq_len, device),
        density=torch.ones(batch, q_heads, device=device),
        dense=True,
    )
