"""Pictures of block masks and densities (optional extra ``plot``: matplotlib).

Each function draws onto a matplotlib Axes (a new figure when ``ax`` is None) and returns it, so the
pictures compose into a user's own figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from flexpbs.tile_grid import cdiv, density

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _axes(ax: Axes | None, size: tuple[float, float] = (4.0, 4.0)) -> Axes:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("flexpbs.plot needs matplotlib: pip install 'flexpbs[plot]'") from err
    return plt.figure(figsize=size).add_subplot()


def _label_line_chart(ax: Axes, xlabel: str, ylabel: str, title: str | None) -> Axes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def tiles(
    tiles: torch.Tensor,
    *,
    mass: torch.Tensor | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """One head's block mask: computed tiles, optionally over the attention mass of every tile.

    Args:
        tiles: ``[nb, nb]`` bool (query block, key block), e.g. ``stats.tiles[b, h]``.
        mass: optional ``[nb, nb]`` float, e.g. the (log) attention mass of each tile: drawn as a
            heat map, with the tiles that are not computed veiled in white.
        title: the Axes title; the density of computed causal tiles is appended.
    """
    ax = _axes(ax)
    tiles = tiles.detach().cpu().bool()
    nb = tiles.shape[-1]
    if mass is not None:
        ax.imshow(mass.detach().cpu().float().numpy(), cmap="magma", interpolation="nearest")
        veil = torch.zeros(*tiles.shape, 4)
        veil[..., :3] = 1.0
        veil[..., 3] = (~tiles).float() * 0.75  # tiles that are not computed fade to white
        ax.imshow(veil.numpy(), interpolation="nearest")
    else:
        ax.imshow(tiles.float().numpy(), cmap="Blues", vmin=0, vmax=1.2, interpolation="nearest")
    share = density(tiles).item() if nb else 1.0
    ax.set_title(f"{title + ': ' if title else ''}density {share:.2f}", fontsize=9)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    return ax


def density_by_layer(
    densities: Mapping[str, Sequence[float]], *, ax: Axes | None = None, title: str | None = None
) -> Axes:
    """Mean density per layer, one line per method (e.g. ``{"PBS": [...], "no permutation": [...]}``)."""
    ax = _axes(ax, (5.0, 3.2))
    for label, values in densities.items():
        ax.plot(range(len(values)), list(values), marker=".", label=label)
    return _label_line_chart(ax, "layer", "density of computed tiles", title)


def tradeoff(
    points: Mapping[str, Sequence[tuple[float, float]]],
    *,
    ylabel: str,
    baseline: float | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Density (x) against a quality metric (y), one curve per method; ``baseline`` draws dense."""
    ax = _axes(ax, (5.0, 3.2))
    for label, xy in points.items():
        xy = sorted(xy)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="dense")
    return _label_line_chart(ax, "density of computed tiles", ylabel, title)


def tile_attention_mass(
    query: torch.Tensor, key: torch.Tensor, perm: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Share of one head's causal attention mass in each (query block, permuted key block) tile.

    Args:
        query: ``[N, D]``; key: ``[N, D]`` in original order; perm: ``[N]`` original position at each
            permuted slot (identity for the unpermuted picture).

    Returns:
        ``[nb, nb]`` float32 summing to 1 (each query contributes 1/N). Costs O(N^2) memory: for
        pictures of short inputs.
    """
    n, d = query.shape
    scale = d**-0.5 if scale is None else scale
    logits = (query.float() @ key.float().T) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, perm]
    nb = cdiv(n, block_size)
    pad = nb * block_size - n
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad))
    mass = probs.view(nb, block_size, nb, block_size).sum(dim=(1, 3))
    return (mass / n).cpu()
