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

For k ≤ 128: the Gram matrix is padded to KMAX = 32, 64 or 128 (a KMAX² Gram in shared memory,
each of the 256 threads holding (KMAX/16)² of its values); larger ranks use the reference
path.

The CG path gets warp-per-row kernels whose lanes split into groups, each group reading one
entry's row of Y with vector loads (``_GROUP_HELPERS``): ``row_sq_error`` (each row's squared
error on its entries, without the (entries × k) gathered temporaries of ``lsq.predictions``),
``normal_apply`` (the normal operator in one pass: residual weights and the sparse product
fused), ``residual_rows`` and ``cg_rows`` (all of a row's plain CG steps, its vectors in
registers, one pass over the row's entries per step, Y gathered in float16 where a refined
correction allows it). ``spmm_rows`` is the sparse × dense product of the randomized SVD
that starts the sweeps.
"""

from __future__ import annotations

import numpy as np

MAX_RANK = 128
THREADS = 256  # 16×16 threads, each (KMAX/16)² values of the KMAX×KMAX Gram matrix
CHUNK = 32  # entries of Ω_i staged in shared memory at a time

# Device helpers shared by the kernels below (each source is compiled with the ones it uses).
_WARP_SUM = r"""
__device__ inline T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
"""

# Thread (ti, tj) of a 16×16 block owns G[ti + 16a][tj + 16c]: a warp reads 16 consecutive
# values of a staged vector, free of shared-memory bank conflicts, and each value it loads
# serves TILE products.
_ADD_OUTER = r"""
__device__ inline void add_outer(const T* v, int ti, int tj, T acc[TILE][TILE]) {
    T vi[TILE], vj[TILE];
    for (int a = 0; a < TILE; a++) { vi[a] = v[ti + 16 * a]; vj[a] = v[tj + 16 * a]; }
    for (int a = 0; a < TILE; a++)
        for (int c = 0; c < TILE; c++) acc[a][c] += vi[a] * vj[c];
}
"""

# Entries whose rows of Y a warp loads before using any: more loads in flight hide latency,
# at UNROLL·KPL registers each (4 entries at KPL 2, 2 at KPL 4).
_GATHER = r"""
#define UNROLL (KPL >= 8 ? 1 : 8 / KPL)
// Rows j[u] of Y (zeros where j[u] < 0), a warp's lane holding components lane + 32t. All
// UNROLL rows' loads are issued before any is used.
__device__ inline void load_rows(const T* __restrict__ y, int k, const long long* j,
                                 T yj[UNROLL][KPL]) {
    const int lane = threadIdx.x % 32;
    for (int u = 0; u < UNROLL; u++)
        for (int t = 0; t < KPL; t++) {
            const int c = lane + 32 * t;
            yj[u][t] = (j[u] >= 0 && c < k) ? y[j[u] * k + c] : (T)0;
        }
}

// The rows (``load_rows``) and their dot products with v (the lane's components of it),
// summed over the warp.
__device__ inline void gather(const T* __restrict__ y, int k, const long long* j, const T* v,
                              T yj[UNROLL][KPL], T dt[UNROLL]) {
    load_rows(y, k, j, yj);
    for (int u = 0; u < UNROLL; u++) {
        dt[u] = 0;
        for (int t = 0; t < KPL; t++) dt[u] += v[t] * yj[u][t];
    }
    for (int u = 0; u < UNROLL; u++) dt[u] = warp_sum(dt[u]);
}
"""

_SOURCE = r"""
// The right-hand side is Y_Ωiᵀ m_i from ``vals``, or, where ``rhs`` is given, rhs_i (row i at
// i·k: a residual, whose solution is a correction), and then ``vals`` is not read.
extern "C" __global__ void __launch_bounds__(256)
als_rows(const long long* __restrict__ indptr, const long long* __restrict__ cols,
         const T* __restrict__ vals, const T* __restrict__ rhs, const T* __restrict__ y,
         const long long* __restrict__ rows, const int nrows, const int k, const T reg,
         T* __restrict__ out, int* __restrict__ failed)
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
    const int ti = tid / 16, tj = tid % 16;  // its tile of G, as add_outer lays it out
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
        for (int t = tid; t < CHUNK; t += blockDim.x)
            mbuf[t] = t < cnt && rhs == nullptr ? vals[base + t] : (T)0;
        __syncthreads();
        for (int q = 0; q < cnt; q++) {
            const T* yq = ybuf + q * KMAX;
            add_outer(yq, ti, tj, acc);
            if (tid < KMAX) bacc += mbuf[q] * yq[tid];
        }
        __syncthreads();
    }
    for (int a = 0; a < TILE; a++)
        for (int c = 0; c < TILE; c++)
            G[(ti + 16 * a) * KMAX + tj + 16 * c] = acc[a][c] + ((ti + 16 * a == tj + 16 * c) ? reg : (T)0);
    if (tid < KMAX) b[tid] = rhs == nullptr ? bacc : tid < k ? rhs[row * k + tid] : (T)0;
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

