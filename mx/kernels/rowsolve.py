"""Exact row solves of ALS in one GPU kernel: Gram matrix, right-hand side, Cholesky, solve.

``lsq.solve_exact`` (the NumPy/CuPy reference) gathers every row's Y_Ωi into a padded
(rows × degree × k) tensor, forms the Gram matrices with batched GEMMs, stores them all and
solves them with a batched LU. At MovieLens size that moves gigabytes through memory and
costs most of a sweep. Here one thread block owns one row: it streams Y_Ωi through shared
memory in chunks, accumulates G_i = Y_Ωiᵀ Y_Ωi + reg·I in registers (each thread 4×4 values
of G, so each staged value it loads serves four products) and b_i = Y_Ωiᵀ m_i,
then factors G_i in shared memory (Cholesky) and solves. Nothing but x_i is written. Rows
whose G_i is singular to working precision (fewer observations than the rank, with no
regularisation) are flagged, and the caller gives those few the minimum-norm solution.

For k ≤ 64 (a 64×64 Gram in shared memory); larger ranks use the reference path.
"""

from __future__ import annotations

import numpy as np

MAX_RANK = 64
THREADS = 256  # 16×16 threads, each a 4×4 tile of the 64×64 Gram matrix
CHUNK = 32  # entries of Ω_i staged in shared memory at a time

_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256)
als_rows(const long long* __restrict__ indptr, const long long* __restrict__ cols,
         const T* __restrict__ vals, const T* __restrict__ y, const long long* __restrict__ rows,
         const int nrows, const int k, const T reg, T* __restrict__ out, int* __restrict__ failed)
{
    // ybuf (the chunk of Y rows) and G share memory: G is written only after accumulation
    extern __shared__ unsigned char smem_raw[];
    T* ybuf = reinterpret_cast<T*>(smem_raw);        // CHUNK × 64
    T* G = ybuf;                                     // 64 × 64 after accumulation
    T* b = ybuf + 64 * 64;                           // 64
    T* mbuf = b + 64;                                // CHUNK
    __shared__ int bad;
    const int r = blockIdx.x;
    if (r >= nrows) return;
    const long long row = rows[r];
    const long long s = indptr[row], e = indptr[row + 1];
    const int tid = threadIdx.x;
    // thread (ti, tj) owns G[ti + 16a][tj + 16c]: a warp reads 16 consecutive values of a
    // staged vector, free of shared-memory bank conflicts
    const int ti = tid / 16, tj = tid % 16;
    T acc[4][4];
    for (int a = 0; a < 4; a++) for (int c = 0; c < 4; c++) acc[a][c] = 0;
    T bacc = 0;
    if (tid == 0) bad = 0;
    for (long long base = s; base < e; base += CHUNK) {
        const int cnt = (int)min((long long)CHUNK, e - base);
        for (int t = tid; t < CHUNK * 64; t += blockDim.x) {
            const int q = t / 64, c = t % 64;
            ybuf[t] = (q < cnt && c < k) ? y[cols[base + q] * k + c] : (T)0;
        }
        for (int t = tid; t < CHUNK; t += blockDim.x) mbuf[t] = t < cnt ? vals[base + t] : (T)0;
        __syncthreads();
        for (int q = 0; q < cnt; q++) {
            const T* yq = ybuf + q * 64;
            T yi[4], yj[4];
            for (int a = 0; a < 4; a++) { yi[a] = yq[ti + 16 * a]; yj[a] = yq[tj + 16 * a]; }
            for (int a = 0; a < 4; a++)
                for (int c = 0; c < 4; c++) acc[a][c] += yi[a] * yj[c];
            if (tid < 64) bacc += mbuf[q] * yq[tid];
        }
        __syncthreads();
    }
    for (int a = 0; a < 4; a++)
        for (int c = 0; c < 4; c++)
            G[(ti + 16 * a) * 64 + tj + 16 * c] = acc[a][c] + ((ti + 16 * a == tj + 16 * c) ? reg : (T)0);
    if (tid < 64) b[tid] = bacc;
    __syncthreads();
    // Cholesky, lower triangle in place. A pivot that rounding alone could have made (at
    // most PIVOT × the largest diagonal) means G is singular: flagged, solved elsewhere.
    __shared__ T floor_;
    if (tid == 0) {
        T top = 0;
        for (int c = 0; c < k; c++) top = G[c * 64 + c] > top ? G[c * 64 + c] : top;
        floor_ = (T)PIVOT * top;
    }
    __syncthreads();
    for (int c = 0; c < k; c++) {
        if (tid == 0) {
            const T d = G[c * 64 + c];
            if (!(d > floor_)) bad = 1;
            G[c * 64 + c] = d > (T)0 ? sqrt(d) : (T)1;
        }
        __syncthreads();
        for (int i = c + 1 + tid; i < k; i += blockDim.x) G[i * 64 + c] /= G[c * 64 + c];
        __syncthreads();
        const int w = k - c - 1;
        for (int t = tid; t < w * w; t += blockDim.x) {
            const int i = c + 1 + t / w, j = c + 1 + t % w;
            if (j <= i) G[i * 64 + j] -= G[i * 64 + c] * G[j * 64 + c];
        }
        __syncthreads();
    }
    // L z = b, then Lᵀ x = z
    for (int c = 0; c < k; c++) {
        if (tid == 0) b[c] /= G[c * 64 + c];
        __syncthreads();
        for (int i = c + 1 + tid; i < k; i += blockDim.x) b[i] -= G[i * 64 + c] * b[c];
        __syncthreads();
    }
    for (int c = k - 1; c >= 0; c--) {
        if (tid == 0) b[c] /= G[c * 64 + c];
        __syncthreads();
        for (int i = tid; i < c; i += blockDim.x) b[i] -= G[c * 64 + i] * b[c];
        __syncthreads();
    }
    if (tid < k) out[row * k + tid] = b[tid];
    if (tid == 0) failed[r] = bad;
}
"""

_MODULES: dict = {}


def singular_floor(dtype) -> float:
    """Relative size below which a pivot (or singular value) is taken for rounding noise."""
    return 1e-9 if dtype == np.float64 else 1e-4


def supported(xp, y) -> bool:
    """The fused kernel runs on CuPy arrays of rank ≤ 64 in float32 or float64."""
    return xp is not np and y.shape[1] <= MAX_RANK and y.dtype in (np.float32, np.float64)


def _kernel(dtype):
    import cupy

    name = "double" if dtype == np.float64 else "float"
    module = _MODULES.get(name)
    if module is None:
        pivot = singular_floor(dtype)
        code = f"#define T {name}\n#define CHUNK {CHUNK}\n#define PIVOT {pivot}\n" + _SOURCE
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[name] = module
    return module.get_function("als_rows")


def solve(xp, y, indptr, cols, values, reg, rows, out):
    """Solve the rows ``rows`` (int64 ids) into ``out``; returns the ids of the rows whose
    Gram matrix was singular (left for the pseudo-inverse of the reference path)."""
    k = y.shape[1]
    n = int(rows.size)
    failed = xp.zeros(n, dtype=np.int32)
    if n == 0:
        return rows[:0]
    dtype = y.dtype
    fn = _kernel(dtype)
    smem = (64 * 64 + 64 + CHUNK) * dtype.itemsize
    y = xp.ascontiguousarray(y)
    fn((n,), (THREADS,), (indptr.astype(np.int64), cols.astype(np.int64),
                          xp.ascontiguousarray(values, dtype=dtype), y, rows.astype(np.int64),
                          np.int32(n), np.int32(k), dtype.type(reg), out, failed),
       shared_mem=smem)
    return rows[failed != 0]
