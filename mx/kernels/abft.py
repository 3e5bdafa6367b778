"""Algorithm-based fault tolerance for block products (``params: {verify: abft}``).

Each block product P = A·B is checked row by row before it reaches C: P·[e, w] must equal
A·(B·[e, w]) to within the rounding bound, where e is all ones and w a second weight vector
(1..7, cycling) that catches errors cancelling inside a row's plain sum. The right-hand side
costs one pass over B and one over A; the check is one pass over P. A row that fails is not
added to C: its row of the product is recomputed (a transient fault: a flipped bit, a bad
kernel launch) and checked again, and a row that fails twice fails the task with a message
naming the worker and round.

Where C is known to be zero (the first product into it) the product is written straight into
C and checked there, so it costs no scratch block and no extra pass. Otherwise it goes to a
scratch block, and one fused pass checks each row and adds the rows that pass. On CuPy both
passes over the inputs and the check are RawKernels that read the stored precision (bf16 bit
patterns included) and accumulate in float32 (float64 for fp64): a few percent of a product
worth distributing, where widening copies and generic reductions cost more than the product.
"""

from __future__ import annotations

import os

import numpy as np

from mx.kernels import gemm
from mx.kernels.precision import UNIT_ROUNDOFF, as_float, output_dtype

# For tests and drills: MX_FAULT="abft:<gang rank>:<round>" corrupts that product once.
FAULT_ENV = "MX_FAULT"
W_MAX = 7.0  # the largest weight in w


class ChecksumError(RuntimeError):
    pass


def planned_fault(rank: int) -> set[int]:
    spec = os.environ.get(FAULT_ENV, "")
    rounds = set()
    for item in filter(None, spec.split(",")):
        kind, who, when = item.split(":")
        if kind == "abft" and int(who) == rank:
            rounds.add(int(when))
    return rounds


def weights(n: int, dtype=np.float64) -> np.ndarray:
    """The n×2 checksum weights [e, w], w_j = 1 + j mod 7 (exact in every precision)."""
    j = np.arange(n)
    return np.stack([np.ones(n), 1.0 + j % 7], axis=1).astype(dtype)


def row_checks(xp, x, v, precision: str):
    """(x·v, max row abs-sum of x) for a block as stored (bf16 bits widened), v = None for the
    weights [e, w]; accumulated in the precision's float type."""
    if xp is not np:
        return _row_checks_cupy(x, v, precision)
    xf = np.asarray(as_float(np, x, precision))
    if v is None:
        v = weights(xf.shape[1], xf.dtype)
    return xf @ v, float(np.abs(xf).sum(axis=1).max()) if xf.size else 0.0


def checked_accumulate(xp, c, a, b, precision: str, counters: dict, label: str,
                       corrupt: bool = False, fresh: bool = False) -> int:
    """``c += a @ b``, verified row by row; ``fresh`` says c is all zeros. Returns the number
    of rows recomputed."""
    k, n = a.shape[1], b.shape[1]
    bv, b_abs = row_checks(xp, b, None, precision)
    expect, a_abs = row_checks(xp, a, bv, precision)
    # rounding bound of a weighted row sum of a k-term product, plus the sums themselves
    tol = (4.0 * UNIT_ROUNDOFF[precision] * (k + n + 2) * W_MAX * a_abs * b_abs
           + np.finfo(np.float64).tiny)
    target = c if fresh else xp.empty_like(c)
    gemm.accumulate(xp, target, a, b, precision, beta=0.0)
    if corrupt:
        target[(0,) * target.ndim] += 1e3 * (a_abs * b_abs + 1.0)
    bad = _check_add(xp, target, None if fresh else c, expect, tol)
    counters["abft-checked"] = counters.get("abft-checked", 0) + 1
    if bad.size == 0:
        return 0
    # recompute only the rows that failed, into a scratch of their own, and check them again
    redo = xp.empty((bad.size, n), dtype=c.dtype)
    gemm.accumulate(xp, redo, xp.ascontiguousarray(a[bad]), b, precision, beta=0.0)
    still = _check_add(xp, redo, None, expect[bad], tol)
    if still.size:
        raise ChecksumError(f"{label}: block product failed its checksums twice "
                            f"({int(still.size)} of {c.shape[0]} rows off); "
                            f"the inputs may hold NaN/Inf or the device is faulty")
    if fresh:
        c[bad] = redo
    else:
        c[bad] += redo
    counters["abft-recomputed"] = counters.get("abft-recomputed", 0) + 1
    return int(bad.size)