# One warp per row of Ω (CSR), split into groups of L lanes: each group takes one entry at a
# time (32/L entries side by side, U of them in flight per group), lane l of a group
# holding components lC .. lC + C − 1 of the row's vectors. A row of Y is read with C-wide
# vector loads from an operand padded to KP = C·L columns (``_operand``); a dot product then
# costs log2(L) shuffles shared by 32/L entries, where one warp per entry paid five each: on an
# H100 a pass over 3e8 entries took a fourth (k = 16) to two thirds (k = 64) of the time.
# Every group holds the row's vectors whole; the sums a group gathered over its entries are
# added across the groups at the end of a pass. S is the operand's storage type, T the
# arithmetic's: a float16 operand (scaled by a power of two into range; ``scale`` undoes it
# on each dot product) halves the bytes a CG correction gathers.
_GROUP_HELPERS = r"""
#include <cuda_fp16.h>
#define GROUPS (32 / L)
// the type of the entries' values, where it is not the arithmetic's
#ifndef V
#define V T
#endif
// NW warps share a row (a block a row) in the wide kernels; one warp a row otherwise
#ifndef NW
#define NW 1
#endif
// the row slot this thread serves: its warp's, or its block's where NW warps share a row
__device__ inline long long row_slot() {
    return NW == 1 ? ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32
                   : (long long)blockIdx.x;
}
// this warp's share of a row's entries: blocks of GROUPS·U from start + part·GROUPS·U
__device__ inline int part() { return NW == 1 ? 0 : (int)(threadIdx.x / 32); }
__device__ inline T group_sum(T v) {
    for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// n sums of each group added over the groups
__device__ inline void across_groups(T* v, int n) {
    for (int o = L; o < 32; o <<= 1)
        for (int c = 0; c < n; c++) v[c] += __shfl_xor_sync(0xffffffff, v[c], o);
}
// n sums of each warp (already added over its groups) added over the NW warps sharing a row,
// in one order on every lane, so that every warp keeps the same vectors
__device__ inline void across_warps(T* v, int n) {
#if NW > 1
    __shared__ T sums[NW][L * C];
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    __syncthreads();  // the last reads of ``sums`` are done
    if (lane < L)
        for (int c = 0; c < n; c++) sums[w][lane * C + c] = v[c];
    __syncthreads();
    for (int c = 0; c < n; c++) {
        T t = 0;
        for (int q = 0; q < NW; q++) t += sums[q][(lane % L) * C + c];
        v[c] = t;
    }
#endif
}
// the lane's C components of row j of the operand (zeros for j < 0), by 16-byte loads
__device__ inline void load_segment(const S* __restrict__ y, long long j, T* v) {
    const int l = (threadIdx.x % 32) % L;
    if (j < 0) { for (int c = 0; c < C; c++) v[c] = 0; return; }
    const uint4* q = reinterpret_cast<const uint4*>(y + j * KP + l * C);
    constexpr int PER = 16 / (int)sizeof(S);  // values a load brings
    for (int a = 0; a < C / PER; a++) {
        const uint4 w = q[a];
        const S* s = reinterpret_cast<const S*>(&w);
        for (int t = 0; t < PER; t++) v[a * PER + t] = (T)TO_T(s[t]);
    }
}
// the lane's C components of row i of an unpadded (m × k) array
__device__ inline void load_own(const T* __restrict__ a, long long i, int k, T* v) {
    const int l = (threadIdx.x % 32) % L;
    for (int c = 0; c < C; c++) { const int col = l * C + c; v[c] = col < k ? a[i * k + col] : (T)0; }
}
__device__ inline void store_own(T* __restrict__ a, long long i, int k, const T* v) {
    const int l = (threadIdx.x % 32) % L;
    if (threadIdx.x % 32 >= L || part() != 0) return;  // group 0 of warp 0 writes
    for (int c = 0; c < C; c++) { const int col = l * C + c; if (col < k) a[i * k + col] = v[c]; }
}
// The group's U entries of the block of GROUPS·U from ``base`` (entry base + u·GROUPS + g;
// past ``end``: column -1, value 0), their rows of the operand (scaled), and those rows' dot
// products with v (times ``scale``).
__device__ inline void gather(const long long* __restrict__ cols, const V* __restrict__ vals,
        const S* __restrict__ y, long long base, long long end, const T* v, T scale,
        T yj[U][C], T dt[U], T* m) {
    const int g = (threadIdx.x % 32) / L;
    long long j[U];
    for (int u = 0; u < U; u++) {
        const long long e = base + (long long)u * GROUPS + g;
        j[u] = e < end ? cols[e] : -1;
        if (m != nullptr) m[u] = e < end ? (T)vals[e] : (T)0;
    }
    for (int u = 0; u < U; u++) load_segment(y, j[u], yj[u]);
    for (int u = 0; u < U; u++) {
        dt[u] = 0;
        for (int c = 0; c < C; c++) dt[u] += v[c] * yj[u][c];
    }
    for (int o = L / 2; o > 0; o >>= 1)
        for (int u = 0; u < U; u++) dt[u] += __shfl_xor_sync(0xffffffff, dt[u], o);
    for (int u = 0; u < U; u++) dt[u] *= scale;
}
"""

