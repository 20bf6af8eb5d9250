"""Block selection: which (query block, permuted key block) tiles are computed.

Per (batch, query head, query block): mean-pool the queries and the permuted keys of each block,
softmax the pooled logits over the candidate key blocks (the blocks of earlier segments), keep the
smallest set of candidates, in descending score order, whose cumulative mass reaches the threshold.
Then force the tiles no selection may drop: the block holding original token 0 (the attention sink)
and every block of the query block's own segment that holds a key it may see.

Chunks (fewer queries than keys, the queries at the last key positions): query blocks are aligned to
key blocks, as if ``offset % block_size`` dummy rows preceded the first query (they are not pooled), so
query block i lies inside key block ``offset // block_size + i`` and inside that block's segment.
"""

from __future__ import annotations

import torch
from einops import rearrange

from flexpbs.antidiagonal import antidiagonal_scores
from flexpbs.config import Estimator, PBSConfig
from flexpbs.lengths import SequenceLengths
from flexpbs.limits import LIMITS
from flexpbs.permutation import block_first_positions
from flexpbs.tile_grid import TileGrid, cdiv, row_bands, tile_grid


def pool_blocks(x: torch.Tensor, block_size: int, lead: int = 0) -> torch.Tensor:
    """Mean of each block of tokens over its REAL tokens, in float32.

    Args:
        x: ``[B, H, N, D]``.
        lead: ``0 <= lead < block_size`` dummy rows before ``x``'s first row (a chunk's queries
            aligned to key blocks); they belong to the first block but are not pooled.

    Returns:
        ``[B, H, nb, D]`` float32, nb = ceil((lead + N) / block_size); a partial first or last
        block is divided by its own number of real tokens. Summed with float32 accumulation in
        place: no float32 or padded copy of ``x`` (2 GiB for q at 128K).
    """
    n = x.shape[2]
    first = min(n, block_size - lead) if lead else 0  # real rows of a first block led by dummy rows
    rest = x[:, :, first:]
    complete = (n - first) // block_size * block_size
    parts = [rest[:, :, :complete].unflatten(2, (-1, block_size)).sum(dim=3, dtype=torch.float32)]
    if first:
        parts.insert(0, x[:, :, :first].sum(dim=2, keepdim=True, dtype=torch.float32))
    if complete < n - first:
        parts.append(rest[:, :, complete:].sum(dim=2, keepdim=True, dtype=torch.float32))
    if len(parts) == 1:  # complete blocks only
        return parts[0] / block_size
    sums = torch.cat(parts, dim=2)
    counts = torch.full((sums.shape[2], 1), float(block_size), device=x.device)
    # Python numbers, no host-to-device copy: CUDA-graph safe
    if complete < n - first:
        counts[-1] = n - first - complete
    if first:
        counts[0] = first
    return sums / counts


def candidate_tiles(
    n_blocks: int, block_size: int, segment_size: int, device: torch.device, first_query_block: int = 0
) -> torch.Tensor:
    """``[nbq, nb]`` bool: key block lies in a segment before the query block's segment.

    Query block i lies in key block ``first_query_block + i`` (0 for prefill, the chunk's first
    key block for a chunk); nbq = nb - first_query_block.
    """
    grid = tile_grid(
        n_blocks - first_query_block,
        n_blocks,
        first_query_block,
        n_blocks * block_size,
        block_size,
        segment_size,
        device,
    )
    return _candidates(grid)


def _candidates(grid: TileGrid) -> torch.Tensor:
    return grid.key_segment < grid.query_segment


def _group_rows(pooled_q: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, Hq, nbq, D]`` -> ``[B, Hp, nbq * group, D]``: the query heads sharing pooled keys as
    rows ordered (query block, head in group), so a range of query blocks is one slice of rows."""
    return rearrange(pooled_q, "b (k g) i d -> b k (i g) d", g=group).contiguous()


def _candidate_bias(candidates: torch.Tensor) -> torch.Tensor:
    """``[rows, nb]`` float32 logit bias: 0 on the candidates, -inf elsewhere."""
    return torch.where(candidates, 0.0, float("-inf"))


def _candidate_ranks(candidates: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[rows, nb]`` int64: the column's index (``columns``: ``[nb]`` 0..nb-1) where it is a
    candidate, else past any rank.

    Read by rank: as a row's candidates are a prefix of its columns, rank r is one of its candidates
    exactly when column r is, so ``ranks <= last kept rank`` keeps candidates only.
    """
    return torch.where(candidates, columns, torch.iinfo(torch.int64).max)