def _check_add(xp, p, c, expect, tol: float):
    """Rows of p whose weighted sums miss ``expect`` by more than tol (as an index array);
    when c is given, the rows that pass are added to it."""
    if xp is not np:
        return _check_add_cupy(p, c, expect, tol)
    got = p @ weights(p.shape[1], p.dtype)
    ok = (np.abs(got - expect) <= tol).all(axis=1)
    if c is not None:
        np.add(c, p, out=c, where=ok[:, None])
    return np.flatnonzero(~ok)


def accumulate(xp, c, a, b, precision: str, verify: str | None, counters: dict, label: str,
               corrupt: bool = False, fresh: bool = False) -> None:
    """``c += a @ b``, checked by checksums when ``verify`` is "abft" (``fresh``: c is zero)."""
    if verify == "abft":
        checked_accumulate(xp, c, a, b, precision, counters, label, corrupt, fresh)
    else:
        gemm.accumulate(xp, c, a, b, precision)


# ---------------------------------------------------------------------------------- CuPy
# Blocks of THREADS, 16-byte loads where rows allow: the check takes one row per block, the
# input passes ROWS rows. X is the stored block (bf16 bit patterns, float or double), A the
# accumulator type. The weights [e, w] are made from the column index, so the
# pass over B reads nothing but B; the pass over A reads the k×2 vector B·[e, w] from L2.
THREADS = 256  # per block, in both kernels
ROWS = 8  # rows per block of the input passes
_SOURCE = r"""
#define VEC ((int)(16 / sizeof(X)))

// the block's totals of s0 and s1, in thread 0
__device__ __forceinline__ void block_sum2(A& s0, A& s1, A* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        s0 += __shfl_down_sync(0xffffffffu, s0, o);
        s1 += __shfl_down_sync(0xffffffffu, s1, o);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { shared[warp * 2] = s0; shared[warp * 2 + 1] = s1; }
    __syncthreads();
    if (warp == 0) {
        s0 = lane < THREADS / 32 ? shared[lane * 2] : (A)0;
        s1 = lane < THREADS / 32 ? shared[lane * 2 + 1] : (A)0;
        for (int o = 16; o > 0; o >>= 1) {
            s0 += __shfl_down_sync(0xffffffffu, s0, o);
            s1 += __shfl_down_sync(0xffffffffu, s1, o);
        }
    }
}

// Visits a row's elements as (column, value), in 16-byte loads when the row allows.
template <typename F>
__device__ __forceinline__ void each(const X* row, int cols, bool vector, F f) {
    if (vector) {
        const uint4* chunks = (const uint4*)row;
        for (int q = threadIdx.x; q < cols / VEC; q += THREADS) {
            uint4 raw = chunks[q];
            const X* vals = (const X*)&raw;
#pragma unroll
            for (int e = 0; e < VEC; ++e) f(q * VEC + e, TO_A(vals[e]));
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += THREADS) f(j, TO_A(row[j]));
    }
}

// y[r] = x[r,:]·v (v = [e, w] when null), absmax = max over rows of sum |x[r,:]|. A block
// takes ROWS rows, so each chunk of v is loaded once for all of them.
extern "C" __global__ void mx_abft_row_checks(const X* x, long long rows, int cols, int vector,
                                              const A* v, A* y, A* absmax) {
    __shared__ A shared[THREADS / 32][3 * ROWS];
    long long r0 = (long long)blockIdx.x * ROWS;
    int nr = (int)min((long long)ROWS, rows - r0);
    A s[3 * ROWS];
#pragma unroll
    for (int i = 0; i < 3 * ROWS; ++i) s[i] = 0;
    const X* base = x + (size_t)r0 * cols;
    int step = vector ? VEC : 1;
    for (int j0 = threadIdx.x * step; j0 < cols; j0 += THREADS * step) {
        A v0[VEC], v1[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            int j = j0 + e;
            bool in = e < step;
            v0[e] = !in ? (A)0 : v ? v[2 * j] : (A)1;
            v1[e] = !in ? (A)0 : v ? v[2 * j + 1] : (A)(1 + j % 7);
        }
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            if (i >= nr) break;
            const X* row = base + (size_t)i * cols;
            union { uint4 raw; X vals[VEC]; } chunk;
            if (vector) chunk.raw = *(const uint4*)(row + j0);
            else chunk.vals[0] = row[j0];
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                if (e >= step) break;
                A value = TO_A(chunk.vals[e]);
                s[3 * i] += value * v0[e]; s[3 * i + 1] += value * v1[e]; s[3 * i + 2] += fabs(value);
            }
        }
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 3 * ROWS; ++i) {
        for (int o = 16; o > 0; o >>= 1) s[i] += __shfl_down_sync(0xffffffffu, s[i], o);
        if (lane == 0) shared[warp][i] = s[i];
    }
    __syncthreads();
    if (threadIdx.x < 3 * nr) {
        A total = 0;
        for (int w = 0; w < THREADS / 32; ++w) total += shared[w][threadIdx.x];
        int i = threadIdx.x / 3, which = threadIdx.x % 3;
        if (which < 2) y[2 * (r0 + i) + which] = total;
        // non-negative floats order as their bit patterns: an integer atomicMax
        else if (sizeof(A) == 8) atomicMax((unsigned long long*)absmax, (unsigned long long)__double_as_longlong((double)total));
        else atomicMax((unsigned int*)absmax, __float_as_uint((float)total));
    }
}

// rows of p (X = A here) checked against expect (rows×2); passing rows added to c (when c is
// not null), failing rows flagged in bad
extern "C" __global__ void mx_abft_check_add(const X* p, A* c, long long rows, int cols, int vector,
                                             const A* expect, double tol, int* bad) {
    __shared__ A shared[2 * THREADS / 32];
    __shared__ int ok;
    long long r = blockIdx.x;
    if (r >= rows) return;
    const X* row = p + (size_t)r * cols;
    A s0 = 0, s1 = 0;
    each(row, cols, vector, [&](int j, A value) { s0 += value; s1 += value * (A)(1 + j % 7); });
    block_sum2(s0, s1, shared);
    if (threadIdx.x == 0) {
        // written so that NaN fails
        ok = (fabs((double)s0 - (double)expect[2 * r]) <= tol)
             && (fabs((double)s1 - (double)expect[2 * r + 1]) <= tol);
        bad[r] = !ok;
    }
    __syncthreads();
    if (!ok || !c) return;
    A* out = c + (size_t)r * cols;
    each(row, cols, vector, [&](int j, A value) { out[j] += value; });
}
"""