_GROUP_SOURCE = r"""
// Σ over the row's entries of (x_i·y_j − m_ij)², one sum a row: a model's squared error on
// the stored entries, without writing one prediction per entry
extern "C" __global__ void row_sq_error(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const V* __restrict__ vals, const T* __restrict__ x,
        const S* __restrict__ y, const long long m, const int k, T* __restrict__ out)
{
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (i >= m) return;
    const long long end = indptr[i + 1];
    T xi[C];
    load_own(x, i, k, xi);
    T sum = 0;
    for (long long base = indptr[i]; base < end; base += GROUPS * U) {
        T yj[U][C], dt[U], mv[U];
        gather(cols, vals, y, base, end, xi, (T)1, yj, dt, mv);
        for (int u = 0; u < U; u++) sum += (dt[u] - mv[u]) * (dt[u] - mv[u]);
    }
    across_groups(&sum, 1);
    if (threadIdx.x % 32 == 0) out[i] = sum;
}

extern "C" __global__ void normal_apply(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const T* __restrict__ p, const S* __restrict__ y,
        const long long m, const int k, const T reg, T* __restrict__ out)
{
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (i >= m) return;
    const long long end = indptr[i + 1];
    T pi[C], acc[C];
    load_own(p, i, k, pi);
    for (int c = 0; c < C; c++) acc[c] = 0;
    for (long long base = indptr[i]; base < end; base += GROUPS * U) {
        T yj[U][C], dt[U];
        gather(cols, nullptr, y, base, end, pi, (T)1, yj, dt, nullptr);
        for (int u = 0; u < U; u++)
            for (int c = 0; c < C; c++) acc[c] += dt[u] * yj[u][c];
    }
    across_groups(acc, C);
    for (int c = 0; c < C; c++) acc[c] += reg * pi[c];
    store_own(out, i, k, acc);
}

// The lane's components of r = Y_Ωiᵀ(m_i − Y_Ωi x) − reg·x, x's components in the lane's
// registers: one pass over the row's entries [start, end). Where sq is not null, also
// Σ (m_ij − x·y_j)² over them into *sq (on every lane): the squared error of x.
__device__ inline void residual_pass(const long long* __restrict__ cols,
        const V* __restrict__ vals, const S* __restrict__ y, long long start, long long end,
        T reg, const T* x, T* r, T* sq)
{
    T s = 0;
    for (int c = 0; c < C; c++) r[c] = 0;
    for (long long base = start + part() * GROUPS * U; base < end; base += NW * GROUPS * U) {
        T yj[U][C], dt[U], mv[U];
        gather(cols, vals, y, base, end, x, (T)1, yj, dt, mv);
        for (int u = 0; u < U; u++) {
            s += (mv[u] - dt[u]) * (mv[u] - dt[u]);
            for (int c = 0; c < C; c++) r[c] += (mv[u] - dt[u]) * yj[u][c];
        }
    }
    across_groups(r, C);
    across_warps(r, C);
    for (int c = 0; c < C; c++) r[c] -= reg * x[c];
    if (sq != nullptr) {
        across_groups(&s, 1);
        across_warps(&s, 1);
        *sq = s;
    }
}

// The warm start's residual (above) for the rows ``rows``, one warp (or NW) per row, into
// r_out (row i at i·k): what a CG correction computed in a narrower type starts from; and,
// where sq_out is not null, each row's squared error into sq_out[i].
extern "C" __global__ void residual_rows(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const V* __restrict__ vals, const S* __restrict__ y,
        const T* __restrict__ x0, const long long* __restrict__ rows, const long long nrows,
        const int k, const T reg, T* __restrict__ r_out, T* __restrict__ sq_out)
{
    const long long w = row_slot();
    if (w >= nrows) return;
    const long long i = rows[w];
    T x[C], r[C], s;
    load_own(x0, i, k, x);
    residual_pass(cols, vals, y, indptr[i], indptr[i + 1], reg, x, r,
                  sq_out != nullptr ? &s : nullptr);
    store_own(r_out, i, k, r);
    if (sq_out != nullptr && threadIdx.x % 32 == 0 && part() == 0) sq_out[i] = s;
}

// z = P r in the lane's C components, for a symmetric P (KP × KP, zero-padded) that every row
// shares, or z = r where there is none; r's other components come from the group's lanes.
__device__ inline void precondition(const T* __restrict__ P, const T* r, T* z) {
    if (P == nullptr) { for (int c = 0; c < C; c++) z[c] = r[c]; return; }
    const int l = (threadIdx.x % 32) % L;
    for (int c = 0; c < C; c++) z[c] = 0;
    for (int src = 0; src < L; src++)
        for (int c2 = 0; c2 < C; c2++) {
            const T rj = __shfl_sync(0xffffffff, r[c2], src, L);
            const T* row = P + (long long)(src * C + c2) * KP + l * C;  // P's row j = column j
            for (int c = 0; c < C; c++) z[c] += row[c] * rj;
        }
}

// CG on (Y_ΩiᵀY_Ωi + reg I) x = Y_Ωiᵀ m for the rows ``rows``, one warp (or NW) per row,
// every vector in registers, one pass over Ω_i per step: plain, or preconditioned by P where
// ``precond`` is not null (one KP × KP matrix for every row); ``regv``, where not null,
// replaces reg I by diag(regv) (KP long): the regularisation of a whitened Y. From x0, with
// one more pass for its residual; or, given that residual r0 (row i at i·k), from zero: the
// correction to x0 (``vals`` and ``x0`` are then not read). ``scale`` turns a scaled
// operand's dot products back into Y's. Each row takes ``steps`` steps, or row_steps[w] for
// the w-th row of ``rows`` where row_steps is not null; after ``firm`` of them (row_firm[w]
// where row_steps is not null), fewer once its rᵀz has fallen below ``stop`` times its start.
extern "C" __global__ void cg_rows(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const V* __restrict__ vals, const S* __restrict__ y,
        const T* __restrict__ x0, const T* __restrict__ r0, const long long* __restrict__ rows,
        const long long nrows, const int k, const int steps, const int* __restrict__ row_steps,
        const int firm, const int* __restrict__ row_firm, const T stop, const T reg,
        const T* __restrict__ regv, const T scale, const T* __restrict__ precond,
        T* __restrict__ out)
{
    const long long w = row_slot();
    if (w >= nrows) return;
    const long long i = rows[w];
    const int nsteps = row_steps != nullptr ? row_steps[w] : steps;
    const int nfirm = row_steps != nullptr ? row_firm[w] : firm;
    const long long start = indptr[i], end = indptr[i + 1];
    T x[C], r[C], p[C], q[C], z[C], rg[C];
    const int lane = (threadIdx.x % 32) % L;  // its C components start at lane·C
    for (int c = 0; c < C; c++) rg[c] = regv != nullptr ? regv[lane * C + c] : reg;
    if (r0 != nullptr) {
        for (int c = 0; c < C; c++) x[c] = 0;
        load_own(r0, i, k, r);
    } else {
        load_own(x0, i, k, x);
        residual_pass(cols, vals, y, start, end, reg, x, r, nullptr);
    }
    precondition(precond, r, z);
    T rr = 0;  // rᵀz
    for (int c = 0; c < C; c++) { p[c] = z[c]; rr += r[c] * z[c]; }
    rr = group_sum(rr);
    // a row converged this far takes no more steps; nor, after ``firm``, one this far along.
    // rr is the same on every lane of the row (and every warp of its block): all stop at once
    const T done = rr * (T)CONVERGED, enough = rr * stop;
    for (int step = 0; step < nsteps; step++) {
        if (rr <= done || (step >= nfirm && rr <= enough)) break;
        for (int c = 0; c < C; c++) q[c] = 0;
        for (long long base = start + part() * GROUPS * U; base < end;
             base += NW * GROUPS * U) {
            T yj[U][C], dt[U];
            gather(cols, nullptr, y, base, end, p, scale, yj, dt, nullptr);
            for (int u = 0; u < U; u++)
                for (int c = 0; c < C; c++) q[c] += dt[u] * yj[u][c];
        }
        across_groups(q, C);
        across_warps(q, C);
        T pq = 0;
        for (int c = 0; c < C; c++) { q[c] += rg[c] * p[c]; pq += p[c] * q[c]; }
        pq = group_sum(pq);
        const T alpha = pq > (T)0 ? rr / pq : (T)0;
        for (int c = 0; c < C; c++) { x[c] += alpha * p[c]; r[c] -= alpha * q[c]; }
        precondition(precond, r, z);
        T rn = 0;
        for (int c = 0; c < C; c++) rn += r[c] * z[c];
        rn = group_sum(rn);
        const T beta = rr > (T)0 ? rn / rr : (T)0;
        for (int c = 0; c < C; c++) p[c] = z[c] + beta * p[c];
        rr = rn;
    }
    store_own(out, i, k, x);
}
"""

