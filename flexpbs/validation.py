"""Input validation shared by :func:`flexpbs.attention` and the importance kernel's entry point.

Errors name the argument, what was expected and what came. No check reads tensor data (that would
synchronise the device).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None) -> None:
    """Types, ranks, dtypes, devices and shapes of ``query [B, Hq, Nq, D]``, ``key [B, Hkv, N, D]``
    and, when given, ``value [B, Hkv, N, Dv]``: Nq <= N, Hq a positive multiple of Hkv, no grad needed.

    Raises:
        TypeError: not a tensor, or a dtype other than float16/bfloat16/float32 or not the query's.
        ValueError: a rank, batch, length, head count, head dim or device that does not fit, or an
            input requiring grad with autograd enabled (inference only).
    """
    tensors = (
        {"query": query, "key": key, "value": value} if value is not None else {"query": query, "key": key}
    )
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, heads, seq_len, head_dim], got {list(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad: flexpbs.attention is inference-only; call it under "
                "torch.no_grad() or torch.inference_mode()"
            )
    for name, x in list(tensors.items())[1:]:
        if x.dtype != query.dtype:
            raise TypeError(f"{name} dtype {x.dtype} does not match query dtype {query.dtype}")
        if x.device != query.device:
            raise ValueError(f"{name} device {x.device} does not match query device {query.device}")
        if x.shape[0] != query.shape[0]:
            raise ValueError(f"{name} batch {x.shape[0]} does not match query batch {query.shape[0]}")
    if key.shape[2] < query.shape[2]:
        raise ValueError(
            f"key seq_len {key.shape[2]} must be >= query seq_len {query.shape[2]} "
            "(the queries are the last query-seq_len key positions)"
        )
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key head_dim {key.shape[3]} does not match query head_dim {query.shape[3]}")
    if value is not None and value.shape[2] != key.shape[2]:
        raise ValueError(f"value seq_len {value.shape[2]} does not match key seq_len {key.shape[2]}")
    if value is not None and value.shape[1] != key.shape[1]:
        raise ValueError(f"value heads {value.shape[1]} do not match key heads {key.shape[1]}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query heads {query.shape[1]} must be a positive multiple of key heads {key.shape[1]}"
        )
