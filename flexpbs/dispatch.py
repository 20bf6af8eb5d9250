"""The defaults that pick the fastest correct path of a call: ``backend="auto"`` and ``min_seq_len="auto"``.

``backend="auto"`` runs the attention stage on FlexAttention's FLASH backend (flash-attn-4) where it is
installed and verified for the call, on its Triton backend otherwise. ``min_seq_len="auto"`` runs dense
attention (:mod:`flexpbs.dense`) below the key length from which PBS was measured faster than SDPA
cuDNN on that GPU with that backend (:data:`BREAK_EVEN`), and sends every longer input to PBS.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch

from flexpbs.config import PBSConfig

# Key length from which PBS ran at least 1.10x SDPA cuDNN's speed at every longer length measured, per
# CUDA compute capability and backend, for half precision (B=1, Hq=32, Hkv=8, D=128, bf16, the synthetic
# workload at threshold 0.9; the margin absorbs run-to-run noise of host-bound calls). 9.0: the larger
# of an H100's (session 13: Triton 16384, FLASH 14336) and an H200's (session 7: Triton 20480, its
# 16384 at 1.09x; FLASH 16384), torch 2.11 (bench/RESULTS.md). Regenerate with ``python -m bench
# breakeven``.
BREAK_EVEN: dict[tuple[int, int], dict[str, int]] = {
    (9, 0): {"triton": 20480, "flash": 16384},
}
# Other GPUs, and float32 everywhere: where no measurement exists, PBS only from this length.
FALLBACK_BREAK_EVEN = 32768
# The FLASH backend was verified on these compute capabilities (tests_gpu, bench/RESULTS.md).
FLASH_CAPABILITIES = {(9, 0)}
FLASH_HEAD_DIMS = (64, 128)


@functools.cache
def flash_importable() -> bool:
    """Whether flash-attn-4's CuTe package can be imported (looked up, not imported: that takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # flash_attn itself missing
        return False


def choose_backend(
    requested: str,
    *,
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    value_dim: int,
    block_size: int,
    flash_installed: bool,
) -> str:
    """The backend that runs: ``requested`` itself, or for ``"auto"`` the FLASH backend where it is
    installed and verified for these facts of the call, the Triton one otherwise.

    Raises:
        ValueError: ``"flash"`` requested for inputs it does not support (the message says why).
        ImportError: ``"flash"`` requested without flash-attn-4.
    """
    reason = None
    if device_type != "cuda":
        reason = f"it runs on CUDA only, got a query on {device_type}"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"it needs float16 or bfloat16 inputs, got {dtype}"
    elif head_dim != value_dim or head_dim not in FLASH_HEAD_DIMS or block_size != 128:
        reason = (
            f"it is checked for head dims {FLASH_HEAD_DIMS} (the same for values) and block_size 128 only, "
            f"got head dims {head_dim}/{value_dim} and block_size {block_size}"
        )
    if requested == "flash":
        if reason is not None:
            raise ValueError(f"backend='flash' cannot run this call: {reason}")
        if not flash_installed:
            raise ImportError('backend="flash" needs flash-attn-4: pip install "flexpbs[flash]"')
        return "flash"
    if requested == "auto":
        verified = reason is None and capability in FLASH_CAPABILITIES
        return "flash" if verified and flash_installed else "triton"
    return requested


def break_even(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, backend: str) -> int:
    """``min_seq_len="auto"`` for these facts of a call: the measured break-even on CUDA
    (:data:`BREAK_EVEN`; :data:`FALLBACK_BREAK_EVEN` where none was measured, and for float32); 0 on
    the CPU, where PBS runs for every input longer than one segment (CPU runs serve testing and
    reference, not speed)."""
    if device_type != "cuda":
        return 0
    if dtype == torch.float32:
        return FALLBACK_BREAK_EVEN
    return BREAK_EVEN.get(capability, {}).get(backend, FALLBACK_BREAK_EVEN)


def resolve(cfg: PBSConfig, query: torch.Tensor, value: torch.Tensor) -> PBSConfig:
    """``cfg`` with ``backend`` and ``min_seq_len`` made concrete for this call's inputs
    (:func:`choose_backend`, :func:`break_even`).

    Raises:
        ValueError, ImportError: as :func:`choose_backend`.
    """
    device_type = query.device.type
    capability = torch.cuda.get_device_capability(query.device) if device_type == "cuda" else None
    backend = choose_backend(
        cfg.backend,
        device_type=device_type,
        capability=capability,
        dtype=query.dtype,
        head_dim=query.shape[-1],
        value_dim=value.shape[-1],
        block_size=cfg.block_size,
        flash_installed=cfg.backend != "triton" and flash_importable(),
    )
    min_seq_len = cfg.min_seq_len
    if min_seq_len == "auto":
        min_seq_len = break_even(device_type, capability, query.dtype, backend)
    if (backend, min_seq_len) == (cfg.backend, cfg.min_seq_len):
        return cfg
    return dataclasses.replace(cfg, backend=backend, min_seq_len=min_seq_len)