# The sparse × dense product of the randomized SVD: no dot product an entry, so one warp an
# entry, lane l holding components l, l + 32, ... (KPL of them)
_SPMM_SOURCE = r"""
// out_i = Σ_e vals[e] · x[cols[e]] for every row i (a sparse times a dense matrix, w wide),
// one warp per row, UNROLL rows of x in flight
extern "C" __global__ void spmm_rows(const long long* __restrict__ indptr,
        const long long* __restrict__ cols, const T* __restrict__ vals, const T* __restrict__ x,
        const long long m, const int w, T* __restrict__ out)
{
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (i >= m) return;
    const long long end = indptr[i + 1];
    T acc[KPL];
    for (int t = 0; t < KPL; t++) acc[t] = 0;
    for (long long e0 = indptr[i]; e0 < end; e0 += UNROLL) {
        long long j[UNROLL];
        T xj[UNROLL][KPL], a[UNROLL];
        for (int u = 0; u < UNROLL; u++) {
            const long long e = e0 + u;
            j[u] = e < end ? cols[e] : -1;
            a[u] = e < end ? vals[e] : (T)0;
        }
        load_rows(x, w, j, xj);
        for (int u = 0; u < UNROLL; u++)
            for (int t = 0; t < KPL; t++) acc[t] += a[u] * xj[u][t];
    }
    for (int t = 0; t < KPL; t++) { const int c = lane + 32 * t; if (c < w) out[i * w + c] = acc[t]; }
}
"""
# Sketch-preconditioned CG, one thread block (8 warps) per row; the reference is
# ``lsq.solve_sketch``. Phase 1 reads Y_Ωi once: warp w sums buckets into Z = S·Y_Ωi (32
# buckets staged at a time, whose outer products accumulate into P = ZᵀZ in registers as
# the exact kernel does with Y's rows) and, from the same loads, the warm start's residual
# r = Yᵀ(m − Y x0). P + reg I is inverted by the sweep operator in the registers that summed
# it (no triangular solves later: applying P⁻¹ is one matrix-vector product). Each CG step is then
# one more pass over Ω_i, the warps splitting the entries, each entry's k-vector read
# coalesced by a warp.
_SKETCH_SOURCE = r"""
#define WARPS 8
__device__ inline T sketch_sign(long long row, long long col, unsigned long long seed) {
    unsigned long long h = ((unsigned long long)row * 0x9E3779B97F4A7C15ULL)
                         ^ ((unsigned long long)col * 0xC2B2AE3D27D4EB4FULL)
                         ^ (seed * 0x165667B1ULL + 1ULL);
    h ^= h >> 31;
    h *= 0x94D049BB133111EBULL;
    h ^= h >> 29;
    return (h >> 63) ? (T)-1 : (T)1;
}

// out[c] = -(G v)[c] = (P⁻¹ v)[c]; G is symmetric, so G[j][c] keeps the banks apart
__device__ inline void precondition(const T* G, const T* v, T* out, int k) {
    for (int c = threadIdx.x; c < KMAX; c += blockDim.x) {
        T sum = 0;
        if (c < k) for (int j = 0; j < k; j++) sum += G[j * KMAX + c] * v[j];
        out[c] = -sum;
    }
}

// a·b over KMAX values, by warp 0, into *res
__device__ inline void dot(const T* a, const T* b, T* res) {
    if (threadIdx.x < 32) {
        T v = 0;
        for (int c = threadIdx.x; c < KMAX; c += 32) v += a[c] * b[c];
        v = warp_sum(v);
        if (threadIdx.x == 0) *res = v;
    }
}

extern "C" __global__ void __launch_bounds__(256)
sketch_rows(const long long* __restrict__ indptr, const long long* __restrict__ cols,
            const T* __restrict__ vals, const T* __restrict__ y, const S* __restrict__ yg,
            const T scale, const T* __restrict__ x0,
            const T* __restrict__ r0, const long long* __restrict__ rows, const int nrows, const int k, const int s,
            const int steps, const T reg, const unsigned long long seed, T* __restrict__ out,
            int* __restrict__ failed)
{
    extern __shared__ unsigned char smem_raw[];
    T* G = reinterpret_cast<T*>(smem_raw);   // KMAX × KMAX: P, then -P⁻¹
    T* zbuf = G + KMAX * KMAX;                // CHUNK × KMAX: bucket sums, then warps' partial sums
    T* xv = zbuf + CHUNK * KMAX;              // the CG vectors, KMAX each
    T* rv = xv + KMAX;
    T* zv = rv + KMAX;
    T* pv = zv + KMAX;
    T* qv = pv + KMAX;
    T* cv = qv + KMAX;
    __shared__ T scal[3];                    // r·z, p·q, pivot floor
    __shared__ int bad;
    const int r = blockIdx.x;
    if (r >= nrows) return;
    const long long row = rows[r];
    const long long start = indptr[row], d = indptr[row + 1] - start;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int ti = tid / 16, tj = tid % 16;
    // given x0's residual r0 (row i at i·k), CG runs from zero for the correction to x0, and
    // neither vals nor x0 is read
    for (int c = tid; c < KMAX; c += blockDim.x)
        xv[c] = c < k && r0 == nullptr ? x0[row * k + c] : (T)0;
    if (tid == 0) bad = 0;
    __syncthreads();
    T xl[KPL], racc[KPL];
    for (int t = 0; t < KPL; t++) { xl[t] = xv[lane + 32 * t]; racc[t] = 0; }
    T acc[TILE][TILE];
    for (int a = 0; a < TILE; a++) for (int c = 0; c < TILE; c++) acc[a][c] = 0;

    // phase 1: the sketch's Gram matrix and the warm start's residual, in one read of Y_Ωi
    for (int cb = 0; cb < s; cb += CHUNK) {
        for (int slot = 0; slot < CHUNK / WARPS; slot++) {
            const int q = warp * (CHUNK / WARPS) + slot;
            T zacc[KPL];
            for (int t = 0; t < KPL; t++) zacc[t] = 0;
            // UNROLL entries at a time
            for (long long p0 = cb + q; p0 < d; p0 += (long long)UNROLL * s) {
                long long j[UNROLL];
                T yj[UNROLL][KPL], dt[UNROLL], m[UNROLL];
                for (int u = 0; u < UNROLL; u++) {
                    const long long p = p0 + (long long)u * s;
                    j[u] = p < d ? cols[start + p] : -1;
                    m[u] = p < d && r0 == nullptr ? vals[start + p] : (T)0;
                }
                if (r0 == nullptr) {
                    gather(y, k, j, xl, yj, dt);
                } else {  // from zero: no residual to form, so no dot products
                    load_rows(y, k, j, yj);
                    for (int u = 0; u < UNROLL; u++) dt[u] = 0;
                }
                for (int u = 0; u < UNROLL; u++) {
                    const T w = m[u] - dt[u];
                    const T sg = j[u] >= 0 ? sketch_sign(row, j[u], seed) : (T)0;
                    for (int t = 0; t < KPL; t++) { zacc[t] += sg * yj[u][t]; racc[t] += w * yj[u][t]; }
                }
            }
            for (int t = 0; t < KPL; t++) zbuf[q * KMAX + lane + 32 * t] = zacc[t];
        }
        __syncthreads();
        const int cnt = min(CHUNK, s - cb);
        for (int q = 0; q < cnt; q++) add_outer(zbuf + q * KMAX, ti, tj, acc);
        __syncthreads();
    }
    if (ti == tj)  // this thread holds diagonal values: P + reg I's, and for the floor below
        for (int a = 0; a < TILE; a++) { acc[a][a] += reg; cv[ti + 16 * a] = acc[a][a]; }
    for (int t = 0; t < KPL; t++) zbuf[warp * KMAX + lane + 32 * t] = racc[t];
    __syncthreads();
    for (int c = tid; c < KMAX; c += blockDim.x) {
        T sum = 0;
        for (int w = 0; w < WARPS; w++) sum += zbuf[w * KMAX + c];
        rv[c] = c >= k ? (T)0 : r0 != nullptr ? r0[row * k + c] : sum - reg * xv[c];
    }
    if (tid == 0) {
        T top = 0;
        for (int c = 0; c < k; c++) top = cv[c] > top ? cv[c] : top;
        scal[2] = (T)PIVOT * top;
    }
    __syncthreads();

    // phase 2: G ← -P⁻¹ by sweeping every pivot, in the registers that summed G (a thread
    // updates its own values; only column c goes through shared memory). A pivot rounding
    // alone could have made means Y_Ωi's sketch is singular: flagged, solved elsewhere.
    for (int c = 0; c < k; c++) {
        if (tj == c % 16)
            for (int a = 0; a < TILE; a++) {
                T v = 0;
                for (int b = 0; b < TILE; b++) if (b == c / 16) v = acc[a][b];
                cv[ti + 16 * a] = v;
            }
        __syncthreads();
        const T piv = cv[c];
        if (tid == 0 && !(piv > scal[2])) bad = 1;
        const T dinv = piv > (T)0 ? (T)1 / piv : (T)0;
        T ci[TILE], cj[TILE];
        for (int a = 0; a < TILE; a++) { ci[a] = cv[ti + 16 * a]; cj[a] = cv[tj + 16 * a]; }
        for (int a = 0; a < TILE; a++)
            for (int b = 0; b < TILE; b++) {
                const int i = ti + 16 * a, j = tj + 16 * b;
                const T g = acc[a][b] - ci[a] * cj[b] * dinv;
                acc[a][b] = i == c ? (j == c ? -dinv : cj[b] * dinv) : (j == c ? ci[a] * dinv : g);
            }
        __syncthreads();
    }
    for (int a = 0; a < TILE; a++)
        for (int b = 0; b < TILE; b++) G[(ti + 16 * a) * KMAX + tj + 16 * b] = acc[a][b];
    __syncthreads();

    // phase 3: CG on (Y_ΩiᵀY_Ωi + reg I) x = Y_Ωiᵀ m, preconditioned by P⁻¹, from x0
    precondition(G, rv, zv, k);
    __syncthreads();
    dot(rv, zv, scal);
    for (int c = tid; c < KMAX; c += blockDim.x) pv[c] = zv[c];
    __syncthreads();
    const T done = scal[0] * (T)CONVERGED;  // a row converged this far takes no more steps
    // each step's pass reads the lane-group operand yg (``_GROUP_HELPERS``): warp w takes
    // every WARPS-th block of GROUPS·U entries
    const int l = lane % L;
    for (int step = 0; step < steps; step++) {
        T pl[C], qacc[C];
        for (int c = 0; c < C; c++) { pl[c] = pv[l * C + c]; qacc[c] = 0; }
        for (long long base = start + (long long)warp * GROUPS * U; base < start + d;
             base += (long long)WARPS * GROUPS * U) {
            T yj[U][C], dt[U];
            gather(cols, nullptr, yg, base, start + d, pl, scale, yj, dt, nullptr);
            for (int u = 0; u < U; u++)
                for (int c = 0; c < C; c++) qacc[c] += dt[u] * yj[u][c];
        }
        across_groups(qacc, C);
        if (lane < L)
            for (int c = 0; c < C; c++) zbuf[warp * KMAX + l * C + c] = qacc[c];
        __syncthreads();
        for (int c = tid; c < KMAX; c += blockDim.x) {
            T sum = 0;
            for (int w = 0; w < WARPS; w++) sum += zbuf[w * KMAX + c];
            qv[c] = c < k ? sum + reg * pv[c] : (T)0;
        }
        __syncthreads();
        dot(pv, qv, scal + 1);
        __syncthreads();
        const T alpha = scal[1] > (T)0 && scal[0] > done ? scal[0] / scal[1] : (T)0;
        for (int c = tid; c < KMAX; c += blockDim.x) { xv[c] += alpha * pv[c]; rv[c] -= alpha * qv[c]; }
        __syncthreads();
        if (step + 1 == steps) break;
        precondition(G, rv, zv, k);
        __syncthreads();
        const T rz = scal[0];
        __syncthreads();
        dot(rv, zv, scal);
        __syncthreads();
        const T beta = rz > (T)0 ? scal[0] / rz : (T)0;
        for (int c = tid; c < KMAX; c += blockDim.x) pv[c] = zv[c] + beta * pv[c];
        __syncthreads();
    }
    if (tid < k) out[row * k + tid] = xv[tid];
    if (tid == 0) failed[r] = bad;
}
"""

