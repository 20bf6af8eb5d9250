"""Segmented key permutation: sort keys by importance inside each complete segment.

Attention is invariant to permuting keys and values together, so K and V are gathered with the
same index map and the causal test is later evaluated on the ORIGINAL positions it records.
Sorting only inside segments keeps causality at segment granularity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PAD_POSITION = 2**62  # larger than any sequence position, exact in float64 and int64


def segment_permutation(importance: torch.Tensor, n_keys: int, segment_size: int) -> torch.Tensor:
    """Stable descending sort of importance inside each complete segment; the tail stays put.

    Args:
        importance: ``[B, Hp, Nc]`` float, Nc a multiple of ``segment_size``.
        n_keys: N >= Nc; positions Nc..N-1 (the incomplete tail) keep their place.

    Returns:
        perm: ``[B, Hp, N]`` int64, the original position of the key at each permuted slot.
    """
    batch, heads, n_complete = importance.shape
    device = importance.device
    by_segment = importance.view(batch, heads, n_complete // segment_size, segment_size)
    order = torch.sort(by_segment, dim=-1, descending=True, stable=True).indices
    starts = torch.arange(0, n_complete, segment_size, device=device).view(1, 1, -1, 1)
    sorted_part = (order + starts).view(batch, heads, n_complete)
    if n_complete == n_keys:
        return sorted_part
    tail = torch.arange(n_complete, n_keys, device=device).expand(batch, heads, -1)
    return torch.cat([sorted_part, tail], dim=-1)


def identity_permutation(batch: int, heads: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """``[batch, heads, n_keys]`` int64 identity map (no reordering)."""
    return torch.arange(n_keys, device=device).expand(batch, heads, n_keys).contiguous()


def permute_kv(
    key: torch.Tensor, value: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather keys and values into permuted order.

    Args:
        key: ``[B, Hkv, N, D]``; value: ``[B, Hkv, N, Dv]``.
        perm: ``[B, Hp, N]`` int64 with Hp a multiple of Hkv: Hp = Hkv permutes each KV head,
            Hp = Hq gives every query head its own copy (head h reads KV head h // (Hp/Hkv)).

    Returns:
        ``(key_p [B, Hp, N, D], value_p [B, Hp, N, Dv])`` with ``key_p[..., s, :] = key[..., perm[s], :]``.
    """
    kv_heads = key.shape[1]
    copies = perm.shape[1] // kv_heads

    def gather(x: torch.Tensor) -> torch.Tensor:
        words = _as_words(x)
        b, _, n, d = words.shape
        src = words.unsqueeze(2).expand(b, kv_heads, copies, n, d)
        idx = perm.view(b, kv_heads, copies, n, 1).expand(b, kv_heads, copies, n, d)
        out = torch.gather(src, 3, idx).view(b, kv_heads * copies, n, d)
        return out.view(x.dtype)

    return gather(key), gather(value)


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as int64 words when its rows allow it, else ``x``: moving whole rows bitwise,
    the gather then handles 4x fewer elements of half-precision rows (measured faster on the GPU)."""
    try:
        return x.view(torch.int64)
    except RuntimeError:  # rows not a multiple of 8 bytes, or unaligned strides
        return x


def block_first_positions(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, Hp, nb]`` int64: the smallest original key position in each permuted key block of
    ``perm [B, Hp, N]``; padding slots of a partial last block are ignored."""
    # A constant pad value (any value >= N is ignored by amin): padding with N itself would turn a
    # dynamic length into a constant under torch.compile (a pad value must be a concrete number).
    pad = -perm.shape[-1] % block_size
    padded = F.pad(perm, (0, pad), value=_PAD_POSITION) if pad else perm  # F.pad copies even for 0
    return padded.unflatten(-1, (-1, block_size)).amin(dim=-1)


def block_last_positions(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, Hp, nb]`` int64: the largest original key position in each permuted key block."""
    pad = -perm.shape[-1] % block_size
    padded = F.pad(perm, (0, pad), value=-1) if pad else perm
    return padded.unflatten(-1, (-1, block_size)).amax(dim=-1)
