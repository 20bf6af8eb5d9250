"""Head guard: a head keeps the importance order only where it does not shrink the selection much.

The importance order is tuned to the LAST query block. Where it lets the mean-pooling selector
drop tiles that the original order would keep, the pooled scores of the sorted blocks mislead the
earlier query blocks (on SmolLM2 the heads whose selection shrinks most under permutation are the
heads whose output error grows most; bench/QUALITY.md). So, per permutation row, the selection is
made on both orders and the importance order is kept only if it selects at least
``(1 - max_shrink)`` times the tiles of the original order, counted over the query heads that read
that row; otherwise the row reverts to the original order, with the tiles selected there.
"""

from __future__ import annotations

import torch


def sorted_rows(
    tiles_sorted: torch.Tensor, tiles_original: torch.Tensor, perm_heads: int, max_shrink: float
) -> torch.Tensor:
    """Which permutation rows keep the importance order.

    Args:
        tiles_sorted: ``[B, Hq, nb, nb]`` bool, the selection on the importance order.
        tiles_original: ``[B, Hq, nb, nb]`` bool, the selection on the original order.
        perm_heads: Hp, the number of permutation rows (Hq a multiple of Hp; query head h reads
            row h // (Hq / Hp)).
        max_shrink: in [0, 1): the largest share of tiles the importance order may save.

    Returns:
        ``[B, Hp]`` bool: the row's query heads together select at least ``(1 - max_shrink)``
        times as many tiles on the importance order as on the original order (compared in float64).
    """
    batch, q_heads = tiles_sorted.shape[:2]
    group = q_heads // perm_heads

    def per_row(tiles: torch.Tensor) -> torch.Tensor:
        return tiles.reshape(batch, perm_heads, group, -1).sum(dim=(2, 3), dtype=torch.float64)

    return per_row(tiles_sorted) >= (1.0 - max_shrink) * per_row(tiles_original)


def mix_orders(
    sorted_rows: torch.Tensor,
    perm_sorted: torch.Tensor,
    perm_original: torch.Tensor,
    tiles_sorted: torch.Tensor,
    tiles_original: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per permutation row, the importance order and its tiles where ``sorted_rows``, else the original.

    Args:
        sorted_rows: ``[B, Hp]`` bool from :func:`sorted_rows`.
        perm_sorted, perm_original: ``[B, Hp, N]`` int64.
        tiles_sorted, tiles_original: ``[B, Hq, nb, nb]`` bool.

    Returns:
        ``(perm [B, Hp, N] int64, tiles [B, Hq, nb, nb] bool)``.
    """
    group = tiles_sorted.shape[1] // sorted_rows.shape[1]
    perm = torch.where(sorted_rows[..., None], perm_sorted, perm_original)
    sorted_heads = sorted_rows.repeat_interleave(group, dim=1)[..., None, None]
    return perm, torch.where(sorted_heads, tiles_sorted, tiles_original)