WARP_MAX_RANK = 128
SPMM_MAX_WIDTH = 256  # spmm keeps KPL = width/32 sums per lane, and no other vectors
WARPS_PER_BLOCK = 8
# Rows of at least WIDE_DEGREE entries get WIDE_WARPS warps (one block) in plain CG and its
# residual pass: on skewed data (a film of 45k ratings among rows of a few hundred) one warp
# on such a row outlasts all the others. H100, MovieLens-20M-sized with popularity skew,
# k = 64: als-cg's sweep 0.026 → 0.017 s (bench/complete.py --skewed). Neither figure was
# tuned.
WIDE_DEGREE = 4096
WIDE_WARPS = 16

_MODULES: dict = {}
_FUNCTIONS: dict = {}  # ``_group_kernel``s found: (name, dtype, storage, k, warps a row)


def singular_floor(dtype) -> float:
    """Relative size below which a pivot (or singular value) is taken for rounding noise."""
    return 1e-9 if dtype == np.float64 else 1e-4


def converged(dtype) -> float:
    """Reduction of a CG residual's squared norm (rᵀz) past which a row takes no more steps:
    beyond it the step length is a ratio of rounding noise, and a row with fewer entries than
    unknowns (an exact solve in fewer steps than asked) would be thrown off by it."""
    return singular_floor(dtype) ** 2


# A float16 operand's rows are off by float16's rounding (5e-4 relative), so a residual from
# the exact Y keeps about that part of it out of reach, and where Y_Ωi has fewer rows than
# columns the steps that chase it divide by noise (a correction 1e9 times too large, seen).
# CG with such an operand stops once rᵀr has fallen this far: 4e-3 in norm.
HALF_CONVERGED = 1.6e-5


def _i64(x):
    """x as int64, copied only if it is not already (CuPy's astype copies by default)."""
    return x.astype(np.int64, copy=False)


