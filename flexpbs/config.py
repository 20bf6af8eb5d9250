"""Options of PBS attention (:class:`PBSConfig`) and what a call reports (:class:`PBSStats`)."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch

GQAMode = Literal["shared", "per_head"]
ImportanceKernel = Literal["auto", "triton", "torch"]
KeyOrder = Literal["sorted", "original"]
Backend = Literal["auto", "triton", "flash"]
Estimator = Literal["mean_pool", "antidiagonal"]
GQA_MODES, IMPORTANCE_KERNELS, KEY_ORDERS, BACKENDS, ESTIMATORS = (
    get_args(t) for t in (GQAMode, ImportanceKernel, KeyOrder, Backend, Estimator)
)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


_DEFAULT_SEGMENT_SIZE = 256


@dataclass(frozen=True)
class PBSConfig:
    """Options of :func:`flexpbs.attention`, validated on construction.

    Args:
        block_size: tokens per query block and per key block (a tile is block x block).
        segment_size: tokens per permutation segment; a multiple of ``block_size``.
        threshold: cumulative pooled attention mass each query block keeps, in (0, 1].
            1.0 keeps every causal tile (exact dense attention).
        gqa: ``"shared"``: one key permutation per KV head, importance averaged over the
            query heads of its group (no K/V replication). ``"per_head"``: one permutation
            per query head, K/V gathered per query head (the paper's reference code).
        scale: softmax scale; ``None`` means ``1 / sqrt(head_dim)`` as in SDPA. Used for
            importance, block selection and attention alike.
        min_seq_len: key lengths below this run dense causal attention (cuDNN first on CUDA).
            ``"auto"`` (default): on CUDA, the length from which PBS was measured faster than SDPA
            cuDNN on that GPU with the backend that runs (:mod:`flexpbs.dispatch`; 32768 on GPUs
            not measured and in float32); on the CPU, 0. ``0`` or ``None``: PBS for every input
            longer than ``segment_size``.
        key_order: ``"sorted"`` sorts keys by importance inside each segment (PBS-Attn);
            ``"original"`` keeps the original order (one identity permutation per KV head, whatever
            ``gqa``): the same selector without permutation, for comparisons. It differs from the
            paper's MeanPooling baseline, which has no segments and forces only the diagonal block.
        importance_kernel: implementation of the importance pass. ``"auto"``: the Triton kernel on CUDA when
            Triton is importable, the PyTorch path otherwise; ``"triton"`` or ``"torch"`` force one.
        max_shrink: head guard (beyond the paper; ``None``, the default, is the published
            algorithm: every head permutes). A float in [0, 1): the selection is made on both the
            importance order and the original order, and a permutation row keeps the importance
            order only if its query heads select at least ``(1 - max_shrink)`` times the tiles of
            the original order; other rows run on the original order (see
            :mod:`flexpbs.head_guard`). Costs a second selection and a second K/V gather. Only with
            ``key_order="sorted"``.
        exact_last_block: (beyond the paper; ``False``, the default, is the published
            algorithm) the last query block also keeps the smallest set of earlier-segment key
            blocks, in descending EXACT attention mass of the last ``block_size`` queries (known
            from the importance pass, which then also runs for ``key_order="original"``), whose
            share reaches ``threshold`` (see :mod:`flexpbs.last_block`). Adds tiles, never removes any.
        backend: FlexAttention kernel of the attention stage. ``"auto"`` (default): ``"flash"``
            where flash-attn-4 is installed and the call is one it was verified on (Hopper, i.e.
            compute capability 9.0), ``"triton"`` otherwise. ``"triton"``: its Triton kernels (its
            C++ kernel on CPU). ``"flash"``: its FLASH backend, flash-attn-4's CuTe DSL kernels
            (extra ``flexpbs[flash]``; experimental in torch): CUDA, float16 or bfloat16, head dim
            64 or 128 and ``block_size`` 128 only (what was checked); ImportError when the package
            is missing, ValueError for other inputs.
        estimator: how a tile is scored for selection. ``"mean_pool"`` (default, PBS-Attn): the
            softmax of mean query . mean key over the candidate blocks. ``"antidiagonal"``
            (PBS-Attn+): XAttention's strided antidiagonal sums of q . k on the permuted keys, which
            keep token-level evidence (see :mod:`flexpbs.antidiagonal`); it costs more.
        antidiagonal_stride: S, the antidiagonal estimator's stride: it sums S query-key products
            per strided entry, at 1/S of the scoring FLOPs; must divide ``block_size``. Default 32
            (XAttention's is 8): a quarter of stride 8's cost, and on the quality screen it
            retrieved as well as mean pooling where 8 did not (README, "Quality"). Read only with
            ``estimator="antidiagonal"``.
    """

    block_size: int = 128
    segment_size: int = _DEFAULT_SEGMENT_SIZE
    threshold: float = 0.9
    gqa: GQAMode = "shared"
    scale: float | None = None
    min_seq_len: int | Literal["auto"] | None = "auto"
    importance_kernel: ImportanceKernel = "auto"
    key_order: KeyOrder = "sorted"
    max_shrink: float | None = None
    exact_last_block: bool = False
    backend: Backend = "auto"
    estimator: Estimator = "mean_pool"
    antidiagonal_stride: int = 32

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("segment_size", self.segment_size, minimum=1)
        if self.segment_size % self.block_size:
            raise ValueError(
                f"block_size {self.block_size} does not divide segment_size {self.segment_size} (default "
                f"{_DEFAULT_SEGMENT_SIZE}): pass a segment_size that is a multiple of block_size, e.g. "
                f"segment_size={2 * self.block_size}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(self.threshold).__name__}")
        if not 0.0 < self.threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise TypeError(f"scale must be a float or None, got {type(self.scale).__name__}")
            if not math.isfinite(self.scale):
                raise ValueError(f"scale must be finite, got {self.scale}")
        if self.min_seq_len is not None and self.min_seq_len != "auto":
            _check_int("min_seq_len", self.min_seq_len, minimum=0)
        if self.key_order not in KEY_ORDERS:
            raise ValueError(f"key_order must be one of {KEY_ORDERS}, got {self.key_order!r}")
        if self.importance_kernel not in IMPORTANCE_KERNELS:
            raise ValueError(
                f"importance_kernel must be one of {IMPORTANCE_KERNELS}, got {self.importance_kernel!r}"
            )
        if self.max_shrink is not None:
            if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)):
                raise TypeError(f"max_shrink must be a float or None, got {type(self.max_shrink).__name__}")
            if not 0.0 <= self.max_shrink < 1.0:  # also rejects NaN
                raise ValueError(f"max_shrink must be in [0, 1) or None, got {self.max_shrink}")
            if self.key_order != "sorted":
                raise ValueError(f"max_shrink needs key_order='sorted', got key_order={self.key_order!r}")
        if not isinstance(self.exact_last_block, bool):
            raise TypeError(f"exact_last_block must be a bool, got {type(self.exact_last_block).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        _check_int("antidiagonal_stride", self.antidiagonal_stride, minimum=1)
        if self.estimator == "antidiagonal" and self.block_size % self.antidiagonal_stride:
            raise ValueError(
                f"antidiagonal_stride {self.antidiagonal_stride} does not divide block_size {self.block_size}"
            )

    @classmethod
    def resolve(cls, config: PBSConfig | None, options: Mapping[str, Any]) -> PBSConfig:
        """``config`` itself, or a new config from ``options`` (PBSConfig fields); not both.

        Raises:
            TypeError: ``config`` is not a PBSConfig, or an option has a wrong type.
            ValueError: both ``config`` and ``options`` are given, or an option is out of range.
        """
        if config is None:
            return cls(**options)
        if not isinstance(config, PBSConfig):
            raise TypeError(f"config must be a PBSConfig or None, got {type(config).__name__}")
        if options:
            raise ValueError(
                f"pass options either in config or as keywords, not both; got config and {sorted(options)}"
            )
        return config

    def to_string(self) -> str:
        """The options as ``name=repr(value)`` pairs joined by ``;`` (how the custom op
        ``flexpbs::attention`` carries them; plain formatting, which torch.compile traces)."""
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))

    @classmethod
    def from_string(cls, text: str) -> PBSConfig:
        """The config :meth:`to_string` wrote."""
        pairs = (item.split("=", 1) for item in text.split(";"))
        return cls(**{name: ast.literal_eval(value) for name, value in pairs})

    def runs_dense(self, n_keys: int) -> bool:
        """Whether ``n_keys`` keys (the key length, also for a chunk) run dense causal attention
        instead of PBS (too short); ``min_seq_len`` resolved (see :func:`flexpbs.dispatch.resolve`)."""
        if self.min_seq_len == "auto":
            raise ValueError("min_seq_len='auto' is resolved per call: use flexpbs.dispatch.resolve first")
        return n_keys <= self.segment_size or (self.min_seq_len is not None and n_keys < self.min_seq_len)

    def softmax_scale(self, head_dim: int) -> float:
        """``scale``, or ``head_dim ** -0.5`` when None."""
        return self.scale if self.scale is not None else head_dim**-0.5

    def uses_importance(self) -> bool:
        """Whether the importance pass runs: to sort keys, or for the last query block's exact mass."""
        return self.key_order == "sorted" or self.exact_last_block


@dataclass(frozen=True)
class PBSStats:
    """What one :func:`flexpbs.attention` call computed.

    Attributes:
        tiles: ``[B, Hq, nbq, nb]`` bool, nb = ceil(N / block_size) key blocks: tile
            (query block, PERMUTED key block) is computed. For prefill nbq = nb; for a chunk of
            Nq queries, query block i holds the queries whose positions lie in key block
            ``(N - Nq) // block_size + i``, so nbq = nb - (N - Nq) // block_size.
        key_positions: ``[B, Hp, N]`` int64, the original position of the key at each
            permuted slot; Hp = Hkv for ``gqa="shared"`` or ``key_order="original"``, Hq for
            ``"per_head"``.
        density: ``[B, Hq]`` float32, computed tiles / causal tiles of the rectangle, i.e.
            / (nbq * (nb - nbq) + nbq * (nbq + 1) / 2), which is nb * (nb + 1) / 2 for prefill.
        dense: True when the call ran dense causal attention (short input).
        importance_kernel: ``"triton"`` or ``"torch"``: the importance pass that ran (``None`` when
            none ran).
        sorted_rows: ``[B, Hp]`` bool, which permutation rows use the importance order (all with
            ``key_order="sorted"`` and no ``max_shrink``; none for ``"none"``); ``None`` when
            the call ran dense.
        backend: ``"triton"`` or ``"flash"``: the FlexAttention backend of the attention stage
            (``None`` when the call ran dense).
    """

    tiles: torch.Tensor
    key_positions: torch.Tensor
    density: torch.Tensor
    dense: bool
    importance_kernel: str | None = None
    sorted_rows: torch.Tensor | None = None
    backend: str | None = None
