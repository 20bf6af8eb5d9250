"""The attention stage: compiled FlexAttention over permuted keys, computing only selected tiles.

One compiled graph serves every query and key length: the lengths are dynamic dimensions of the
graph, so a new prompt length or prefill chunk costs no compile. What keeps the compiled kernel as
fast as a static one (both checked on the GPU, bench/RESULTS.md):

- lengths are padded to whole blocks and FlexAttention is told so (kernel option ``IS_DIVISIBLE``),
  which a dynamic length would otherwise switch off, masking every load;
- the mask_mod is the causal test on a table of original positions (:func:`causal_mask_mod`): the
  compiled kernel calls it only on listed partial blocks, where the tile lookup is always true;
- query and key lengths get separate symbols (no duck sizing), so prefill and chunks share the graph;
  at least two query blocks are passed, so no length dimension is ever 1 (which dynamo specialises);
- each permutation row is a batch element of its own, and the graph is first traced with a single row
  under size-oblivious shapes (:func:`_prime`), so one graph serves every row count: batch sizes, head
  chunks and single rows (MQA models, one KV head per chunk) alike.

On the CPU, inductor's FlexAttention template cannot compile a mask_mod that reads a table of dynamic
length: there the position table has a static capacity, the next power of two of at least
``CPU_MIN_CAPACITY`` slots, and a new graph compiles only when a length needs a larger capacity.
A chunk's queries are preceded by ``offset % block_size`` dummy rows so that query blocks align with
key blocks (their output is dropped).
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexpbs.block_mask import block_lists, causal_mask_mod
from flexpbs.rows import contiguous_rows, padded_rows
from flexpbs.tile_grid import cdiv

# Graphs differ only by dtype, head shape, batch size, block size, kernel options, scale, grad mode and
# (CPU) table capacity; a limit this high keeps any mix of them compiled rather than eager, and the
# graphs live on this module's function, not on the user's compiled flex_attention.
_RECOMPILE_LIMIT = 64
CPU_MIN_CAPACITY = 4096
_BEYOND_EVERY_QUERY = 2**30  # position of padded key slots: after every query row (int32)


def _flex_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    kernel_options: dict | None,
) -> torch.Tensor:
    """FlexAttention over the block lists; the BlockMask is built inside the graph so that its
    lengths come from the tensors' (dynamic) shapes."""
    block_mask = BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=block_size,
        mask_mod=causal_mask_mod(positions, query.shape[1] // positions.shape[1]),
        seq_lengths=(query.shape[2], key.shape[2]),
        compute_q_blocks=False,
    )
    return flex_attention(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
        kernel_options=kernel_options,
    )


compiled_flex_call = torch.compile(_flex_call, dynamic=False)  # lengths are marked dynamic per call


def table_capacity(n_keys: int, device: torch.device) -> int | None:
    """Static length of the position table on ``device``, or None where it follows the keys
    (dynamic: CUDA)."""
    if device.type == "cuda":
        return None
    return max(CPU_MIN_CAPACITY, 1 << (n_keys - 1).bit_length())


# FlexAttention's GPU kernels step through a BlockMask block in tiles of up to 128 tokens (their
# default on the H100 for half precision); a block that is not a multiple of the tile fails to lower.
_MAX_GPU_TILE = 128

# Hopper (sm90), half precision, head dim 128, blocks of 128: 128x128 tiles with TMA loads ran the
# PBS attention stage 8% faster than torch 2.11's defaults (128x64, 3 stages) at 128K (bench/levers.py,
# bench/RESULTS.md); 3 stages of 128x128 overflow shared memory with the PBS mask_mod.
SM90_KERNEL_OPTIONS = {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}


def tuned_kernel_options(
    capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int, block_size: int
) -> dict | None:
    """flexpbs's kernel options where they were measured to beat FlexAttention's defaults, else None.

    Args:
        capability: CUDA compute capability of the device, None off CUDA.
    """
    if (
        capability == (9, 0)
        and dtype in (torch.bfloat16, torch.float16)
        and head_dim == 128
        and block_size % 128 == 0
    ):
        return dict(SM90_KERNEL_OPTIONS)
    return None


def flex_kernel_options(
    device_type: str, block_size: int, kernel_options: dict | None, default: dict | None = None
) -> dict | None:
    """``kernel_options`` (``default`` when None) with GPU tiles that divide ``block_size``
    (given ones are kept).

    Raises:
        ValueError: on CUDA, ``block_size`` not a multiple of 16 (the smallest Triton dot tile).
    """
    kernel_options = default if kernel_options is None else kernel_options
    if device_type != "cuda" or block_size % _MAX_GPU_TILE == 0:
        return kernel_options
    check_block_size(torch.device(device_type), block_size)
    tile = min(block_size & -block_size, _MAX_GPU_TILE)  # largest power of two dividing block_size
    return {"BLOCK_M": tile, "BLOCK_N": tile, **(kernel_options or {})}