_MODULES: dict = {}


def _module(stored, acc):
    import cupy

    key = (np.dtype(stored).str, np.dtype(acc).str)
    if key not in _MODULES:
        a = "double" if acc == np.float64 else "float"
        if stored == np.uint16:  # bf16 bit patterns
            x, to_a = "unsigned short", "(A)__uint_as_float(((unsigned int)(V)) << 16)"
        else:
            x, to_a = ("double" if stored == np.float64 else "float"), "(A)(V)"
        code = (f"typedef {a} A;\ntypedef {x} X;\n#define TO_A(V) {to_a}\n"
                f"#define THREADS {THREADS}\n#define ROWS {ROWS}\n" + _SOURCE)
        _MODULES[key] = cupy.RawModule(code=code, options=("-std=c++14",))
    return _MODULES[key]


def _vector(x) -> np.int32:
    """Whether every row of a contiguous block starts on a 16-byte boundary."""
    return np.int32(x.data.ptr % 16 == 0 and (x.shape[1] * x.itemsize) % 16 == 0)


def _row_checks_cupy(x, v, precision: str):
    import cupy

    acc = output_dtype(precision)
    rows, cols = x.shape
    y = cupy.zeros((rows, 2), dtype=acc)
    absmax = cupy.zeros(1, dtype=acc)
    if rows and cols:
        x = cupy.ascontiguousarray(x)
        fn = _module(x.dtype, acc).get_function("mx_abft_row_checks")
        fn((-(-rows // ROWS),), (THREADS,), (x, np.int64(rows), np.int32(cols), _vector(x),
                             0 if v is None else cupy.ascontiguousarray(v, dtype=acc), y, absmax))
    return y, float(absmax.get()[0])


def _check_add_cupy(p, c, expect, tol: float):
    import cupy

    rows, cols = p.shape
    bad = cupy.zeros(rows, dtype=np.int32)
    if rows:
        fn = _module(p.dtype, p.dtype).get_function("mx_abft_check_add")
        fn((rows,), (THREADS,), (p, 0 if c is None else c, np.int64(rows), np.int32(cols),
                             _vector(p), cupy.ascontiguousarray(expect, dtype=p.dtype),
                             np.float64(tol), bad))
    return cupy.flatnonzero(bad)
