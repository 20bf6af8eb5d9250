"""Triton kernels behind the fast paths of flexpbs (imported only when Triton is available)."""


def count_variants(*kernels) -> int:
    """Compiled variants of these ``@triton.jit`` kernels in this process (Triton compiles one per
    specialisation of a kernel's arguments): the count grows when a call compiles."""
    return sum(len(cache) for fn in kernels for cache, *_ in getattr(fn, "device_caches", {}).values())
