"""Block products for dense GEMM, written once against an array module ``xp``.

``accumulate(xp, c, a, b)`` does ``c += a @ b`` in place. On NumPy it calls BLAS gemm with
beta = 1 on transposed views, so no m×n temporary is made per round; on CuPy it calls cuBLAS
through ``xp.matmul`` into a scratch buffer the caller may reuse.
"""

from __future__ import annotations

import numpy as np


def zeros(xp, shape, dtype):
    return xp.zeros(shape, dtype=dtype)


def accumulate(xp, c, a, b, scratch=None):
    """``c += a @ b`` in place; ``a`` and ``b`` are only read (they may be read-only views)."""
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"block shapes do not chain: {a.shape} @ {b.shape} into {c.shape}")
    if a.shape[1] == 0 or c.size == 0:
        return c
    if xp is np:
        return _accumulate_blas(c, a, b)
    if scratch is None or scratch.shape != c.shape:
        scratch = xp.empty_like(c)
    xp.matmul(a, b, out=scratch)
    c += scratch
    return c


def _accumulate_blas(c, a, b):
    from scipy.linalg import blas

    if a.dtype != c.dtype:
        a = a.astype(c.dtype)
    if b.dtype != c.dtype:
        b = b.astype(c.dtype)
    if not (c.flags.c_contiguous and a.flags.c_contiguous and b.flags.c_contiguous):
        c += a @ b
        return c
    gemm = blas.get_blas_funcs("gemm", (a, b, c))
    # Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: BLAS writes straight into c's memory.
    gemm(1.0, b.T, a.T, beta=1.0, c=c.T, overwrite_c=1)
    return c
