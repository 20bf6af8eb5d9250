"""Padded batches: each sequence's real tokens become an unpadded problem of their own.

``valid_keys [B, N]`` marks the real keys of each sequence. Sequence b's real keys, kept in order, are
the L_b keys of its problem. Its queries sit at the last Nq key positions, so its real queries are the
real ones among those positions, which are exactly the last M_b of its real keys: sequence b is a
(chunked) prefill with M_b queries over L_b keys, and its output rows go back to their padded
positions; padded query rows are zeros. All sequences run in one pipeline run over a frame
(:func:`flexpbs.varlen.frame_attention`), with no loop over them and no host synchronisation.
"""

from __future__ import annotations

import torch

from flexpbs.config import PBSConfig, PBSStats
from flexpbs.lengths import frame_length
from flexpbs.rows import copy_rows, frame_layout, to_frame
from flexpbs.varlen import FrameShape, frame_attention


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
    """Attention of a padded batch: every sequence on its real tokens, all in one pipeline run.

    Each sequence's real keys (in order) and real queries are gathered into a frame
    (:mod:`flexpbs.lengths`) and the frame runs through :func:`flexpbs.varlen.frame_attention`: no loop
    over sequences, and no host synchronisation for a bool ``valid_keys``.

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
    batch, n_queries, n = query.shape[0], query.shape[2], key.shape[2]
    valid_q = valid[:, n - n_queries :]
    n_keys, n_q = valid.sum(-1), valid_q.sum(-1)
    frame = frame_length(n, cfg.block_size)
    positions = torch.arange(frame, device=query.device)
    rows = torch.arange(batch, device=query.device)[:, None]
    # keys: the real ones first, in order (a stable sort of the padding flags), at positions 0..L_b-1;
    # source rows b * N + index of the padded tensors, -1 (zeros) past them
    key_index = _pad_to(_real_first(valid), frame)
    key_source = torch.where(positions < n_keys[:, None], rows * n + key_index, -1).flatten()
    # queries: the real ones in order at positions L_b - M_b .. L_b - 1
    rank = positions - (n_keys - n_q)[:, None]
    query_index = _real_first(valid_q).gather(1, rank.clamp(0, max(n_queries - 1, 0)))
    query_rows = (rank >= 0) & (rank < n_q[:, None])
    query_source = torch.where(query_rows, rows * n_queries + query_index, -1).flatten()
    # back to the padded rows: query i's frame row is L_b - M_b + (its rank among the real queries);
    # padded query rows get zeros
    frame_row = ((n_keys - n_q)[:, None] + valid_q.cumsum(-1) - 1).clamp(0, frame - 1)
    out_source = torch.where(valid_q, rows * frame + frame_row, -1).flatten()

    def frames(q_heads: slice, kv_heads: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = (
            (query[:, q_heads], query_source),
            (key[:, kv_heads], key_source),
            (value[:, kv_heads], key_source),
        )
        return tuple(to_frame(x, frame_layout(x), source, batch, frame) for x, source in parts)

    out = query.new_empty(*query.shape[:3], value.shape[3])

    def unframe(frame_out: torch.Tensor, q_heads: slice) -> None:
        target = out[:, q_heads]
        copy_rows(frame_out, frame_layout(frame_out), out_source, target, frame_layout(target))

    shape = FrameShape(query.shape[0], query.shape[1], key.shape[1], frame, query.shape[3], value.shape[3])
    stats = frame_attention(frames, unframe, shape, query.dtype, n_keys, n_q, cfg, return_stats)
    return (out, stats) if return_stats else out


def _real_first(valid: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` int64: the indices of the True entries of each row, in order, then the others."""
    return torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices


def _pad_to(index: torch.Tensor, length: int) -> torch.Tensor:
    return (
        torch.nn.functional.pad(index, (0, length - index.shape[-1])) if length > index.shape[-1] else index
    )
