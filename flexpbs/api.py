"""``flexpbs.attention``: the entry point, its input validation and the custom op ``flexpbs::attention``."""

from __future__ import annotations

from typing import Any

import torch

from flexpbs.config import PBSConfig, PBSStats
from flexpbs.dispatch import resolve
from flexpbs.padding import check_valid_keys, padded_attention
from flexpbs.pipeline import pbs_attention
from flexpbs.sparse_attention import check_block_size
from flexpbs.validation import check_inputs


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
            padding alike. All sequences run in one pipeline pass over a frame of their real
            tokens (:mod:`flexpbs.padding`): no loop over them, and no host synchronisation for a
            bool ``valid_keys``.
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
    check_inputs(query, key, value)
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
        return padded_attention(query, key, value, valid_keys, cfg, return_stats)
    return pbs_attention(query, key, value, cfg, return_stats)


@torch.library.custom_op("flexpbs::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid_keys: torch.Tensor | None, config: str
) -> torch.Tensor:
    cfg = resolve(PBSConfig.from_string(config), query, value)
    if valid_keys is not None:
        out = padded_attention(query, key, value, valid_keys, cfg, return_stats=False)
    else:
        out = pbs_attention(query, key, value, cfg, return_stats=False)
    # The fake kernel promises a contiguous result; SDPA and flex follow the query's strides.
    return out.contiguous()


@_attention_op.register_fake
def _(query, key, value, valid_keys, config):
    return query.new_empty(*query.shape[:3], value.shape[-1])