def _candidate_softmax(
    q_rows: torch.Tensor, k_cols: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax of ``scale * q_rows @ k_cols + bias`` over the last dim; rows without a candidate are NaN.

    Args:
        q_rows: ``[B, Hp, R, D]`` (:func:`_group_rows`), k_cols: ``[B, Hp, D, C]``, bias: ``[R, C]``.

    Returns:
        ``[B, Hp, R, C]`` float32.
    """
    # One GEMM scales the logits and adds the bias: fewer kernel launches than einsum, scale and
    # masked_fill.
    logits = torch.baddbmm(bias, q_rows.flatten(0, 1), k_cols.flatten(0, 1), alpha=scale)
    return logits.softmax(dim=-1).view(*q_rows.shape[:-1], -1)


def threshold_tiles(probs: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest prefix of candidates, in descending probability, whose mass reaches ``threshold``.

    Args:
        probs: ``[B, H, nbq, nb]`` float32 softmax probabilities of the pooled block scores: 0 off
            the candidates.
        candidates: bool broadcastable to ``probs`` (``[nbq, nb]`` as :func:`candidate_tiles` gives),
            each row a prefix of the columns (the blocks of earlier segments).
        threshold: in (0, 1]. 1.0 keeps every candidate: every softmax probability is positive
            in exact arithmetic, even where float32 rounds the running sum up to 1 early.

    Returns:
        ``[B, H, nbq, nb]`` bool. If the mass never reaches the threshold (rounding), all
        candidates are kept. Ties keep the lower block index first.
    """
    if threshold >= 1.0:
        return candidates.expand(probs.shape).clone()
    tiles = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    columns = torch.arange(candidates.shape[-1], device=candidates.device)
    _threshold_into(tiles, probs.clone(), _candidate_ranks(candidates, columns), threshold)
    return tiles


def _threshold_into(out: torch.Tensor, probs: torch.Tensor, ranks: torch.Tensor, threshold: float) -> None:
    """:func:`threshold_tiles` (threshold < 1) written into ``out`` (a bool view of ``probs``'s shape,
    any strides). ``probs`` is sorted in place (saves a copy of it); ``ranks``: :func:`_candidate_ranks`
    of the rows, broadcastable to ``probs``."""
    # A stable descending sort puts the candidates first: non-candidates have probability 0 and,
    # as a row's candidates are a prefix, larger indices than its zero-probability candidates.
    order = torch.empty(probs.shape, dtype=torch.int64, device=probs.device)
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True, out=(probs, order))
    last = (ordered.cumsum(dim=-1) < threshold).sum(dim=-1, keepdim=True)  # the rank that reaches it
    out.scatter_(-1, order, ranks <= last)


