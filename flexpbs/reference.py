"""Dense, slow, obviously-right PBS attention in float32: the oracle the fast path is tested against.

Written independently of the fast path: loops over heads, segments and blocks, Python sorting,
and a token-level [Nq, N] mask. Use it only on small inputs.

Chunks: Nq <= N queries sit at the LAST Nq key positions (query i at key position N - Nq + i, the
causal mask aligned bottom-right). Query block i is the set of queries whose positions lie in key
block ``(N - Nq) // block_size + i``; everything else is stated on key positions as for prefill.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from flexpbs.config import PBSConfig
from flexpbs.tile_grid import cdiv


def _query_positions(n_queries: int, n: int) -> torch.Tensor:
    """``[Nq]`` key position of each query: the queries are the last Nq positions."""
    return torch.arange(n - n_queries, n)


def token_mask(
    tiles: torch.Tensor, perm: torch.Tensor, block_size: int, n_queries: int | None = None
) -> torch.Tensor:
    """Token-level mask over ORIGINAL key positions.

    Args:
        tiles: ``[B, Hq, nbq, nb]`` bool (query block, permuted key block).
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, Hq a multiple of Hp.
        n_queries: Nq, the number of queries (at the last Nq key positions); N when None.

    Returns:
        ``[B, Hq, Nq, N]`` bool: query i (at position p) attends key j iff j's permuted slot lies
        in a selected tile of i's query block and j <= p.
    """
    batch, q_heads = tiles.shape[:2]
    n = perm.shape[-1]
    n_queries = n if n_queries is None else n_queries
    group = q_heads // perm.shape[1]
    mask = torch.zeros(batch, q_heads, n_queries, n, dtype=torch.bool)
    positions = _query_positions(n_queries, n)
    query_block = positions // block_size - (n - n_queries) // block_size
    slot_block = torch.arange(n) // block_size
    for b in range(batch):
        for h in range(q_heads):
            slots_pos = perm[b, h // group].cpu()
            tile_rows = tiles[b, h].cpu()[query_block]  # [Nq, nb]
            allowed = tile_rows[:, slot_block]  # [Nq queries, N slots]
            mask[b, h][:, slots_pos] = allowed & (slots_pos[None, :] <= positions[:, None])
    return mask


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """float32 softmax attention under a token mask.

    Args:
        query: ``[B, Hq, Nq, D]``; key: ``[B, Hkv, N, D]``; value: ``[B, Hkv, N, Dv]``.
        mask: ``[B, Hq, Nq, N]`` bool over original key positions; every row needs a True.

    Returns:
        ``[B, Hq, Nq, Dv]`` float32 on the CPU.
    """
    group = query.shape[1] // key.shape[1]
    q = query.detach().cpu().float()
    k = key.detach().cpu().float().repeat_interleave(group, dim=1)
    v = value.detach().cpu().float().repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def importance(query: torch.Tensor, key: torch.Tensor, config: PBSConfig) -> torch.Tensor:
    """``[B, Hp, Nc]`` float32: mean softmax of the last ``block_size`` queries (of the chunk) over
    the complete segments of the keys."""
    batch, q_heads, n_queries, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scale = config.softmax_scale(d)
    n_complete = n // config.segment_size * config.segment_size
    rows = min(config.block_size, n_queries)
    per_q_head = torch.zeros(batch, q_heads, n_complete)
    for b in range(batch):
        for h in range(q_heads):
            q = query[b, h, n_queries - rows :].cpu().float()
            k = key[b, h // group, :n_complete].cpu().float()
            per_q_head[b, h] = torch.softmax((q @ k.T) * scale, dim=-1).mean(dim=0)
    if config.gqa == "per_head":
        return per_q_head
    return per_q_head.view(batch, kv_heads, group, n_complete).mean(dim=2)


def segment_sort(scores: torch.Tensor, n: int, segment_size: int) -> torch.Tensor:
    """``[B, Hp, N]`` int64: stable descending sort of ``scores`` inside each complete segment."""
    batch, heads, n_complete = scores.shape
    perm = torch.arange(n).repeat(batch, heads, 1)
    for b in range(batch):
        for h in range(heads):
            for start in range(0, n_complete, segment_size):
                seg = scores[b, h, start : start + segment_size].tolist()
                order = sorted(range(segment_size), key=lambda j: -seg[j])  # Python sort is stable
                perm[b, h, start : start + segment_size] = torch.tensor(order) + start
    return perm


def selection(query: torch.Tensor, key: torch.Tensor, perm: torch.Tensor, config: PBSConfig) -> torch.Tensor:
    """``[B, Hq, nbq, nb]`` bool tiles, one (batch, head, query block) at a time; query block i
    holds the queries whose positions lie in key block ``(N - Nq) // block_size + i``."""
    batch, q_heads, n_queries, d = query.shape
    n = key.shape[2]
    group = q_heads // perm.shape[1]
    kv_group = q_heads // key.shape[1]
    bs, blocks_per_segment = config.block_size, config.segment_size // config.block_size
    scale = config.softmax_scale(d)
    n_blocks = cdiv(n, bs)
    first_block = (n - n_queries) // bs
    positions = _query_positions(n_queries, n)
    tiles = torch.zeros(batch, q_heads, n_blocks - first_block, n_blocks, dtype=torch.bool)
    for b in range(batch):
        for h in range(q_heads):
            slots = perm[b, h // group].cpu()
            k_perm = key[b, h // kv_group].cpu().float()[slots]
            pooled_k = [k_perm[j * bs : (j + 1) * bs].mean(dim=0) for j in range(n_blocks)]
            for i, kb in enumerate(range(first_block, n_blocks)):  # kb: the key block of query block i
                in_block = positions // bs == kb
                pooled_q = query[b, h][in_block].cpu().float().mean(dim=0)
                candidates = [
                    j for j in range(n_blocks) if j // blocks_per_segment < kb // blocks_per_segment
                ]
                chosen: list[int] = []
                if candidates and config.estimator == "antidiagonal":
                    q_rows = torch.zeros(bs, d)  # the block's positions; rows without a query stay 0
                    present = torch.zeros(bs, dtype=torch.bool)
                    q_rows[positions[in_block] - kb * bs] = query[b, h][in_block].cpu().float()
                    present[positions[in_block] - kb * bs] = True
                    probs = antidiagonal_block(
                        q_rows, present, k_perm, candidates, config.antidiagonal_stride, scale
                    )
                elif candidates:
                    logits = torch.stack([pooled_q @ pooled_k[j] for j in candidates]) * scale
                    probs = torch.softmax(logits, dim=0).tolist()
                if candidates:
                    ranked = sorted(range(len(candidates)), key=lambda c: -probs[c])
                    mass = 0.0
                    for c in ranked:
                        if config.threshold < 1.0 and mass >= config.threshold:
                            break
                        chosen.append(candidates[c])
                        mass += probs[c]
                last_query = int(positions[in_block].max())
                for j in range(n_blocks):
                    block_pos = slots[j * bs : (j + 1) * bs]
                    own = j // blocks_per_segment == kb // blocks_per_segment
                    if (own and int(block_pos.min()) <= last_query) or bool((block_pos == 0).any()):
                        chosen.append(j)
                tiles[b, h, i, chosen] = True
    return tiles


def antidiagonal_block(
    q_rows: torch.Tensor,
    present: torch.Tensor,
    k_perm: torch.Tensor,
    candidates: list[int],
    stride: int,
    scale: float,
) -> list[float]:
    """One query block's antidiagonal tile scores over its candidate key blocks.

    Args:
        q_rows: ``[block, D]`` float32 queries at the block's positions, zero rows where none.
        present: ``[block]`` bool, the positions holding a query.
        k_perm: ``[N, D]`` float32 keys in permuted order.

    Returns:
        Per candidate, the mean over the block's strided rows holding a query of the softmax mass
        (over all candidates' strided columns) of the candidate's strided columns.
    """
    bs = q_rows.shape[0]
    per_block = bs // stride
    squares = []  # per candidate: [R, R] antidiagonal sums of its stride x stride squares
    for j in candidates:
        block = (q_rows @ k_perm[j * bs : (j + 1) * bs].T).view(per_block, stride, per_block, stride)
        # query offset stride-1-t pairs with key offset t: the flipped square's diagonal
        squares.append(block.flip(1).diagonal(dim1=1, dim2=3).sum(-1))
    logits = torch.stack(squares, dim=1).flatten(1) * (scale / stride)  # [R, candidates * R]
    probs = torch.softmax(logits, dim=-1).view(per_block, len(candidates), per_block).sum(-1)
    held = present.view(per_block, stride).any(-1)
    return probs[held].mean(dim=0).tolist()


def last_block(importance_rows: torch.Tensor, perm: torch.Tensor, config: PBSConfig) -> torch.Tensor:
    """``[B, Hp, nb]`` bool: blocks the last query block keeps by exact mass, one row at a time."""
    batch, heads, _ = importance_rows.shape
    n = perm.shape[-1]
    bs, blocks_per_segment = config.block_size, config.segment_size // config.block_size
    n_blocks = cdiv(n, bs)
    last_segment = (n_blocks - 1) // blocks_per_segment
    out = torch.zeros(batch, heads, n_blocks, dtype=torch.bool)
    candidates = [j for j in range(n_blocks) if j // blocks_per_segment < last_segment]
    if not candidates:
        return out
    for b in range(batch):
        for h in range(heads):
            slots = perm[b, h].cpu()
            imp = importance_rows[b, h].cpu().double()
            mass = [float(imp[slots[j * bs : (j + 1) * bs]].sum()) for j in candidates]
            total = sum(mass)
            probs = [m / total if total > 0 else 0.0 for m in mass]
            probs = torch.tensor(probs, dtype=torch.float64).float().tolist()
            ranked = sorted(range(len(candidates)), key=lambda c: -probs[c])
            acc = 0.0
            for c in ranked:
                if config.threshold < 1.0 and acc >= config.threshold:
                    break
                out[b, h, candidates[c]] = True
                acc += probs[c]
    return out


def guard(
    tiles_sorted: torch.Tensor, tiles_original: torch.Tensor, perm_heads: int, max_shrink: float
) -> torch.Tensor:
    """``[B, Hp]`` bool: row keeps the importance order (tile counts of its query heads, a row at a time)."""
    batch, q_heads = tiles_sorted.shape[:2]
    group = q_heads // perm_heads
    sorted_rows = torch.zeros(batch, perm_heads, dtype=torch.bool)
    for b in range(batch):
        for row in range(perm_heads):
            heads = range(row * group, (row + 1) * group)
            n_sorted = sum(int(tiles_sorted[b, h].sum()) for h in heads)
            n_original = sum(int(tiles_original[b, h].sum()) for h in heads)
            sorted_rows[b, row] = n_sorted >= (1.0 - max_shrink) * n_original
    return sorted_rows


def pbs_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: PBSConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole PBS algorithm, densely.

    Args:
        query: ``[B, Hq, Nq, D]``, the queries at the last Nq key positions (Nq = N for prefill);
        key: ``[B, Hkv, N, D]``; value: ``[B, Hkv, N, Dv]``.
        config: options (defaults if None); ``min_seq_len``, ``importance_kernel`` and ``backend``
            are ignored.

    Returns:
        ``(out [B, Hq, Nq, Dv] float32 CPU, tiles [B, Hq, nbq, nb] bool, perm [B, Hp, N] int64)``.
        For N <= segment_size: dense causal attention (bottom-right aligned), all causal tiles,
        identity permutation.
    """
    config = config or PBSConfig()
    batch, q_heads, n_queries, d = query.shape
    n = key.shape[2]
    scale = config.softmax_scale(d)
    perm_heads = q_heads if config.gqa == "per_head" else key.shape[1]
    if n <= config.segment_size:
        n_blocks = cdiv(n, config.block_size)
        first_block = (n - n_queries) // config.block_size
        causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()[first_block:]
        tiles = causal.repeat(batch, q_heads, 1, 1)
        perm = torch.arange(n).repeat(batch, perm_heads, 1)
    elif config.key_order == "original":
        perm = torch.arange(n).repeat(batch, key.shape[1], 1)
        tiles = selection(query, key, perm, config)
        scores = importance(query, key, replace(config, gqa="shared"))  # one row per KV head
    else:
        scores = importance(query, key, config)
        perm = segment_sort(scores, n, config.segment_size)
        tiles = selection(query, key, perm, config)
        if config.max_shrink is not None:
            original = torch.arange(n).repeat(batch, perm_heads, 1)
            tiles_original = selection(query, key, original, config)
            sorted_rows = guard(tiles, tiles_original, perm_heads, config.max_shrink)
            group = q_heads // perm_heads
            for b in range(batch):
                for row in range(perm_heads):
                    if not sorted_rows[b, row]:
                        perm[b, row] = original[b, row]
                        heads = slice(row * group, (row + 1) * group)
                        tiles[b, heads] = tiles_original[b, heads]
    if n > config.segment_size and config.exact_last_block:
        rows = last_block(scores, perm, config)
        tiles[:, :, -1] |= rows.repeat_interleave(q_heads // perm.shape[1], dim=1)
    mask = token_mask(tiles, perm, config.block_size, n_queries)
    out = masked_attention(query, key, value, mask, scale)
    return out, tiles, perm
