"""The attention stage: compiled FlexAttention over permuted keys, computing only selected tiles.

flex_attention is compiled once, with static shapes: on CPU, torch 2.13's inductor template fails
to compile any mask_mod that indexes a table by a block of a dynamic length. Lengths are padded
to buckets (8 per doubling) so a new prompt length recompiles only when it enters a new bucket.
Padded query blocks get no tiles and padded keys sit after every query, so padding adds no work
beyond copying the inputs when N is not already a bucket length. Query and key lengths are bucketed
separately (a chunk has fewer queries than keys); a chunk's queries are also preceded by
``offset % block_size`` dummy rows so that query blocks align with key blocks (their output is dropped).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flexpbs.block_mask import build_block_mask

_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

# Every bucket, dtype, head shape and block size is one compiled graph; the default limit of 8
# would silently drop to eager flex_attention, which materialises all N x N scores.
_RECOMPILE_LIMIT = 512


def bucket_length(seq_len: int, block_size: int) -> int:
    """Smallest bucket length >= ``seq_len``: a multiple of ``block_size`` and of 1/16 of the
    enclosing power of two, so at most 8 buckets per doubling and at most 12.5% padding."""
    step = max(1, 1 << max((seq_len - 1).bit_length() - 4, 0))
    padded = -(-seq_len // step) * step
    return -(-padded // block_size) * block_size


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
    if capability == (9, 0) and dtype in (torch.bfloat16, torch.float16) and head_dim == 128 and block_size % 128 == 0:
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
        raise ValueError(f"block_size must be a multiple of 16 on CUDA (FlexAttention's GPU tiles), got {block_size}")


@functools.cache
def _flash_available() -> bool:
    try:  # imports the CuTe DSL: seconds, once
        importlib.import_module("flash_attn.cute")
    except ImportError:
        return False
    return True


def flash_kernel_options(query: torch.Tensor, value: torch.Tensor, block_size: int) -> dict:
    """FlexAttention's kernel options for its FLASH backend (``backend="flash"``), after checking
    that the inputs are what was checked on it.

    Raises:
        ValueError: a query off CUDA, not float16/bfloat16, head dims other than 128, or
            ``block_size`` other than 128 (flash-attn-4's Hopper tile for head dim 128).
        ImportError: ``flash_attn.cute`` (package ``flash-attn-4``) is not importable.
    """
    if query.device.type != "cuda":
        raise ValueError(f"backend='flash' runs on CUDA only, got a query on {query.device.type}")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='flash' needs float16 or bfloat16 inputs, got {query.dtype}")
    if query.shape[-1] != 128 or value.shape[-1] != 128 or block_size != 128:
        raise ValueError(
            f"backend='flash' is checked for head_dim 128 and block_size 128 only, got head dims "
            f"{query.shape[-1]}/{value.shape[-1]} and block_size {block_size}"
        )
    if not _flash_available():
        raise ImportError("backend='flash' needs flash_attn.cute: pip install flash-attn-4")
    return {"BACKEND": "FLASH"}


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
    kernel_options: dict | None = None,
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
        kernel_options: FlexAttention kernel options (tile sizes, warps, stages); each distinct
            value compiles its own kernel. None: :func:`tuned_kernel_options` where they apply,
            FlexAttention's defaults elsewhere.
        backend: ``"triton"`` or ``"flash"`` (see :class:`flexpbs.PBSConfig`); ``"flash"`` adds
            ``BACKEND="FLASH"`` to ``kernel_options``.

    Returns:
        ``[B, Hq, Nq, Dv]`` in ``query.dtype``.
    """
    n_queries, n = query.shape[2], key_p.shape[2]
    lead = (n - n_queries) % block_size  # dummy rows aligning query blocks to key blocks
    q_total = lead + n_queries
    q_pad = bucket_length(q_total, block_size) - q_total
    kv_pad = bucket_length(n, block_size) - n
    if lead or q_pad:
        query = F.pad(query, (0, 0, lead, q_pad))
    if kv_pad:
        key_p, value_p = (F.pad(x, (0, 0, 0, kv_pad)) for x in (key_p, value_p))
        extra = torch.arange(n, n + kv_pad, device=perm.device).expand(*perm.shape[:2], kv_pad)
        perm = torch.cat([perm, extra], dim=-1)  # padded keys come after every real query
    if q_pad or kv_pad:
        rows = (q_total + q_pad) // block_size - tiles.shape[-2]
        cols = (n + kv_pad) // block_size - tiles.shape[-1]
        tiles = F.pad(tiles, (0, cols, 0, rows), value=False)
    block_mask = build_block_mask(
        tiles, perm, block_size, segment_size, query_start=n - q_total, q_len=query.shape[2]
    )
    if backend == "flash":
        kernel_options = {**flash_kernel_options(query, value_p, block_size), **(kernel_options or {})}
    capability = torch.cuda.get_device_capability(query.device) if query.device.type == "cuda" else None
    tuned = tuned_kernel_options(capability, query.dtype, query.shape[-1], block_size)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = _compiled_flex_attention(
            query,
            key_p,
            value_p,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=key_p.shape[1] != query.shape[1],
            kernel_options=flex_kernel_options(query.device.type, block_size, kernel_options, tuned),
        )
    return out[:, :, lead:q_total] if lead or q_pad else out
