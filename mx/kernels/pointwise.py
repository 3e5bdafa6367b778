"""Row-wise pointwise passes of the DiT on the GPU: a linear layer's bias added over rows,
alone or followed by GELU, y = act(x + b) with b broadcast over rows.

CuPy's elementwise kernels would do the same, but a broadcast operand costs them an index
division per element and a 2-byte access per thread; these read and write up to 8 bytes at a
time with no index arithmetic, and run near memory speed. ``PRELUDE`` (float16/float32 loads
and stores, VEC at a time) is shared with the adaLN kernel in ``norm``. NumPy is the
reference.
"""

from __future__ import annotations

import numpy as np

GELU_C = 0.7978845608028654  # sqrt(2 / pi)

PRELUDE = r"""
// halves travel as raw 16-bit patterns: NVRTC here has no cuda_fp16.h
#if HALF
typedef unsigned short T;
__device__ __forceinline__ float ld(T v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T st(float f) { T v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
#else
typedef float T;
__device__ __forceinline__ float ld(T v) { return v; }
__device__ __forceinline__ T st(float f) { return f; }
#endif

// VEC consecutive elements, loaded or stored as one access of VEC·sizeof(T) bytes
struct __align__(sizeof(T) * VEC) Pack { T v[VEC]; };
__device__ __forceinline__ void load(const T* p, float* f) {
    Pack k = *reinterpret_cast<const Pack*>(p);
#pragma unroll
    for (int i = 0; i < VEC; i++) f[i] = ld(k.v[i]);
}
__device__ __forceinline__ void store(T* p, const float* f) {
    Pack k;
#pragma unroll
    for (int i = 0; i < VEC; i++) k.v[i] = st(f[i]);
    *reinterpret_cast<Pack*>(p) = k;
}
"""


def on_gpu(xp, x) -> bool:
    return xp.__name__ == "cupy" and x.dtype in (np.float16, np.float32) and x.ndim == 2


def widest(cols: int, itemsize: int, arrays) -> int:
    """Elements per access: up to 8 bytes, where every row and vector starts aligned to it."""
    for vec in (8 // itemsize, 2, 1):
        if cols % vec == 0 and all(a.data.ptr % (vec * itemsize) == 0 for a in arrays):
            return vec
    return 1


def add_bias(xp, x, b):
    """x + b over rows, written into x (a fresh product) and returned."""
    if on_gpu(xp, x):
        return _launch(x, b, gelu=False, in_place=True)
    x += b
    return x


def bias_gelu(xp, x, b):
    """GELU (tanh form) of x + b."""
    if on_gpu(xp, x):
        return _launch(x, b, gelu=True)
    x = x + b
    return 0.5 * x * (1 + xp.tanh(GELU_C * (x + 0.044715 * x * x * x)))


_SOURCE = PRELUDE + r"""
__device__ __forceinline__ float act(float v) {
#if GELU
    return 0.5f * v * (1.f + tanhf(GELU_C * (v + 0.044715f * v * v * v)));
#else
    return v;
#endif
}

// x's columns j..j+VEC of rows blockIdx.y, + gridDim.y, ...: the bias is loaded once
extern "C" __global__ void mx_bias_act(const T* __restrict__ x, const T* __restrict__ b,
                                       T* y, long long rows, int cols) {
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (j >= cols) return;
    float bias[VEC], v[VEC];
    load(b + j, bias);
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        load(x + r * cols + j, v);
#pragma unroll
        for (int i = 0; i < VEC; i++) v[i] = act(v[i] + bias[i]);
        store(y + r * cols + j, v);
    }
}
"""

THREADS = 256
_KERNELS: dict[tuple, object] = {}


def compiled(source: str, name: str, **defines):
    """Kernel ``name`` of ``source`` compiled with ``-Dkey=value`` for each define, made once."""
    key = (name, source, tuple(sorted(defines.items())))
    if key not in _KERNELS:
        import cupy

        options = tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
        _KERNELS[key] = cupy.RawKernel(source, name, options=options)
    return _KERNELS[key]


def _launch(x, b, gelu: bool, in_place: bool = False):
    import cupy

    rows, cols = x.shape
    if b.size != cols:
        raise ValueError(f"bias has {b.size} values for rows of {cols}")
    x = cupy.ascontiguousarray(x)
    b = cupy.ascontiguousarray(b.reshape(-1), dtype=x.dtype)
    out = x if in_place else cupy.empty_like(x)  # x: contiguous by now
    vec = widest(cols, x.itemsize, (x, b, out))
    grid = (-(-cols // (vec * THREADS)), min(rows, 65535))
    if rows:
        kernel = compiled(_SOURCE, "mx_bias_act", HALF=int(x.dtype == np.float16),
                          GELU=int(gelu), VEC=vec, GELU_C=f"{GELU_C}f")
        kernel(grid, (THREADS,), (x, b, out, np.int64(rows), np.int32(cols)))
    return out