def forced_tiles(
    perm: torch.Tensor,
    block_size: int,
    segment_size: int,
    first_query_block: int = 0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiles computed regardless of scores: the sink block and the own segment.

    Args:
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot.
        first_query_block: the key block holding the first query block (see :func:`candidate_tiles`).
        out: ``[B, Hq, nbq, nb]`` bool (contiguous, Hq a multiple of Hp) to add the forced tiles to, in
            place (only the own segment's columns and the sink's column are written); None: a new
            ``[B, Hp, nbq, nb]`` table.

    Returns:
        ``out``, or the new table: the permuted block holding token 0, for every query block, and
        every block of the query block's own segment holding a key at or before the block's last
        query (own-segment blocks wholly in its future would be fully masked).
    """
    n_blocks = cdiv(perm.shape[-1], block_size)
    grid = tile_grid(
        n_blocks - first_query_block,
        n_blocks,
        first_query_block,
        perm.shape[-1],
        block_size,
        segment_size,
        perm.device,
    )
    if out is None:
        out = torch.zeros(
            *perm.shape[:2], grid.query_start.shape[0], n_blocks, dtype=torch.bool, device=perm.device
        )
    _force_into(out, perm, block_size, grid)
    return out


def _force_into(
    tiles: torch.Tensor,
    perm: torch.Tensor,
    block_size: int,
    grid: TileGrid,
    query_end: torch.Tensor | None = None,
) -> None:
    """Adds :func:`forced_tiles` to ``tiles [B, Hq, nbq, nb]`` (contiguous) in place: writes only the
    own segment's columns and the sink's column, not the whole table. ``query_end``: ``[B, 1, nbq, 1]``
    last query position of each query block per sequence (a frame), instead of the grid's."""
    batch, perm_heads = perm.shape[:2]
    first_pos = block_first_positions(perm, block_size)  # [B, Hp, nb]
    by_perm_row = tiles.view(batch, perm_heads, -1, *tiles.shape[2:])
    own = grid.own_columns.expand(*by_perm_row.shape[:3], -1, -1)
    last_query = grid.query_end if query_end is None else query_end
    visible = (first_pos[:, :, grid.own_columns] <= last_query)[:, :, None]
    # own_columns repeats the last block past a short last segment: the values written depend only
    # on (row, column), so the repeated writes agree
    by_perm_row.scatter_(-1, own, by_perm_row.gather(-1, own) | visible)
    sink = first_pos.argmin(dim=-1)  # the one block holding original position 0
    by_perm_row.scatter_(-1, sink[:, :, None, None, None].expand(*by_perm_row.shape[:-1], 1), True)


def _span_end(bands: list[tuple[int, int, int]], first: int, bytes_per_cell: int) -> int:
    """End index of the bands from ``bands[first]`` whose scores fit ``LIMITS.step_bytes`` together:
    ``(end row - first row) * end column * bytes_per_cell``; at least one band."""
    end = first + 1
    while end < len(bands):
        r1, columns = bands[end][1], bands[end][2]
        if (r1 - bands[first][0]) * columns * bytes_per_cell > LIMITS.step_bytes:
            break
        end += 1
    return end


def select_tiles(
    query: torch.Tensor,
    key_p: torch.Tensor,
    perm: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    threshold: float,
    scale: float,
    lengths: SequenceLengths | None = None,
    estimator: Estimator = "mean_pool",
    stride: int = PBSConfig.antidiagonal_stride,
) -> torch.Tensor:
    """The tiles to compute, per (batch, query head).

    Args:
        query: ``[B, Hq, Nq, D]``, the queries at the last Nq key positions (Nq = N for prefill).
        key_p: ``[B, Hp, N, D]`` permuted keys, Hq a multiple of Hp, N >= Nq.
        perm: ``[B, Hp, N]`` int64, the permutation that produced ``key_p``.
        lengths: sequences of different lengths in a frame (:mod:`flexpbs.lengths`; ``query`` and
            ``key_p`` are ``[B, H, L, D]`` frames, L a whole number of blocks): each sequence's real
            rows are pooled, its dense rows keep every causal tile, and blocks without its queries
            get no tile.
        estimator: ``"mean_pool"`` scores tiles by pooled blocks (module docstring);
            ``"antidiagonal"`` by strided antidiagonal sums at ``stride`` (:mod:`flexpbs.antidiagonal`).

    Returns:
        ``[B, Hq, nbq, nb]`` bool over (query block, permuted key block), nb = ceil(N / block_size),
        query block i aligned to key block ``(N - Nq) // block_size + i`` (module docstring).
    """
    batch, q_heads, n_queries, _ = query.shape
    perm_heads = key_p.shape[1]
    group = q_heads // perm_heads
    offset = key_p.shape[2] - n_queries
    first_query_block = offset // block_size
    n_blocks = cdiv(key_p.shape[2], block_size)
    q_blocks = n_blocks - first_query_block
    if estimator == "mean_pool":
        if lengths is None:
            pooled_q, pooled_k = (
                pool_blocks(query, block_size, lead=offset % block_size),
                pool_blocks(key_p, block_size),
            )
        else:  # a frame: zero rows outside each sequence, means over its real rows
            frame = key_p.shape[2]
            pooled_q, pooled_k = (
                x.unflatten(2, (-1, block_size)).sum(dim=3, dtype=torch.float32)
                / lengths.rows_per_block(frame, block_size, queries=queries).clamp_min(1)[:, None]
                for x, queries in ((query, True), (key_p, False))
            )
        q_rows = _group_rows(pooled_q, group)
        k_cols = pooled_k.transpose(-1, -2)  # [B, Hp, D, nb]
    grid = tile_grid(
        q_blocks, n_blocks, first_query_block, key_p.shape[2], block_size, segment_size, query.device
    )
    candidates = _candidates(grid)

    tiles = torch.zeros(batch, q_heads, q_blocks, n_blocks, dtype=torch.bool, device=query.device)
    if threshold >= 1.0:
        tiles.copy_(candidates.expand(tiles.shape))
    else:
        # Rows (query block, head in group) of each KV head: a band is a slice, no copy per band.
        by_rows = tiles.view(batch, perm_heads, group, q_blocks, n_blocks).transpose(
            2, 3
        )  # a view: written in place
        row_candidates = candidates.repeat_interleave(group, dim=0)  # [nbq * group, nb]
        # once: bands slice them
        bias, ranks = _candidate_bias(row_candidates), _candidate_ranks(row_candidates, grid.columns)
        block_bias = _candidate_bias(candidates)
        bands = row_bands(
            q_blocks, n_blocks, first_query_block, segment_size // block_size, own_segment=False
        )

        def scores(r0: int, r1: int, columns: int, h0: int, h1: int) -> torch.Tensor:
            # [B, h1 - h0, (r1 - r0) * group, columns] antidiagonal scores of query blocks r0..r1
            return antidiagonal_scores(
                query[:, h0 * group : h1 * group],
                key_p[:, h0:h1],
                first_block=r0,
                end_block=r1,
                columns=columns,
                bias=block_bias[r0:r1, :columns],
                block_size=block_size,
                stride=stride,
                scale=scale,
                lead=offset % block_size,
                lengths=lengths,
            )

        span = (0, 0, None)  # (first row, end row, scores of all heads) of bands scored in one launch
        for band, (r0, r1, columns) in enumerate(bands):
            rows = slice(r0 * group, r1 * group)
            per_head = (
                batch * (r1 - r0) * group * columns * 20
            )  # probs, sorted values, their sums, int64 order
            step = max(1, LIMITS.step_bytes // per_head)
            if estimator == "antidiagonal" and step >= perm_heads and r1 > span[1]:
                # One kernel launch for as many bands as fit: a launch per band leaves SMs idle at
                # its tail, and the kernel stops each query block at its own candidates anyway.
                _, end_row, end_column = bands[_span_end(bands, band, batch * q_heads * 4) - 1]
                span = (0, 0, None)  # the last span's scores freed before the next's are made
                span = (r0, end_row, scores(r0, end_row, end_column, 0, perm_heads))
            for h0 in range(0, perm_heads, step):
                heads = slice(h0, h0 + step)
                # every row of a band has a candidate: the first band starts in the second segment
                if estimator == "mean_pool":
                    probs = _candidate_softmax(
                        q_rows[:, heads, rows], k_cols[:, heads, :, :columns], bias[rows, :columns], scale
                    )
                elif span[0] <= r0 and r1 <= span[1]:
                    # a copy: sorted in place below
                    probs = span[2][:, heads, (r0 - span[0]) * group : (r1 - span[0]) * group, :columns]
                    probs = probs.contiguous()
                else:
                    probs = scores(r0, r1, columns, h0, min(h0 + step, perm_heads))
                out = by_rows[:, heads, r0:r1, :, :columns]
                _threshold_into(
                    out, probs.view(out.shape), ranks[rows, :columns].view(out.shape[2:]), threshold
                )
    if lengths is None:
        forced_tiles(perm, block_size, segment_size, first_query_block, out=tiles)
        return tiles
    # dense sequences keep every candidate (their own segment comes from the forced tiles)
    tiles |= candidates & lengths.dense[:, None, None, None]
    query_end = torch.minimum(grid.query_start[None] + block_size, lengths.n_keys[:, None, None]) - 1
    _force_into(tiles, perm, block_size, grid, query_end=query_end[:, None])
    tiles &= lengths.query_blocks(n_blocks, block_size)[:, None, :, None]
    return tiles
