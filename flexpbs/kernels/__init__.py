"""Triton kernels behind the fast paths of flexpbs (imported only when Triton is available)."""