def check_block_size(device: torch.device, block_size: int) -> None:
    """Raises ValueError when ``block_size`` is unsupported on ``device``: on CUDA it must be a
    multiple of 16, the smallest tile FlexAttention's GPU kernels step through a block in."""
    if device.type == "cuda" and block_size % 16:
        raise ValueError(
            f"block_size must be a multiple of 16 on CUDA (FlexAttention's GPU tiles), got {block_size}"
        )


def sparse_attention(
    query: torch.Tensor,
    key_p: torch.Tensor,
    value_p: torch.Tensor,
    tiles: torch.Tensor,
    perm: torch.Tensor,
    *,
    block_size: int,
    segment_size: int,
    scale: float,
    backend: str = "triton",
) -> torch.Tensor:
    """Attention of original-order queries over permuted keys, on the selected tiles only.

    Args:
        query: ``[B, Hq, Nq, D]``, the queries at the last Nq key positions (Nq = N for prefill).
        key_p: ``[B, Hp, N, D]`` and value_p ``[B, Hp, N, Dv]`` in permuted order, Hq a multiple of Hp.
        tiles: ``[B, Hq, nbq, nb]`` bool (query block, permuted key block) to compute, query blocks
            aligned to key blocks as in :func:`flexpbs.selection.select_tiles`.
        perm: ``[B, Hp, N]`` int64 original position at each permuted slot, permuting only inside
            segments of ``segment_size`` keys.
        backend: ``"triton"`` (with :func:`tuned_kernel_options` where they apply) or ``"flash"``
            (resolved: :func:`flexpbs.dispatch.resolve`).

    Returns:
        ``[B, Hq, Nq, Dv]`` in ``query.dtype``.
    """
    n_queries, n = query.shape[2], key_p.shape[2]
    lead = (n - n_queries) % block_size  # dummy rows aligning query blocks to key blocks
    q_total = lead + n_queries
    # whole blocks, and at least two query blocks: a length dimension of 1 would be specialised
    q_pad = max(cdiv(q_total, block_size), 2) * block_size - q_total
    kv_pad = -n % block_size
    if lead or q_pad:
        query = padded_rows(query, lead, q_pad)
    if kv_pad:
        key_p, value_p = (F.pad(x, (0, 0, 0, kv_pad)) for x in (key_p, value_p))
        # padded keys sit after every query: their block is partial, so the mask hides them
        extra = torch.arange(n, n + kv_pad, device=perm.device).expand(*perm.shape[:2], kv_pad)
        perm = torch.cat([perm, extra], dim=-1)
    query_start = n - q_total
    rows = query.shape[2] // block_size - tiles.shape[-2]
    cols = key_p.shape[2] // block_size - tiles.shape[-1]
    if rows or cols:
        tiles = F.pad(tiles, (0, cols, 0, rows), value=False)
    lists = block_lists(tiles, perm, block_size, segment_size, query_start=query_start)
    # original positions counted from query row 0, so the causal test is ``position <= q_idx``
    capacity = table_capacity(key_p.shape[2], query.device)
    positions = torch.full(
        (*perm.shape[:2], capacity or key_p.shape[2]),
        _BEYOND_EVERY_QUERY,
        dtype=torch.int32,
        device=perm.device,
    )
    positions[..., : perm.shape[-1]] = perm - query_start
    kernel_options = _kernel_options(query, block_size, {"BACKEND": "FLASH"} if backend == "flash" else None)
    out = _folded_flex(
        query, key_p, value_p, lists, positions, block_size, scale, kernel_options, capacity is None
    )
    return out[:, :, lead:q_total] if lead or q_pad else out


# Elements a tensor of one FlexAttention call may hold: beyond it the compiled kernel would need 64-bit
# indexing, which is a different graph (a compile at the first such length).
_MAX_CALL_ELEMENTS = 2**31 - 1


