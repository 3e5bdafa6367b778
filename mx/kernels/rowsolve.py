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

For k ≤ 128: the Gram matrix is padded to KMAX = 64 or 128 (a KMAX² Gram in shared memory,
each of the 256 threads holding (KMAX/16)² of its values); larger ranks use the reference
path.

The CG path gets two warp-per-row kernels: ``row_dots`` (x_i·y_j for every entry, without the
(entries × k) gathered temporaries of ``lsq.predictions``) and ``normal_apply`` (the normal
operator in one pass: residual weights and the sparse product fused).
"""

from __future__ import annotations

import numpy as np

MAX_RANK = 128
THREADS = 256  # 16×16 threads, each (KMAX/16)² values of the KMAX×KMAX Gram matrix
CHUNK = 32  # entries of Ω_i staged in shared memory at a time

_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256)
als_rows(const long long* __restrict__ indptr, const long long* __restrict__ cols,
         const T* __restrict__ vals, const T* __restrict__ y, const long long* __restrict__ rows,
         const int nrows, const int k, const T reg, T* __restrict__ out, int* __restrict__ failed)
{
    // ybuf (the chunk of Y rows) and G share memory: G is written only after accumulation
    extern __shared__ unsigned char smem_raw[];
    T* ybuf = reinterpret_cast<T*>(smem_raw);        // CHUNK × KMAX
    T* G = ybuf;                                     // KMAX × KMAX after accumulation
    T* b = ybuf + KMAX * KMAX;                       // KMAX
    T* mbuf = b + KMAX;                              // CHUNK
    __shared__ int bad;
    const int r = blockIdx.x;
    if (r >= nrows) return;
    const long long row = rows[r];
    const long long s = indptr[row], e = indptr[row + 1];
    const int tid = threadIdx.x;
    // thread (ti, tj) owns G[ti + 16a][tj + 16c]: a warp reads 16 consecutive values of a
    // staged vector, free of shared-memory bank conflicts
    const int ti = tid / 16, tj = tid % 16;
    T acc[TILE][TILE];
    for (int a = 0; a < TILE; a++) for (int c = 0; c < TILE; c++) acc[a][c] = 0;
    T bacc = 0;
    if (tid == 0) bad = 0;
    for (long long base = s; base < e; base += CHUNK) {
        const int cnt = (int)min((long long)CHUNK, e - base);
        for (int t = tid; t < CHUNK * KMAX; t += blockDim.x) {
            const int q = t / KMAX, c = t % KMAX;
            ybuf[t] = (q < cnt && c < k) ? y[cols[base + q] * k + c] : (T)0;
        }
        for (int t = tid; t < CHUNK; t += blockDim.x) mbuf[t] = t < cnt ? vals[base + t] : (T)0;
        __syncthreads();
        for (int q = 0; q < cnt; q++) {
            const T* yq = ybuf + q * KMAX;
            T yi[TILE], yj[TILE];
            for (int a = 0; a < TILE; a++) { yi[a] = yq[ti + 16 * a]; yj[a] = yq[tj + 16 * a]; }
            for (int a = 0; a < TILE; a++)
                for (int c = 0; c < TILE; c++) acc[a][c] += yi[a] * yj[c];
            if (tid < KMAX) bacc += mbuf[q] * yq[tid];
        }
        __syncthreads();
    }
    for (int a = 0; a < TILE; a++)
        for (int c = 0; c < TILE; c++)
            G[(ti + 16 * a) * KMAX + tj + 16 * c] = acc[a][c] + ((ti + 16 * a == tj + 16 * c) ? reg : (T)0);
    if (tid < KMAX) b[tid] = bacc;
    __syncthreads();
    // Cholesky, lower triangle in place. A pivot that rounding alone could have made (at
    // most PIVOT × the largest diagonal) means G is singular: flagged, solved elsewhere.
    __shared__ T floor_;
    if (tid == 0) {
        // fewer observations than the rank, unregularised: singular whatever rounding says
        if (reg == (T)0 && e - s < k) bad = 1;
        T top = 0;
        for (int c = 0; c < k; c++) top = G[c * KMAX + c] > top ? G[c * KMAX + c] : top;
        floor_ = (T)PIVOT * top;
    }
    __syncthreads();
    for (int c = 0; c < k; c++) {
        if (tid == 0) {
            const T d = G[c * KMAX + c];
            if (!(d > floor_)) bad = 1;
            G[c * KMAX + c] = d > (T)0 ? sqrt(d) : (T)1;
        }
        __syncthreads();
        for (int i = c + 1 + tid; i < k; i += blockDim.x) G[i * KMAX + c] /= G[c * KMAX + c];
        __syncthreads();
        const int w = k - c - 1;
        for (int t = tid; t < w * w; t += blockDim.x) {
            const int i = c + 1 + t / w, j = c + 1 + t % w;
            if (j <= i) G[i * KMAX + j] -= G[i * KMAX + c] * G[j * KMAX + c];
        }
        __syncthreads();
    }
    // L z = b, then Lᵀ x = z
    for (int c = 0; c < k; c++) {
        if (tid == 0) b[c] /= G[c * KMAX + c];
        __syncthreads();
        for (int i = c + 1 + tid; i < k; i += blockDim.x) b[i] -= G[i * KMAX + c] * b[c];
        __syncthreads();
    }
    for (int c = k - 1; c >= 0; c--) {
        if (tid == 0) b[c] /= G[c * KMAX + c];
        __syncthreads();
        for (int i = tid; i < c; i += blockDim.x) b[i] -= G[c * KMAX + i] * b[c];
        __syncthreads();
    }
    if (tid < k) out[row * k + tid] = b[tid];
    if (tid == 0) failed[r] = bad;
}
"""

