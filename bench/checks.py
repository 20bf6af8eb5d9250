"""Checks of flexpbs's outputs and stats on long inputs, shared by ``stress`` and ``robustness``
(and tests/test_numerics.py, which checks them against the dense oracle).

A dense [N, N] oracle is out of reach at 512K tokens, so outputs are checked on sampled rows: the
tiles and permutation flexpbs reports give each sampled query its keys, and float32 softmax attention
over exactly those keys is the expected row. ``flexpbs.reference`` still checks the selection itself
wherever N is small enough.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexpbs import PBSConfig, PBSStats, reference
from flexpbs.permutation import block_first_positions, permute_kv
from flexpbs.selection import forced_tiles

# Relative to max |value|; plus 4 * 2^-24 * (largest logit bound) for the float32 logit rounding.
REL_TOL = {torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
FP32_EPS = 2.0**-24


def sample_rows(n: int, block: int, segment: int, count: int = 24, seed: int = 0) -> list[int]:
    """First, last, middle rows, rows at block and segment boundaries and a few random ones."""
    n_complete = n // segment * segment
    picks = {
        0,
        1,
        n - 1,
        n - 2,
        n // 2,
        n // 2 + 1,
        block - 1,
        block,
        segment - 1,
        segment,
        segment + 1,
        n_complete - 1,
        n_complete,
        n - n % block - 1,
        n - n % block,
    }
    gen = torch.Generator().manual_seed(seed)
    picks |= set(torch.randint(0, n, (count,), generator=gen).tolist())
    return sorted(i for i in picks if 0 <= i < n)


def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: torch.Tensor,
    perm: torch.Tensor,
    block: int,
    scale: float,
    b: int,
    h: int,
    rows: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention of query rows ``rows`` of (batch b, query head h) over the keys the reported
    tiles give them (causal on original positions). Returns ``(out [R, Dv], tolerance [R])``."""
    n = q.shape[2]
    kv = h // (q.shape[1] // k.shape[1])
    p = h // (q.shape[1] // perm.shape[1])
    outs, tols = [], []
    for i in rows:
        blocks = tiles[b, h, i // block].nonzero().flatten()
        slots = (blocks[:, None] * block + torch.arange(block, device=blocks.device)).flatten()
        pos = perm[b, p, slots[slots < n]]
        pos = pos[pos <= i]
        qi = q[b, h, i].float()
        keys, vals = k[b, kv, pos].float(), v[b, kv, pos].float()
        weights = torch.softmax((keys @ qi) * scale, dim=0)
        outs.append(weights @ vals)
        logit_bound = ((keys.abs() @ qi.abs()).max() * scale).item()
        tols.append(vals.abs().max().item() * (REL_TOL[q.dtype] + 4 * FP32_EPS * logit_bound))
    return torch.stack(outs), torch.tensor(tols, device=q.device)


def check_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: PBSStats,
    cfg: PBSConfig,
    heads: list[tuple[int, int]],
    rows: list[int] | None = None,
    rows_of: dict[tuple[int, int], list[int]] | None = None,
) -> dict:
    """Sampled rows of ``out`` against :func:`reference_rows` (``rows``, or ``rows_of[(b, h)]`` per head);
    returns counts and the worst error/tolerance."""
    scale = cfg.scale if cfg.scale is not None else q.shape[-1] ** -0.5
    worst, bad, checked = 0.0, 0, 0
    for b, h in heads:
        if rows_of is not None:
            rows = rows_of[(b, h)]
        if not rows:
            continue
        want, tol = reference_rows(
            q, k, v, stats.tiles, stats.key_positions, cfg.block_size, scale, b, h, rows
        )
        err = (out[b, h, rows].float() - want).abs().amax(-1)
        ratio = err / tol.clamp_min(1e-30)
        ratio = torch.where(err.isfinite(), ratio, torch.full_like(ratio, math.inf))
        worst = max(worst, ratio.max().item())
        bad += int((ratio > 1).sum())
        checked += len(rows)
    return dict(rows=checked, bad=bad, worst=worst)


