"""Padded batches: each sequence's real tokens become an unpadded problem of their own.

``valid_keys [B, N]`` marks the real keys of each sequence. Sequence b's real keys, kept in order, are
the L_b keys of its problem. Its queries sit at the last Nq key positions, so its real queries are the
real ones among those positions, which are exactly the last M_b of its real keys: sequence b is a
(chunked) prefill with M_b queries over L_b keys, and its output rows go back to their padded
positions; padded query rows are zeros. Sequences with padding run one at a time (their lengths are
read on the host); sequences without padding run as one batch.
"""

from __future__ import annotations

import dataclasses

import torch

from flexpbs.config import PBSConfig, PBSStats
from flexpbs.pipeline import pbs_attention


def check_valid_keys(valid_keys: torch.Tensor, key: torch.Tensor) -> None:
    """Type, shape and device of ``valid_keys`` (no data read, so no device sync).

    Raises:
        TypeError: not a tensor, or neither bool nor integer.
        ValueError: shape is not ``[B, N]`` of ``key [B, Hkv, N, D]``, or another device.
    """
    if not isinstance(valid_keys, torch.Tensor):
        raise TypeError(f"valid_keys must be a torch.Tensor or None, got {type(valid_keys).__name__}")
    if valid_keys.dtype != torch.bool and (valid_keys.is_floating_point() or valid_keys.is_complex()):
        raise TypeError(f"valid_keys must be bool or an integer 0/1 tensor, got {valid_keys.dtype}")
    want = (key.shape[0], key.shape[2])
    if tuple(valid_keys.shape) != want:
        raise ValueError(
            f"valid_keys must have shape [batch, key seq_len] = {list(want)}, got {list(valid_keys.shape)}"
        )
    if valid_keys.device != key.device:
        raise ValueError(f"valid_keys device {valid_keys.device} does not match key device {key.device}")


def validate_valid_keys(valid_keys: torch.Tensor) -> torch.Tensor:
    """``valid_keys`` as bool, after checking that an integer mask holds only 0 and 1 (syncs).

    Raises:
        ValueError: an integer ``valid_keys`` holds a value other than 0 and 1.
    """
    if valid_keys.dtype == torch.bool:
        return valid_keys
    if ((valid_keys != 0) & (valid_keys != 1)).any():
        raise ValueError("valid_keys must hold only 0 (padding) and 1 (real token)")
    return valid_keys != 0


def padded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_keys: torch.Tensor,
    cfg: PBSConfig,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, list[PBSStats]]:
    """Attention of a padded batch, sequence by sequence on its real tokens.

    Args:
        query: ``[B, Hq, Nq, D]``; key: ``[B, Hkv, N, D]``; value: ``[B, Hkv, N, Dv]``; Nq <= N.
        valid_keys: ``[B, N]`` bool or 0/1 integer, True where the key is a real token.
        cfg: the options (resolved: :func:`flexpbs.dispatch.resolve`).
        return_stats: also return one :class:`PBSStats` per sequence.

    Returns:
        ``[B, Hq, Nq, Dv]`` in ``query.dtype``, zeros on padded query rows; with ``return_stats``,
        ``(output, stats)`` where ``stats[b]`` is the PBSStats of sequence b's own call (batch 1,
        its L_b keys and M_b queries).
    """
    valid = validate_valid_keys(valid_keys)
    batch, _, n_queries, _ = query.shape
    n = key.shape[2]
    complete = valid.all(dim=-1).tolist()  # the host sync of this path
    if all(complete):
        result = pbs_attention(query, key, value, cfg, return_stats)
        if not return_stats:
            return result
        out, stats = result
        return out, [_sequence_stats(stats, b) for b in range(batch)]

    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    per_sequence: list[PBSStats | None] = [None] * batch
    whole = [b for b in range(batch) if complete[b]]
    if whole:
        rows = torch.tensor(whole, device=query.device)
        query_w, key_w, value_w = (x.index_select(0, rows) for x in (query, key, value))
        result = pbs_attention(query_w, key_w, value_w, cfg, return_stats)
        out_whole, stats = result if return_stats else (result, None)
        out.index_copy_(0, rows, out_whole)
        for i, b in enumerate(whole):
            per_sequence[b] = _sequence_stats(stats, i) if stats is not None else None
    for b in range(batch):
        if complete[b]:
            continue
        real_keys = valid[b].nonzero().squeeze(-1)
        real_queries = valid[b, n - n_queries :].nonzero().squeeze(-1)
        result = pbs_attention(
            query[b : b + 1].index_select(2, real_queries),
            key[b : b + 1].index_select(2, real_keys),
            value[b : b + 1].index_select(2, real_keys),
            cfg,
            return_stats,
        )
        out_b, per_sequence[b] = result if return_stats else (result, None)
        out[b].index_copy_(1, real_queries, out_b[0])
    if not return_stats:
        return out
    return out, per_sequence


def _sequence_stats(stats: PBSStats, b: int) -> PBSStats:
    """The stats of batch element ``b`` alone (batch dimension kept, size 1)."""
    one = slice(b, b + 1)
    return dataclasses.replace(
        stats,
        tiles=stats.tiles[one],
        key_positions=stats.key_positions[one],
        density=stats.density[one],
        sorted_rows=None if stats.sorted_rows is None else stats.sorted_rows[one],
    )