# One warp per row of Ω (CSR), lane l holding components l, l+32, ... of the row's vector:
# the row's x_i is read once, each y_j once, coalesced; dot products reduce by shuffles.
_WARP_SOURCE = r"""
__device__ inline T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

extern "C" __global__ void row_dots(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const T* __restrict__ x, const T* __restrict__ y,
        const long long m, const int k, T* __restrict__ out)
{
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (i >= m) return;
    T xi[KPL];
    for (int t = 0; t < KPL; t++) { const int c = lane + 32 * t; xi[t] = c < k ? x[i * k + c] : (T)0; }
    for (long long e = indptr[i]; e < indptr[i + 1]; e++) {
        const long long j = cols[e];
        T d = 0;
        for (int t = 0; t < KPL; t++) { const int c = lane + 32 * t; if (c < k) d += xi[t] * y[j * k + c]; }
        d = warp_sum(d);
        if (lane == 0) out[e] = d;
    }
}

extern "C" __global__ void normal_apply(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const T* __restrict__ p, const T* __restrict__ y,
        const long long m, const int k, const T reg, T* __restrict__ out)
{
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (i >= m) return;
    T pi[KPL], acc[KPL];
    for (int t = 0; t < KPL; t++) {
        const int c = lane + 32 * t;
        pi[t] = c < k ? p[i * k + c] : (T)0;
        acc[t] = reg * pi[t];
    }
    for (long long e = indptr[i]; e < indptr[i + 1]; e++) {
        const long long j = cols[e];
        T yj[KPL];
        T d = 0;
        for (int t = 0; t < KPL; t++) {
            const int c = lane + 32 * t;
            yj[t] = c < k ? y[j * k + c] : (T)0;
            d += pi[t] * yj[t];
        }
        d = warp_sum(d);
        for (int t = 0; t < KPL; t++) acc[t] += d * yj[t];
    }
    for (int t = 0; t < KPL; t++) { const int c = lane + 32 * t; if (c < k) out[i * k + c] = acc[t]; }
}
"""
WARP_MAX_RANK = 128
WARPS_PER_BLOCK = 8

_MODULES: dict = {}


def singular_floor(dtype) -> float:
    """Relative size below which a pivot (or singular value) is taken for rounding noise."""
    return 1e-9 if dtype == np.float64 else 1e-4


def warp_supported(xp, y) -> bool:
    """The warp-per-row kernels run on CuPy arrays of rank ≤ 128 in float32 or float64."""
    return xp is not np and y.shape[1] <= WARP_MAX_RANK and y.dtype in (np.float32, np.float64)


def _warp_kernel(name: str, dtype, k: int):
    import cupy

    t = "double" if dtype == np.float64 else "float"
    kpl = (k + 31) // 32
    module = _MODULES.get(("warp", t, kpl))
    if module is None:
        module = cupy.RawModule(code=f"#define T {t}\n#define KPL {kpl}\n" + _WARP_SOURCE,
                                options=("-std=c++14",))
        _MODULES[("warp", t, kpl)] = module
    return module.get_function(name)


def _warp_launch(fn, m: int, args) -> None:
    threads = 32 * WARPS_PER_BLOCK
    blocks = (m + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    if blocks:
        fn((blocks,), (threads,), args)


def row_dots(xp, x, y, indptr, cols):
    """x_i · y_j for every stored entry (i, j) of a CSR pattern, in its storage order."""
    m, k = x.shape[0], x.shape[1]
    out = xp.empty(int(cols.size), dtype=x.dtype)
    _warp_launch(_warp_kernel("row_dots", x.dtype, k), m,
                 (indptr.astype(np.int64), cols.astype(np.int64), xp.ascontiguousarray(x),
                  xp.ascontiguousarray(y, dtype=x.dtype), np.int64(m), np.int32(k), out))
    return out


def normal_apply(xp, p, y, indptr, cols, reg):
    """(Y_Ωiᵀ Y_Ωi + reg I) p_i for every row, in one pass over Ω."""
    m, k = p.shape[0], p.shape[1]
    out = xp.empty((m, k), dtype=p.dtype)
    _warp_launch(_warp_kernel("normal_apply", p.dtype, k), m,
                 (indptr.astype(np.int64), cols.astype(np.int64), xp.ascontiguousarray(p),
                  xp.ascontiguousarray(y, dtype=p.dtype), np.int64(m), np.int32(k),
                  p.dtype.type(reg), out))
    return out


def supported(xp, y) -> bool:
    """The fused kernel runs on CuPy arrays of rank ≤ 128 in float32 or float64."""
    return xp is not np and y.shape[1] <= MAX_RANK and y.dtype in (np.float32, np.float64)


def _kmax(k: int) -> int:
    return 64 if k <= 64 else 128


def _kernel(dtype, kmax: int):
    import cupy

    name = "double" if dtype == np.float64 else "float"
    module = _MODULES.get((name, kmax))
    if module is None:
        pivot = singular_floor(dtype)
        code = (f"#define T {name}\n#define CHUNK {CHUNK}\n#define PIVOT {pivot}\n"
                f"#define KMAX {kmax}\n#define TILE {kmax // 16}\n" + _SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[(name, kmax)] = module
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
    kmax = _kmax(k)
    fn = _kernel(dtype, kmax)
    smem = (kmax * kmax + kmax + CHUNK) * dtype.itemsize
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    y = xp.ascontiguousarray(y)
    fn((n,), (THREADS,), (indptr.astype(np.int64), cols.astype(np.int64),
                          xp.ascontiguousarray(values, dtype=dtype), y, rows.astype(np.int64),
                          np.int32(n), np.int32(k), dtype.type(reg), out, failed),
       shared_mem=smem)
    return rows[failed != 0]