def warp_supported(xp, y) -> bool:
    """The warp-per-row kernels run on CuPy arrays of rank ≤ 128 in float32 or float64."""
    return warp_runs(xp is not np, y.shape[1], y.dtype)


def warp_runs(gpu: bool, k: int, dtype=np.float64) -> bool:
    """``warp_supported`` for a factor not made yet (a job's plan): on a GPU or not, of rank k."""
    return gpu and k <= WARP_MAX_RANK and np.dtype(dtype) in (np.float32, np.float64)


def _warp_kernel(name: str, dtype, k: int):
    """A kernel of the one-warp-an-entry layout (``spmm_rows``) for k wide vectors."""
    import cupy

    t = "double" if dtype == np.float64 else "float"
    kpl = (k + 31) // 32
    module = _MODULES.get(("warp", t, kpl))
    if module is None:
        module = cupy.RawModule(code=f"#define T {t}\n#define KPL {kpl}\n" + _WARP_SUM + _GATHER
                                + _SPMM_SOURCE, options=("-std=c++14",))
        _MODULES[("warp", t, kpl)] = module
    return module.get_function(name)


# Components a lane holds (C) and entries a group keeps in flight (U), by the operand's
# storage type: two 16-byte loads a row of float64 or float32, one of float16. Chosen on an
# H100 over C in 2 to 16 and U in 1 to 8 (BENCHMARKS.md): each was within 10% of the best
# pair at k = 16, 64, 128 and on 10⁶ rows of 300, except float64 at 32 lanes an entry
# (k > 64), where two entries in flight took 61 ms a pass against one's 45.
_GROUP_WIDTH = {np.dtype(np.float64): 4, np.dtype(np.float32): 8, np.dtype(np.float16): 8}
_GROUP_UNROLL = {np.dtype(np.float64): 2, np.dtype(np.float32): 2, np.dtype(np.float16): 4}
_C_TYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float",
           np.dtype(np.float16): "__half"}


def group_layout(storage, k: int) -> tuple[int, int]:
    """(C, L) of the group kernels for a rank-k operand stored as ``storage``: C components
    a lane, L = a power of two lanes an entry, C·L ≥ k (the operand's padded width)."""
    c = _GROUP_WIDTH[np.dtype(storage)]
    if k > 32 * c:
        raise ValueError(f"rank {k} is over the {32 * c} a warp's lanes hold at {c} a lane")
    lanes = 1
    while c * lanes < k:
        lanes *= 2
    return c, lanes


def _group_defines(dtype, storage, k: int) -> tuple[tuple, str]:
    """(a cache key, the #defines) of ``_GROUP_HELPERS`` for an operand of rank k stored as
    ``storage``, arithmetic in ``dtype``, and of CG's stop (``CONVERGED``) with it."""
    dtype, storage = np.dtype(dtype), np.dtype(storage)
    c, lanes = group_layout(storage, k)
    # float64 at 32 lanes an entry: one entry in flight (see _GROUP_WIDTH)
    unroll = 1 if storage == np.float64 and lanes == 32 else _GROUP_UNROLL[storage]
    half = storage == np.float16
    code = (f"#define S {_C_TYPE[storage]}\n#define TO_T {'__half2float' if half else ''}\n"
            f"#define C {c}\n#define L {lanes}\n#define KP {c * lanes}\n#define U {unroll}\n"
            f"#define CONVERGED {HALF_CONVERGED if half else converged(dtype)}\n")
    return (dtype.name, storage.name, c, lanes), code


