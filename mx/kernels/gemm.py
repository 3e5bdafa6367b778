"""Block products for dense GEMM, written once against an array module ``xp``.

``accumulate(xp, c, a, b, precision)`` does ``c += a @ b`` in place, with no m×n temporary:
on NumPy through BLAS gemm with beta = 1 on transposed views, on CuPy through cublasGemmEx
with beta = 1 (the compute type picks fp64, fp32, TF32 tensor cores or bf16 tensor cores with
fp32 accumulation). Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ, so no copies are made.
"""

from __future__ import annotations

import numpy as np


def zeros(xp, shape, dtype):
    return xp.zeros(shape, dtype=dtype)


def accumulate(xp, c, a, b, precision: str | None = None, beta: float = 1.0):
    """``c = a @ b + beta * c`` in place (beta 1: accumulate, 0: overwrite); ``a`` and ``b``
    are only read (they may be read-only views)."""
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"block shapes do not chain: {a.shape} @ {b.shape} into {c.shape}")
    if c.size == 0:
        return c
    if a.shape[1] == 0:
        if beta == 0.0:
            c[...] = 0
        elif beta != 1.0:
            c *= beta
        return c
    if xp is np:
        return _accumulate_blas(c, a, b, beta)
    return _accumulate_cublas(c, a, b, precision or ("fp64" if c.dtype == np.float64 else "fp32"),
                              beta)


def _accumulate_blas(c, a, b, beta):
    from scipy.linalg import blas

    if a.dtype != c.dtype:
        a = a.astype(c.dtype)
    if b.dtype != c.dtype:
        b = b.astype(c.dtype)
    if not (c.flags.c_contiguous and a.flags.c_contiguous and b.flags.c_contiguous):
        c[...] = a @ b + beta * c
        return c
    gemm = blas.get_blas_funcs("gemm", (a, b, c))
    gemm(1.0, b.T, a.T, beta=beta, c=c.T, overwrite_c=1)
    return c


# cuBLAS enums (cublas_api.h / library_types.h)
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16BF = 0, 1, 14
_COMPUTE = {"fp64": 70, "fp32": 68, "tf32": 77, "bf16": 68}  # 64F, 32F, 32F_FAST_TF32, 32F
_IN_TYPE = {"fp64": _CUDA_R_64F, "fp32": _CUDA_R_32F, "tf32": _CUDA_R_32F, "bf16": _CUDA_R_16BF}
_GEMM_DEFAULT = -1


def _accumulate_cublas(c, a, b, precision: str, beta: float):
    import cupy
    from cupy.cuda import cublas, device

    for name, x in (("a", a), ("b", b), ("c", c)):
        if not x.flags.c_contiguous:
            raise ValueError(f"block {name} must be C-contiguous for cuBLAS")
    m, k = a.shape
    n = b.shape[1]
    out_type = _CUDA_R_64F if precision == "fp64" else _CUDA_R_32F
    scalar = np.float64 if precision == "fp64" else np.float32
    one = np.ones(1, dtype=scalar)
    beta_host = np.full(1, beta, dtype=scalar)
    handle = device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, k,
                  one.ctypes.data, b.data.ptr, _IN_TYPE[precision], n,
                  a.data.ptr, _IN_TYPE[precision], k,
                  beta_host.ctypes.data, c.data.ptr, out_type, n,
                  _COMPUTE[precision], _GEMM_DEFAULT)
    return c
