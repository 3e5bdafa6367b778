"""Compute precisions for dense products, on NumPy and CuPy alike.

fp64 and fp32 compute in that type. tf32 computes float32 products on the tensor cores with
inputs rounded to TF32 (10-bit mantissa). bf16 rounds the inputs to bfloat16 (on the GPU, where
they are converted) and accumulates in float32. On CuPy, bf16 blocks are kept as uint16 bit
patterns (CuPy has no bfloat16 dtype), so they cost half the memory and half the bytes per
shift. The NumPy functions here are the reference: the CuPy conversion must match them bit for
bit, and NumPy workers emulate tf32/bf16 by rounding the inputs the same way.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("fp64", "fp32", "tf32", "bf16")
# Unit roundoff of the inputs each precision multiplies (for error bounds and ABFT tolerances).
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-24}


def default(dtype) -> str:
    return "fp64" if np.dtype(dtype) == np.float64 else "fp32"


def output_dtype(precision: str) -> np.dtype:
    return np.dtype(np.float64 if precision == "fp64" else np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as uint16 bit patterns; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_to_float32(h: np.ndarray) -> np.ndarray:
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    keep = ~np.uint32((1 << 13) - 1)
    rounded = ((bits + np.uint32(0xFFF) + ((bits >> 13) & np.uint32(1))) & keep)
    out = rounded.view(np.float32)
    return np.where(np.isfinite(x), out, x).astype(np.float32)


def stored_dtype(xp, precision: str) -> np.dtype:
    """The dtype of a block as the product reads it (bf16 bit patterns on CuPy)."""
    if precision == "fp64":
        return np.dtype(np.float64)
    if precision == "bf16" and xp is not np:
        return np.dtype(np.uint16)
    return np.dtype(np.float32)


def to_device(xp, block: np.ndarray, precision: str):
    """A host block as the device array the product multiplies (rounded for tf32/bf16 on NumPy,
    converted on the GPU for bf16 on CuPy)."""
    if precision == "fp64":
        return xp.asarray(block, dtype=np.float64)
    if xp is np:
        block = np.asarray(block, dtype=np.float32)
        if precision == "bf16":
            return bf16_to_float32(round_bf16(block))
        if precision == "tf32":
            return round_tf32(block)
        return block
    device = xp.asarray(block, dtype=np.float32)
    if precision == "bf16":
        return _cupy_bf16(device)
    return device  # tf32 rounding happens inside cuBLAS


def as_float(xp, block, precision: str):
    """A device block's values as a float array (bf16 bit patterns widened to float32)."""
    if xp is not np and precision == "bf16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block


# float32 -> bfloat16 bits, ties to even, NaN kept a (quiet) NaN: round_bf16's rule, for every
# CUDA kernel that rounds (abft.py's fused passes include it)
BF16_DEVICE = r"""
__device__ __forceinline__ unsigned short to_bf16(float x) {
    unsigned int b = __float_as_uint(x);
    return isnan(x) ? (unsigned short)((b >> 16) | 0x40u)
                    : (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
"""
# eight values per thread and step, in two 16-byte loads and one 16-byte store, where the
# block starts on a 16-byte boundary (CuPy's elementwise kernel, one value at a time, ran at
# half the memory bandwidth)
_BF16_SOURCE = BF16_DEVICE + r"""
extern "C" __global__ void mx_round_bf16(const float* x, unsigned short* y, long long n,
                                         int vector) {
    long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long groups = vector ? n / 8 : 0;
    for (long long g = first; g < groups; g += stride) {
        float4 lo = ((const float4*)x)[2 * g], hi = ((const float4*)x)[2 * g + 1];
        uint4 out;
        out.x = to_bf16(lo.x) | ((unsigned int)to_bf16(lo.y) << 16);
        out.y = to_bf16(lo.z) | ((unsigned int)to_bf16(lo.w) << 16);
        out.z = to_bf16(hi.x) | ((unsigned int)to_bf16(hi.y) << 16);
        out.w = to_bf16(hi.z) | ((unsigned int)to_bf16(hi.w) << 16);
        ((uint4*)y)[g] = out;
    }
    for (long long i = groups * 8 + first; i < n; i += stride) y[i] = to_bf16(x[i]);
}
"""
_BF16_MODULE = None


def _cupy_bf16(x):
    global _BF16_MODULE
    import cupy

    if _BF16_MODULE is None:
        _BF16_MODULE = cupy.RawModule(code=_BF16_SOURCE)
    x = cupy.ascontiguousarray(x)
    y = cupy.empty(x.shape, dtype=np.uint16)
    if x.size:
        threads = 256
        blocks = min(-(-x.size // (8 * threads)), 65536)
        _BF16_MODULE.get_function("mx_round_bf16")(
            (blocks,), (threads,), (x, y, np.int64(x.size), np.int32(x.data.ptr % 16 == 0)))
    return y