def _group_kernel(name: str, dtype, storage, k: int, nw: int = 1, values=None):
    """A group kernel doing its arithmetic in ``dtype`` on an operand stored as ``storage``,
    with ``nw`` warps a row (``cg_rows`` and ``residual_rows`` only, past 1), reading the
    entries' values as ``values`` (default ``dtype``). Kept once found: finding it again
    (its #defines, then the module's function) took 0.1 ms of host time a launch, which the
    device waits for in a launch that follows a sync."""
    import cupy

    values = np.dtype(values or dtype)
    found_key = (name, np.dtype(dtype).name, np.dtype(storage).name, k, nw, values.name)
    found = _FUNCTIONS.get(found_key)
    if found is not None:
        return found
    key, defines = _group_defines(dtype, storage, k)
    module_key = ("group", nw, values.name) + key
    module = _MODULES.get(module_key)
    if module is None:
        code = (f"#define T {_C_TYPE[np.dtype(dtype)]}\n#define V {_C_TYPE[values]}\n"
                f"#define NW {nw}\n" + defines + _GROUP_HELPERS + _GROUP_SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[module_key] = module
    found = module.get_function(name)
    _FUNCTIONS[found_key] = found
    return found


# A float16 operand is scaled by 2^e into [2^13, 2^14) at its largest magnitude: clear of
# float16's overflow at 65504, and float16's 2^-24 smallest step leaves the small values
# float32's relative precision down to 1e-8 of the largest.
_HALF_TOP = 14


def operand(xp, y, storage=None, top=None):
    """Y as the group kernels gather it: C-contiguous, 16-byte aligned, ``storage`` typed
    (default y's), zero-padded to the layout's C·L columns; and the factor that turns its
    dot products back into Y's (1 but for float16, whose operand is scaled into range).
    A float16 operand falls back to float32 where no scale fits float32's range. Its scale
    needs max |Y|: ``top`` where the caller knows it, else read here (a device sync).
    Returns (array, storage, scale): what the kernels below take as ``prepared``."""
    storage = np.dtype(storage or y.dtype)
    m, k = y.shape
    scale = 1.0
    if storage == np.float16:
        if top is None:
            top = float(xp.abs(y).max()) if y.size else 0.0
        shift = _HALF_TOP - int(np.ceil(np.log2(top))) if top > 0 else 0
        if abs(shift) > 60:  # the 2^-2·shift undoing it would leave float32's range
            storage, shift = np.dtype(np.float32), 0
        y = y * (2.0 ** shift) if shift else y
        scale = 2.0 ** (-2 * shift)
    c, lanes = group_layout(storage, k)
    width = c * lanes
    if (y.dtype == storage and width == k and y.flags.c_contiguous
            and y.data.ptr % 16 == 0):
        return y, storage, scale
    out = xp.zeros((m, width), dtype=storage)
    out[:, :k] = y
    return out, storage, scale


def _warp_launch(fn, m: int, args) -> None:
    threads = 32 * WARPS_PER_BLOCK
    blocks = (m + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    if blocks:
        fn((blocks,), (threads,), args)


def split_rows(xp, indptr, rows) -> tuple:
    """(narrow, wide): the rows ``rows`` (int64 ids) of fewer than WIDE_DEGREE entries, which
    the row kernels give a warp each, and the others, which get a block (``_rows_launch``).
    Finding them reads the device (a sync): a caller that launches on the same rows again
    and again (a completion's row plan) splits them once and passes the split."""
    rows = _i64(rows)
    wide = (indptr[rows + 1] - indptr[rows]) >= WIDE_DEGREE
    if not bool(wide.any()):
        return rows, rows[:0]
    return rows[~wide], rows[wide]


def _rows_launch(name, dtype, storage, k, split, args, values=None) -> None:
    """Launch the row kernel ``name`` over the rows of ``split`` (``split_rows``; ``args(rows,
    count, part)`` gives its arguments for the narrow (part 0) or wide (1) ones): one warp a
    row, and WIDE_WARPS warps (a block) for rows of at least WIDE_DEGREE entries, which would
    otherwise keep the whole launch waiting on one warp. ``values``: the type the kernel
    reads the entries' values as (``_group_kernel``)."""
    narrow, wide = split
    _warp_launch(_group_kernel(name, dtype, storage, k, values=values), int(narrow.size),
                 args(narrow, narrow.size, 0))
    if wide.size:
        _group_kernel(name, dtype, storage, k, WIDE_WARPS, values)(
            (int(wide.size),), (32 * WIDE_WARPS,), args(wide, wide.size, 1))


def row_sq_error(xp, x, y, indptr, cols, values):
    """Σ_j (x_i·y_j − M_ij)² over each row's stored entries (i, j) of a CSR pattern."""
    m, k = x.shape[0], x.shape[1]
    out = xp.empty(m, dtype=x.dtype)
    ys, storage, _ = operand(xp, y.astype(x.dtype, copy=False))
    _warp_launch(_group_kernel("row_sq_error", x.dtype, storage, k), m,
                 (_i64(indptr), _i64(cols), xp.ascontiguousarray(values, dtype=x.dtype),
                  xp.ascontiguousarray(x), ys, np.int64(m), np.int32(k), out))
    return out


def normal_apply(xp, p, y, indptr, cols, reg):
    """(Y_Ωiᵀ Y_Ωi + reg I) p_i for every row, in one pass over Ω."""
    m, k = p.shape[0], p.shape[1]
    out = xp.empty((m, k), dtype=p.dtype)
    ys, storage, _ = operand(xp, y.astype(p.dtype, copy=False))
    _warp_launch(_group_kernel("normal_apply", p.dtype, storage, k), m,
                 (_i64(indptr), _i64(cols), xp.ascontiguousarray(p), ys, np.int64(m),
                  np.int32(k), p.dtype.type(reg), out))
    return out


def cg_solve(xp, y, x0, indptr, cols, values, reg, rows, steps, out, r0=None, storage=None,
             precond=None, split=None, prepared=None, regv=None, stop=None):
    """``steps`` CG steps for the rows ``rows`` (int64 ids), one warp per row (a block for
    the heaviest, ``_rows_launch``), into ``out``: from x0, or, given x0's residual ``r0``
    (``residual``), from zero, which is the correction to x0 (``values`` and ``x0`` are then
    not read: None will do). Plain steps, or preconditioned by ``precond``, one symmetric
    k × k matrix for every row. The arithmetic is in y's type; ``storage`` (default the same)
    is the type Y is gathered in: float16 moves half float32's bytes, at float16's precision
    in the operator (a correction's solve can afford it: the next residual, in float64,
    sees the difference). ``split`` (``split_rows`` of rows) and ``prepared`` (``operand`` of
    y and storage), where given, spare finding them again. ``steps`` is one count for every
    row, or, with a split, (narrow, wide): each part's int32 steps a row, in its order.
    ``regv`` (k long), where given, replaces reg·I by diag(regv): the regularisation in the
    coordinates of a whitened y (``lsq.solve_cg_groups``). ``stop``, where given, is (firm,
    ratio): after ``firm`` steps (with steps a row, a (narrow, wide) pair of int32 arrays
    like them) a row takes no more once its residual norm (rᵀz's root) has fallen below
    ``ratio`` times its start's."""
    k = y.shape[1]
    dtype = y.dtype
    firm, ratio = stop or (steps, 0.0)
    values, x0, r0 = _start(xp, dtype, values, x0, r0)
    ys, storage, scale = prepared or operand(xp, y, storage)
    width = ys.shape[1]  # the layout's padded rank, KP
    p = rv = _NULL
    if precond is not None:
        p = xp.zeros((width, width), dtype=dtype)
        p[:k, :k] = xp.asarray(precond, dtype=dtype)
    if regv is not None:
        rv = xp.zeros(width, dtype=dtype)
        rv[:k] = xp.asarray(regv, dtype=dtype)
    per_row = isinstance(steps, tuple)
    if per_row and split is None:
        raise ValueError("cg_solve: steps a row follow their split's order; pass the split")
    _rows_launch("cg_rows", dtype, storage, k, split or split_rows(xp, indptr, rows),
                 lambda part, count, which: (
                     _i64(indptr), _i64(cols), values, ys, x0, r0, part, np.int64(count),
                     np.int32(k), np.int32(0 if per_row else steps),
                     steps[which] if per_row else _NULL, np.int32(0 if per_row else firm),
                     firm[which] if per_row else _NULL, dtype.type(ratio * ratio),
                     dtype.type(reg), rv, dtype.type(scale), p, out))


_NULL = np.uint64(0)  # a null pointer argument: the kernel does not read that array


def _start(xp, dtype, values, x0, r0):
    """The (values, x0, r0) arguments of a CG kernel: from x0 (its residual computed from the
    values), or, given x0's residual r0, from zero (values and x0 not read)."""
    if r0 is None:
        return (xp.ascontiguousarray(values, dtype=dtype), xp.ascontiguousarray(x0, dtype=dtype),
                _NULL)
    return _NULL, _NULL, xp.ascontiguousarray(r0, dtype=dtype)


def residual(xp, y, x0, indptr, cols, values, reg, rows, split=None, sq=None, dtype=None):
    """Y_Ωiᵀ(m_i − Y_Ωi x0_i) − reg·x0_i for the rows ``rows`` (int64 ids, or None where
    ``split``, their ``split_rows``, is given), one warp per row (a block for the heaviest),
    one pass over their entries; other rows of the result are zero. ``sq``, where given (an
    array of a value a row), gets Σ_j (x0_i·y_j − M_ij)² of those rows, from the same pass.
    In ``dtype`` (default y's; the result's and sq's type): float32 gathers half float64's
    bytes, Y and x0 rounded to it (the values are read as they are)."""
    k = y.shape[1]
    dtype = np.dtype(dtype or y.dtype)
    out = xp.zeros((int(indptr.size) - 1, k), dtype=dtype)
    ys, storage, _ = operand(xp, y.astype(dtype, copy=False))
    values = xp.ascontiguousarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(dtype)
    x0 = xp.ascontiguousarray(x0, dtype=dtype)
    if sq is not None and (sq.dtype != dtype or not sq.flags.c_contiguous):
        raise ValueError("residual: sq must be a contiguous array of the residual's type")
    _rows_launch("residual_rows", dtype, storage, k, split or split_rows(xp, indptr, rows),
                 lambda part, count, _: (_i64(indptr), _i64(cols), values, ys, x0, part,
                                      np.int64(count), np.int32(k), dtype.type(reg), out,
                                      _NULL if sq is None else sq), values.dtype)
    return out


def spmm_supported(xp, x) -> bool:
    """``spmm`` runs on CuPy arrays up to SPMM_MAX_WIDTH wide in float32 or float64."""
    return xp is not np and x.shape[1] <= SPMM_MAX_WIDTH and x.dtype in (np.float32, np.float64)


def spmm(xp, indptr, cols, values, x):
    """The CSR matrix (indptr, cols, values) times x (dense, rows indexed by cols), one warp
    per row. The randomized SVD's products (3e8 entries, 24 to 136 wide) take a fourth to a
    seventh of the time of cuSPARSE's through CuPy on an H100 (BENCHMARKS.md)."""
    m, w = int(indptr.size) - 1, x.shape[1]
    out = xp.empty((m, w), dtype=x.dtype)
    _warp_launch(_warp_kernel("spmm_rows", x.dtype, w), m,
                 (_i64(indptr), _i64(cols), xp.ascontiguousarray(values, dtype=x.dtype),
                  xp.ascontiguousarray(x), np.int64(m), np.int32(w), out))
    return out


def supported(xp, y) -> bool:
    """The fused kernel runs on CuPy arrays of rank ≤ 128 in float32 or float64."""
    return runs(xp is not np, y.shape[1], y.dtype)


def runs(gpu: bool, k: int, dtype=np.float64) -> bool:
    """``supported`` for a factor not made yet (a job's plan): on a GPU or not, of rank k."""
    return gpu and k <= MAX_RANK and np.dtype(dtype) in (np.float32, np.float64)


def padded_rank(k: int) -> int:
    """The block kernels' padded rank: 32 (the narrowest tile the sketch's warp lanes fill),
    64 or 128. Padding is work: at k = 16 a 64-wide Gram matrix is 16 times the products."""
    return 32 if k <= 32 else 64 if k <= 64 else 128


def _kernel(dtype, kmax: int):
    import cupy

    name = "double" if dtype == np.float64 else "float"
    module = _MODULES.get((name, kmax))
    if module is None:
        pivot = singular_floor(dtype)
        code = (f"#define T {name}\n#define CHUNK {CHUNK}\n#define PIVOT {pivot}\n"
                f"#define KMAX {kmax}\n#define TILE {kmax // 16}\n" + _ADD_OUTER + _SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[(name, kmax)] = module
    return module.get_function("als_rows")


def solve(xp, y, indptr, cols, values, reg, rows, out, rhs=None):
    """Solve the rows ``rows`` (int64 ids) into ``out``; returns the ids of the rows whose
    Gram matrix was singular (left for the pseudo-inverse of the reference path). Given
    ``rhs`` (a residual, ``residual``), solve with it as the right-hand side, for the
    correction (``values`` is then not read: None will do)."""
    k = y.shape[1]
    n = int(rows.size)
    failed = xp.zeros(n, dtype=np.int32)
    if n == 0:
        return rows[:0]
    dtype = y.dtype
    kmax = padded_rank(k)
    fn = _kernel(dtype, kmax)
    smem = (kmax * kmax + kmax + CHUNK) * dtype.itemsize
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    y = xp.ascontiguousarray(y)
    values, rhs = ((xp.ascontiguousarray(values, dtype=dtype), _NULL) if rhs is None else
                   (_NULL, xp.ascontiguousarray(rhs, dtype=dtype)))
    fn((n,), (THREADS,), (_i64(indptr), _i64(cols), values, rhs, y, _i64(rows), np.int32(n),
                          np.int32(k), dtype.type(reg), out, failed),
       shared_mem=smem)
    return rows[failed != 0]


def _sketch_kernel(dtype, kmax: int, storage, k: int):
    """The sketch kernel for rank k (padded to kmax) in ``dtype``, its CG steps gathering an
    operand stored as ``storage`` in lane groups."""
    import cupy

    name = "double" if dtype == np.float64 else "float"
    group, defines = _group_defines(dtype, storage, k)
    key = ("sketch", kmax) + group
    module = _MODULES.get(key)
    if module is None:
        code = (f"#define T {name}\n#define CHUNK {CHUNK}\n#define PIVOT {singular_floor(dtype)}\n"
                f"#define KMAX {kmax}\n#define TILE {kmax // 16}\n#define KPL {kmax // 32}\n"
                + defines + _WARP_SUM + _GATHER + _GROUP_HELPERS + _ADD_OUTER + _SKETCH_SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[key] = module
    return module.get_function("sketch_rows")


def sketch_solve(xp, y, x0, indptr, cols, values, reg, rows, steps, buckets, seed, out,
                 r0=None, storage=None, top=None):
    """``steps`` sketch-preconditioned CG steps for the rows ``rows`` (int64 ids), with
    ``buckets`` (a multiple of CHUNK) per row's sketch, into ``out``: from x0, or, given x0's
    residual ``r0`` (``residual``), from zero, for the correction to x0 (``values`` and ``x0``
    are then not read: None will do). The CG steps gather Y as ``storage`` (``cg_solve``;
    ``top``: max |y| where known, ``operand``). Returns the ids of the rows whose sketch was
    singular (their output is not a solution)."""
    k = y.shape[1]
    n = int(rows.size)
    if n == 0:
        return rows[:0]
    dtype = y.dtype
    kmax = padded_rank(k)
    ys, storage, scale = operand(xp, y, storage, top)
    fn = _sketch_kernel(dtype, kmax, storage, k)
    smem = (kmax * kmax + CHUNK * kmax + 6 * kmax) * dtype.itemsize
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    failed = xp.zeros(n, dtype=np.int32)
    values, x0, r0 = _start(xp, dtype, values, x0, r0)
    fn((n,), (THREADS,), (_i64(indptr), _i64(cols), values, xp.ascontiguousarray(y), ys,
                          dtype.type(scale), x0, r0, _i64(rows), np.int32(n), np.int32(k),
                          np.int32(buckets),
                          np.int32(steps), dtype.type(reg), np.uint64(seed), out, failed),
       shared_mem=smem)
    return rows[failed != 0]
