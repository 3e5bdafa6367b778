"""adaLN: LayerNorm (no affine, eps 1e-6, statistics in float32) then x·(1 + scale) + shift,
optionally after the residual update x ← x + gate·(y + bias) that precedes it in a DiT block.

On the GPU each is one kernel, one warp per row: the residual, the statistics and the
modulation would otherwise be five to eight passes over a (tokens × width) array, and with the
bias of the previous linear layer folded in, that layer needs no pass of its own either.
NumPy is the reference: the same operations, one after the other.
"""

from __future__ import annotations

import numpy as np

from mx.kernels import pointwise

EPS = 1e-6
WARPS = 8  # rows per block: one warp each


def modulate(xp, x, shift, scale):
    """LayerNorm of x's rows, then ·(1 + scale) + shift (both broadcast over rows)."""
    if pointwise.on_gpu(xp, x):
        return _launch(x, None, None, None, shift, scale)[1]
    return _reference(xp, x, shift, scale)


def residual_modulate(xp, x, gate, y, bias, shift, scale):
    """(x + gate·(y + bias), modulate of it); gate, bias, shift and scale broadcast over rows."""
    if pointwise.on_gpu(xp, x):
        return _launch(x, gate, y, bias, shift, scale)
    x = x + gate * (y + bias)
    return x, _reference(xp, x, shift, scale)


def _reference(xp, x, shift, scale):
    x32 = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    mean = x32.mean(axis=-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(axis=-1, keepdims=True)
    normed = ((x32 - mean) / xp.sqrt(var + EPS)).astype(x.dtype, copy=False)
    return normed * (1 + scale) + shift


_SOURCE = pointwise.PRELUDE + r"""
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row, each lane VEC columns at a time (cols % VEC == 0, rows VEC-aligned). With
// RESIDUAL, x' = x + gate·(y + bias) is rounded to T and stored in xout first (what the next
// layer reads), and normalised as stored.
extern "C" __global__ void mx_adaln(const T* __restrict__ x, const T* __restrict__ gate,
                                    const T* __restrict__ y, const T* __restrict__ bias,
                                    const T* __restrict__ shift, const T* __restrict__ scale,
                                    T* __restrict__ xout, T* __restrict__ h,
                                    long long rows, int cols, float eps) {
    long long row = (long long)blockIdx.x * WARPS + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* src = x + row * cols;
    float sum = 0.f, a[VEC], b[VEC];
    for (int j = lane * VEC; j < cols; j += 32 * VEC) {
        load(src + j, a);
#if RESIDUAL
        float g[VEC], c[VEC];
        load(gate + j, g);
        load(y + row * cols + j, b);
        load(bias + j, c);
#pragma unroll
        for (int i = 0; i < VEC; i++) a[i] = ld(st(a[i] + g[i] * (b[i] + c[i])));
        store(xout + row * cols + j, a);
#endif
#pragma unroll
        for (int i = 0; i < VEC; i++) sum += a[i];
    }
#if RESIDUAL
    src = xout + row * cols;  // this lane wrote exactly the elements it reads back below
#endif
    float mean = warp_sum(sum) / cols;
    float dev = 0.f;
    for (int j = lane * VEC; j < cols; j += 32 * VEC) {
        load(src + j, a);
#pragma unroll
        for (int i = 0; i < VEC; i++) dev += (a[i] - mean) * (a[i] - mean);
    }
    float rstd = rsqrtf(warp_sum(dev) / cols + eps);
    T* out = h + row * cols;
    for (int j = lane * VEC; j < cols; j += 32 * VEC) {
        float g[VEC], c[VEC];
        load(src + j, a);
        load(scale + j, g);
        load(shift + j, c);
#pragma unroll
        for (int i = 0; i < VEC; i++) b[i] = (a[i] - mean) * rstd * (1.f + g[i]) + c[i];
        store(out + j, b);
    }
}
"""

def _launch(x, gate, y, bias, shift, scale):
    import cupy

    rows, cols = x.shape
    dtype = x.dtype
    vector = lambda v: cupy.ascontiguousarray(v.reshape(-1), dtype=dtype)  # noqa: E731
    for name, v in (("shift", shift), ("scale", scale), ("gate", gate), ("bias", bias)):
        if v is not None and v.size != cols:
            raise ValueError(f"adaLN {name} has {v.size} values for rows of {cols}")
    x = cupy.ascontiguousarray(x)
    residual = gate is not None
    h = cupy.empty_like(x)
    xout = cupy.empty_like(x) if residual else x
    if residual:
        y = cupy.ascontiguousarray(y, dtype=dtype)
        if y.shape != x.shape:
            raise ValueError(f"adaLN residual: y is {y.shape}, x is {x.shape}")
        gate, bias = vector(gate), vector(bias)
    else:
        gate = y = bias = x  # unread
    arrays = (x, gate, y, bias, vector(shift), vector(scale), xout, h)
    vec = pointwise.widest(cols, dtype.itemsize, arrays)
    kernel = pointwise.compiled(_SOURCE, "mx_adaln", HALF=int(dtype == np.float16),
                                RESIDUAL=int(residual), WARPS=WARPS, VEC=vec)
    kernel((-(-rows // WARPS),), (32 * WARPS,),
           (*arrays, np.int64(rows), np.int32(cols), np.float32(EPS)))
    return xout, h