def check_stats(stats: PBSStats, n: int, cfg: PBSConfig) -> None:
    """Permutation is a bijection of each segment (tail in place), forced tiles present, no tile wholly
    in the future, density consistent. Raises AssertionError."""
    perm = stats.key_positions
    seg = cfg.segment_size
    n_complete = n // seg * seg
    segs = perm[..., :n_complete].unflatten(-1, (-1, seg))
    starts = torch.arange(0, n_complete, seg, device=perm.device).view(-1, 1)
    assert torch.equal(segs.sort(-1).values, (starts + torch.arange(seg, device=perm.device)).expand_as(segs))
    assert torch.equal(
        perm[..., n_complete:], torch.arange(n_complete, n, device=perm.device).expand(*perm.shape[:2], -1)
    )
    group = stats.tiles.shape[1] // perm.shape[1]
    forced = forced_tiles(perm, cfg.block_size, seg).repeat_interleave(group, dim=1)
    assert not (forced & ~stats.tiles).any(), "forced tiles missing"
    first_pos = block_first_positions(perm, cfg.block_size)
    nb = stats.tiles.shape[-1]
    last_query = (torch.arange(1, nb + 1, device=perm.device) * cfg.block_size).clamp_max(n) - 1
    future = first_pos.repeat_interleave(group, dim=1)[:, :, None, :] > last_query[:, None]
    assert not (stats.tiles & future).any(), "tile wholly in the future"
    density = stats.tiles.sum((-1, -2), dtype=torch.float32) / (nb * (nb + 1) / 2)
    assert torch.allclose(stats.density, density)


def finite_tile_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stats: PBSStats, block_size: int
) -> torch.Tensor:
    """``[B, Hq, N]`` bool: the query row is finite and so is every key and value in the tiles computed
    for its query block: the rows the non-finite input contract says are exact.

    Tile granularity, not token granularity: inside a computed tile a masked-out NaN value still meets
    a zero probability in the P @ V product, and 0 * NaN is NaN.
    """
    batch, q_heads, n, _ = q.shape
    k_p, v_p = permute_kv(k, v, stats.key_positions)
    bad_slot = ~(k_p.isfinite().all(-1) & v_p.isfinite().all(-1))  # [B, Hp, N]
    bad_block = F.pad(bad_slot, (0, -n % block_size)).unflatten(-1, (-1, block_size)).any(-1)  # [B, Hp, nb]
    bad_block = bad_block.repeat_interleave(q_heads // bad_block.shape[1], dim=1)
    bad_qblock = (stats.tiles & bad_block[:, :, None, :]).any(-1)  # [B, Hq, nb]
    return q.isfinite().all(-1) & ~bad_qblock.repeat_interleave(block_size, dim=-1)[..., :n]


def check_against_reference(q: torch.Tensor, k: torch.Tensor, stats: PBSStats, cfg: PBSConfig) -> dict:
    """Small N only: permutation (up to float32 ties) and selection equal ``flexpbs.reference``'s."""
    qc, kc = q.cpu(), k.cpu()
    n = q.shape[2]
    imp = reference.importance(qc, kc, cfg)
    want = reference.segment_sort(imp, n, cfg.segment_size)
    perm = stats.key_positions.cpu()
    n_complete = imp.shape[-1]
    same_tail = torch.equal(perm[..., n_complete:], want[..., n_complete:])
    got_imp, want_imp = imp.gather(-1, perm[..., :n_complete]), imp.gather(-1, want[..., :n_complete])
    perm_ok = same_tail and torch.allclose(got_imp, want_imp, rtol=1e-5, atol=1e-9)
    tiles_ok = torch.equal(stats.tiles.cpu(), reference.selection(qc, kc, perm, cfg))
    return dict(permutation=perm_ok, selection=tiles_ok)