def _folded_flex(
    query: torch.Tensor,
    key_p: torch.Tensor,
    value_p: torch.Tensor,
    lists: tuple[torch.Tensor, ...],
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    kernel_options: dict | None,
    dynamic_table: bool,
) -> torch.Tensor:
    """The compiled call with each permutation row (batch element, Hp head) as a batch element of its
    own, holding its G = Hq / Hp query heads and one key head: the batch dimension is then dynamic like
    the lengths, so batch sizes and head chunks of the pipeline share one graph. Batch elements go in
    slices that keep every tensor under ``_MAX_CALL_ELEMENTS``.

    Args: ``query [B, Hq, Lq, D]``, ``key_p``/``value_p [B, Hp, Lk, D or Dv]``, ``lists`` of
    :func:`flexpbs.block_mask.block_lists` (``[B, Hq, nbq(, nb)]``), ``positions [B, Hp, L]``; lengths
    are whole blocks. Returns ``[B, Hq, Lq, Dv]``.
    """
    batch, q_heads = query.shape[:2]
    rows = batch * key_p.shape[1]
    group = q_heads // key_p.shape[1]
    _prime(query, value_p.shape[-1], group, positions, block_size, scale, kernel_options, dynamic_table)
    q_f = _contiguous(contiguous_rows(query), (rows, group, *query.shape[2:]))
    k_f, v_f, p_f = (_contiguous(x, (rows, 1, *x.shape[2:])) for x in (key_p, value_p, positions))
    lists_f = [_contiguous(x, (rows, group, *x.shape[2:])) for x in lists]
    per_row = (
        max(x[0].numel() for x in (q_f, k_f, v_f, lists_f[1], lists_f[3]))
        + group * query.shape[2] * value_p.shape[-1]
    )
    # nearly equal slices
    slices = cdiv(rows, max(1, _MAX_CALL_ELEMENTS // per_row))
    outs = []
    for part in zip(*(x.tensor_split(slices) for x in (q_f, k_f, v_f, *lists_f, p_f)), strict=True):
        _mark_dynamic(part, dynamic_table)
        with _compile_config():
            outs.append(
                compiled_flex_call(*part[:3], tuple(part[3:7]), part[7], block_size, scale, kernel_options)
            )
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(batch, q_heads, *out.shape[2:])


# Query and key blocks of the priming call: two or three blocks hit a bug of the CPU template under
# size-oblivious shapes (a C++ compile error); eight compile.
_PRIME_BLOCKS = 8


def _compile_config() -> contextlib.AbstractContextManager:
    """Dynamo settings of the compiled call: its own recompile limit, separate length symbols (no duck
    sizing), and size-oblivious sizes, so that a graph first traced with one row serves every row count
    (dynamo specialises a dimension of size 1 otherwise)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT))
    stack.enter_context(fx_config.patch(use_duck_shape=False, backed_size_oblivious=True))
    return stack


# Graph keys primed in this process (:func:`_prime`).
_PRIMED: set[tuple] = set()


def _prime(
    query: torch.Tensor,
    value_dim: int,
    group: int,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    kernel_options: dict | None,
    dynamic_table: bool,
) -> None:
    """Before a graph's first call, a call of one small row that computes no block: traced with one row,
    size-oblivious, the graph serves every row count, single permutation rows (batch 1 with one KV head
    per chunk) included; traced first with two or more rows it would not serve one. The key holds what
    the graph is specialised on."""
    key = (
        query.device,
        query.dtype,
        group,
        query.shape[-1],
        value_dim,
        block_size,
        scale,
        tuple(sorted((kernel_options or {}).items())),
        None if dynamic_table else positions.shape[-1],
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )
    if key in _PRIMED:
        return
    _PRIMED.add(key)
    blocks, length = _PRIME_BLOCKS, _PRIME_BLOCKS * block_size
    q = query.new_zeros(1, group, length, query.shape[-1])
    k = query.new_zeros(1, 1, length, query.shape[-1])
    v = query.new_zeros(1, 1, length, value_dim)
    counts = torch.zeros(1, group, blocks, dtype=torch.int32, device=query.device)
    indices = torch.zeros(1, group, blocks, blocks, dtype=torch.int32, device=query.device)
    table = positions.new_zeros(1, 1, length if dynamic_table else positions.shape[-1])
    part = (q, k, v, counts, indices, counts.clone(), indices.clone(), table)
    _mark_dynamic(part, dynamic_table)
    with _compile_config():
        compiled_flex_call(*part[:3], tuple(part[3:7]), part[7], block_size, scale, kernel_options)


def _mark_dynamic(part: tuple[torch.Tensor, ...], dynamic_table: bool) -> None:
    """Rows and lengths of a call's tensors are dynamic; the position table's length only on CUDA."""
    dynamic_dims = [(0, 2)] * 4 + [(0, 2, 3), (0, 2), (0, 2, 3), (0, 2) if dynamic_table else (0,)]
    for x, dims in zip(part, dynamic_dims, strict=True):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(x, dim)


def _contiguous(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` as a contiguous ``shape`` with the canonical strides (a copy only when ``x`` is not
    contiguous): compiled graphs are specialised on stride patterns, which views of other tensors (a
    chunk of a prompt, a head slice with a size-1 batch) would otherwise vary. Queries, the largest,
    are copied by :func:`flexpbs.rows.contiguous_rows`."""
    return x.contiguous().view(-1).view(shape)


def _kernel_options(query: torch.Tensor, block_size: int, kernel_options: dict | None) -> dict | None:
    """The kernel options of a call: tuned defaults, GPU tiles dividing the block, and on CUDA
    ``IS_DIVISIBLE`` (lengths are padded to whole blocks, whose tiles divide them)."""
    capability = torch.cuda.get_device_capability(query.device) if query.device.type == "cuda" else None
    tuned = tuned_kernel_options(capability, query.dtype, query.shape[-1], block_size)
    options = flex_kernel_options(query.device.type, block_size, kernel_options, tuned)
    if query.device.type != "cuda" or (options or {}).get("BACKEND") == "FLASH":
        return options
    return {"IS_DIVISIBLE": True, **(options or {})}
