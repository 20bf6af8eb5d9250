"""The harness's timers and its peak-memory probe: one implementation of each kind of measurement.

- :func:`cuda_ms`: median milliseconds of a warm call, by CUDA events (``triton.testing.do_bench``):
  what ``speed``, ``breakeven``, ``levers``, ``stages``, ``profile`` and ``tp`` report.
- :func:`wall_s` and :func:`first_and_warm`: wall-clock time between device syncs, host time included:
  first calls, chunk passes and ``generate`` in ``coldstart``.
- :func:`host_ms`: host time of a call issued while the GPU is busy (``host``).
- :func:`peak_extra_gib`: peak device memory of a call beyond what was allocated before it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# ``host_ms`` keeps the GPU busy with this many cycles of torch's sleep kernel: ~0.5 s on an H100.
SLEEP_CYCLES = 10**9


def cuda_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` on the GPU after warm-up.

    do_bench sizes its repetitions to a 100 ms budget, which is a single call for calls over 100 ms (a
    median of one): calls over 10 ms get 3 to 10 repetitions instead.
    """
    # imported here: Triton comes with CUDA builds of torch, and the CPU subcommands must run without it
    from triton.testing import do_bench

    t = do_bench(fn, warmup=25, rep=100, return_mode="median")
    if t > 10:
        reps = min(10, max(3, int(5000 / t)))
        t = do_bench(fn, warmup=2 * t, rep=reps * t, return_mode="median")
    return t


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_s(fn: Callable[[], object]) -> float:
    """Seconds of ``fn()`` between device syncs (no sync on a machine without CUDA)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def first_and_warm(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(first call, median of ``repeat`` further calls) of ``fn``, in milliseconds (:func:`wall_s`)."""
    first = wall_s(fn)
    warm = statistics.median(wall_s(fn) for _ in range(repeat))
    return first * 1e3, warm * 1e3


def host_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median host milliseconds of ``fn()`` issued while the GPU runs a ~0.5 s sleep kernel.

    The host time is then the call's launch overhead, unless the call waits for the GPU (a hidden
    synchronisation, e.g. an allocator call), which shows up as ~500 ms.
    """
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], object]) -> float:
    """Peak device memory allocated during ``fn()`` beyond what was allocated before, its output included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**30
