"""Memory budgets and step sizes of the pipeline, in one place, with one knob to change them.

    with flexpbs.limits.override(min_chunk_bytes=0):   # e.g. force head chunks in a test
        flexpbs.attention(q, k, v)

Every stage reads :data:`LIMITS` when it runs. The defaults were measured on an H100/H200
(bench/RESULTS.md): raising them trades memory for fewer steps, lowering them the reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Limits:
    """Attributes:
    min_chunk_bytes: extra memory the pipeline may always use; above ``max(min_chunk_bytes,
        chunk_share * q/k/v bytes)`` it runs a few KV heads at a time.
    chunk_share: the share of the q/k/v bytes the pipeline may use beyond them.
    step_bytes: bytes one step of the importance pass (PyTorch path) or of the selection may hold.
    sort_tiles: tiles the block-list pass sorts per step (bounds its int64 sort temporaries).
    max_bands: row bands per selection or block-list pass (each band is a few more kernel launches).
    mask_check_elements: mask elements the transformers integration compares per step.
    max_table_tiles: tiles the tile table of one FlexAttention call may hold (its mask_mod lookups may
        use int32 indices); more KV heads than fit run in head chunks.
    frame_share, frame_short_keys: packed batches whose offsets are read run in several frames
        (:func:`flexpbs.varlen.frame_groups`): a sequence shares the frame of a longer one when it has
        at least ``frame_share`` of its keys, or when that one has at most ``frame_short_keys``.
    """

    min_chunk_bytes: int = 2**30
    chunk_share: float = 0.25
    step_bytes: int = 256 * 2**20
    sort_tiles: int = 2**24
    max_bands: int = 8
    mask_check_elements: int = 2**24
    max_table_tiles: int = 2**31
    frame_share: float = 0.7
    frame_short_keys: int = 16384


LIMITS = Limits()


@contextlib.contextmanager
def override(**changes: float) -> Iterator[Limits]:
    """Change :data:`LIMITS` for the duration of a ``with`` block (not thread-safe).

    Raises:
        TypeError: an unknown limit name.
    """
    names = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown limits {unknown}; the limits are {sorted(names)}")
    before = dataclasses.replace(LIMITS)
    for name, value in changes.items():
        setattr(LIMITS, name, value)
    try:
        yield LIMITS
    finally:
        for name in names:
            setattr(LIMITS, name, getattr(before, name))
