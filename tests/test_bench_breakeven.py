"""The rule that turns a `python -m bench breakeven` run into `flexpbs.dispatch.BREAK_EVEN` entries."""

from __future__ import annotations

from bench.breakeven import MARGIN, break_even


def _rows(ratios: dict[int, float]) -> list[dict]:
    """Rows with cuDNN at 1 ms and PBS at ``1 / ratio`` ms (ratio: cuDNN's time over PBS's)."""
    return [{"n": n, "cudnn": 1.0, "pbs_triton": 1.0 / ratio} for n, ratio in ratios.items()]


def test_break_even_needs_the_margin_at_every_longer_length():
    assert MARGIN > 1
    # 16K beats cuDNN, but by less than the margin: the break-even is the next length
    rows = _rows({8192: 0.5, 16384: 1.03, 24576: 1.7, 32768: 2.0})
    assert break_even(rows, "pbs_triton") == 24576
    assert break_even(rows, "pbs_triton", margin=1.0) == 16384
    # a longer length that falls below the margin moves the break-even past it
    rows = _rows({8192: 1.5, 16384: 1.05, 24576: 1.3})
    assert break_even(rows, "pbs_triton") == 24576
    assert break_even(rows, "pbs_triton", margin=1.0) == 8192


def test_break_even_is_none_when_the_longest_length_loses():
    assert break_even(_rows({8192: 2.0, 16384: 0.9}), "pbs_triton") is None
    assert break_even(_rows({8192: 2.0}), "pbs_flash") is None  # the method did not run
