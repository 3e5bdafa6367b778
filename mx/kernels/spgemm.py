"""Sparse C = A·B, row by row (Gustavson), on NumPy/SciPy and on the GPU with hash tables.

C's pattern is the structural product: (i, j) is stored when some k has A(i, k) and B(k, j)
stored, even if the values cancel. Rows are sorted, with no duplicates; row offsets are int64.

The GPU kernel (CuPy RawKernels) works the way SMASH and nsparse do. Each output row's
partial products are merged as they are made, in a hash table keyed by column, so no
partial-product matrix is ever stored. It runs in two passes: the symbolic pass counts each
row's nonzeros so C is allocated exactly, and the numeric pass fills it. Rows are binned (two
kernels) by their number of partial products, then by their exact nonzeros:

- the shortest rows get a thread each, which keeps the row's columns in order as they come;
- short rows share a block, a warp each, with a small shared-memory table;
- longer rows get a group of warps or a whole block and a larger shared-memory table; the
  long rows of B they meet are shared out among the group's warps in pieces, so one hub row of
  B does not keep the others waiting;
- rows too long for shared tables (and, where C is narrow, rows nearly as long) are dense:
  a bitmap of C's columns for the symbolic pass, and for the numeric pass a dense accumulator
  in shared memory, one chunk of columns at a time.

A table's entries are written in column order through a bitmap of the row's span where it
fits beside the table, and otherwise compacted and sorted (bitonic). A dense row comes out
sorted from a scan of its columns. The NumPy/SciPy path defines the expected result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from mx.storage import dense


@dataclass
class Csr:
    """A CSR matrix as plain arrays of one array module (NumPy or CuPy)."""

    indptr: object  # int64, length rows + 1
    indices: object  # int32 (or int64 when columns pass 2^31)
    data: object
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1]) - int(self.indptr[0])

    @classmethod
    def from_scipy(cls, m) -> "Csr":
        m = sp.csr_array(m)
        return cls(m.indptr.astype(np.int64), m.indices, m.data, m.shape)

    def to_scipy(self):
        return sp.csr_array((self.data, self.indices, self.indptr), shape=self.shape)

    def on(self, xp, dtype=None) -> "Csr":
        """The matrix as arrays of ``xp`` (NumPy or CuPy): int64 offsets, int32 column
        indices, values as ``dtype`` (default: as they are)."""
        return Csr(dense.upload(xp, self.indptr, np.int64), dense.upload(xp, self.indices, np.int32),
                   dense.upload(xp, self.data, dtype), self.shape)


def products_per_row(xp, a: Csr, b: Csr):
    """Partial products each row of A·B makes (int64): the work of each row."""
    if a.nnz == 0:
        return xp.zeros(a.shape[0], dtype=np.int64)
    b_len = xp.diff(b.indptr)[a.indices]
    csum = xp.concatenate([xp.zeros(1, np.int64), xp.cumsum(b_len, dtype=np.int64)])
    start = a.indptr - a.indptr[0]
    return csum[start[1:]] - csum[start[:-1]]


def multiply(xp, a: Csr, b: Csr, max_columns: int | None = None) -> Csr:
    """The structural product A·B with sorted rows, on the array module of the inputs. B wider
    than ``max_columns`` (on the GPU by default the widest the kernel takes) is multiplied a
    block of its columns at a time, and the blocks' rows joined."""
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"A is {a.shape[0]}×{a.shape[1]} but B is {b.shape[0]}×{b.shape[1]}")
    width = max_columns or (MAX_DENSE_COLUMNS if xp is not np else max(1, b.shape[1]))
    if b.shape[1] > width:
        return _by_column_blocks(xp, b, width, lambda block: multiply(xp, a, block, width), xp)
    if xp is np:
        return _multiply_scipy(a, b)
    return _multiply_gpu(a, b)


def column_blocks(n: int, width: int) -> list[tuple[int, int]]:
    """Column ranges of at most ``width`` covering 0..n, of near-equal widths."""
    count = -(-n // width)
    edges = [n * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def column_block(xp, b: Csr, c0: int, c1: int) -> Csr:
    """Columns c0..c1 of B, numbered from 0."""
    keep = (b.indices >= c0) & (b.indices < c1)
    kept = xp.concatenate([xp.zeros(1, np.int64), xp.cumsum(keep, dtype=np.int64)])
    start = b.indptr - b.indptr[0]
    return Csr(kept[start], (b.indices[keep] - c0).astype(np.int32), b.data[keep], (b.shape[0], c1 - c0))


def _by_column_blocks(xp, b: Csr, width: int, product, out_xp) -> Csr:
    """product(block) for each block of at most ``width`` of B's columns (arrays of ``xp``),
    the results' rows joined on ``out_xp``."""
    return join_columns(out_xp, [(c0, product(column_block(xp, b, c0, c1)))
                                 for c0, c1 in column_blocks(b.shape[1], width)], b.shape[1])


def join_columns(xp, parts: list[tuple[int, Csr]], n: int) -> Csr:
    """The row-wise join of products with consecutive blocks of B's columns, given as (first
    column, product): each row of C is its rows of the parts, one after the other."""
    lengths = [xp.diff(p.indptr) for _, p in parts]
    indptr = xp.concatenate([xp.zeros(1, np.int64), xp.cumsum(sum(lengths), dtype=np.int64)])
    total = int(indptr[-1])
    indices = xp.empty(total, dtype=np.int32 if n < 2**31 else np.int64)
    data = xp.empty(total, dtype=np.result_type(*[p.data.dtype for _, p in parts]))
    before = indptr[:-1].copy()  # where each row's entries from the next part go
    for (c0, part), length in zip(parts, lengths):
        first, count = int(part.indptr[0]), int(part.indptr[-1] - part.indptr[0])
        if count:
            at = xp.arange(count, dtype=np.int64)
            start = part.indptr - first
            row = xp.searchsorted(start, at, side="right") - 1
            where = before[row] + at - start[row]
            indices[where] = part.indices[:count] + c0
            data[where] = part.data[:count]
        before += length
    return Csr(indptr, indices, data, (parts[0][1].shape[0], n))


def _multiply_scipy(a: Csr, b: Csr) -> Csr:
    """SciPy's Gustavson product for the values, and the product of the patterns (all ones, so
    nothing cancels) for the structure: SciPy drops zeros that mx keeps."""
    A, B = a.to_scipy(), b.to_scipy()
    dtype = np.result_type(A.dtype, B.dtype)
    ones = lambda m: sp.csr_array((np.ones(m.nnz), m.indices, m.indptr), shape=m.shape)  # noqa: E731
    pattern = ones(A) @ ones(B)
    pattern.sort_indices()
    values = A @ B
    values.sort_indices()
    n = np.int64(max(1, B.shape[1]))
    rows_p = np.repeat(np.arange(pattern.shape[0], dtype=np.int64), np.diff(pattern.indptr))
    rows_v = np.repeat(np.arange(values.shape[0], dtype=np.int64), np.diff(values.indptr))
    keys_p = rows_p * n + pattern.indices
    keys_v = rows_v * n + values.indices
    data = np.zeros(pattern.nnz, dtype=dtype)
    data[np.searchsorted(keys_p, keys_v)] = values.data
    indices = pattern.indices.astype(np.int32 if b.shape[1] < 2**31 else np.int64)
    return Csr(pattern.indptr.astype(np.int64), indices, data, (a.shape[0], b.shape[1]))


# ----------------------------------------------------------------------------------- GPU
# Shared-table bins: (largest count, threads per row, table slots). The symbolic pass bins rows
# by partial products (an upper bound on their nonzeros); the numeric pass bins them by the
# exact nonzeros the symbolic pass counted, so its tables (and the sorts) are as small as the
# rows allow. A table holds at most half its slots, so linear probing stays short.
# The first bin (threads per row 1, no table) is a thread per row, its columns kept in order
# in a small array: for rows of at most TINY products (symbolic) or nonzeros (numeric, and then
# at most TINY_PRODUCTS products, which the thread works through alone).
SYMBOLIC_BINS = ((16, 1, 0), (128, 32, 256), (512, 128, 1024), (2048, 256, 4096),
                 (16384, 1024, 32768))
NUMERIC_BINS = ((16, 1, 0), (128, 32, 256), (512, 128, 1024), (2048, 256, 4096),
                (4096, 512, 8192), (8192, 1024, 16384))
TINY = 16
TINY_PRODUCTS = 64
assert SYMBOLIC_BINS[0][0] <= TINY and NUMERIC_BINS[0][0] <= TINY
DENSE_RATIO = 4  # see _GpuProduct._numeric_plan
BLOCK = 256  # threads per block for the thread-per-row and warp-per-row bins
DENSE_THREADS = 1024
MAX_DENSE_COLUMNS = 8 * 160 * 1024  # a row bitmap of this many columns fits in shared memory
EMPTY = 0x7FFFFFFF  # an empty slot; larger than any column, so it sorts last
LISTED_BYTES = 24  # one entry of a group's list of long rows of B (struct Listed)
# the kernels' own shared memory: a block's lists of long rows of B (half a block of entries at
# most), and the scans' and counters' few words
STATIC_SHARED = LISTED_BYTES * DENSE_THREADS // 2 + 4096

_SOURCE = r"""
#define EMPTY 0x7fffffff
#define FULL 0xffffffffu
#define NO_BIN 255
#define LONG_ROW 64  // a row of B longer than this is shared out among a group's warps
#define PIECE 128    // products of a shared-out row that one warp takes at a time
typedef VAL_T val_t;

// a barrier for a group's threads: the groups of a block share nothing but the block, and a
// warp-sized group need not wait for the others
#define GROUP_SYNC() do { if (G <= 32) __syncwarp(); else __syncthreads(); } while (0)

// Knuth's multiplicative hash, its top bits: the low bits of key·odd are the low bits of key
// alone, and R-MAT's hub columns share their low bits, so a low-bit slot clusters them
__device__ __forceinline__ int slot_of(int key) {
    return (int)(((unsigned int)key * 2654435761u) >> (32 - TBITS));
}

// a place in [0, n) drawn from x
__device__ __forceinline__ int spread(long long x, int n) {
    return (int)((((unsigned long long)x * 0x9E3779B97F4A7C15ull) >> 33) % (unsigned int)n);
}

// the slot of key, inserting it; *fresh says whether it was new. Most products of a long row
// meet a key already there: a plain read finds it without an atomic.
__device__ __forceinline__ int insert(int* keys, int key, bool* fresh) {
    int h = slot_of(key);
    while (true) {
        const int seen = ((volatile int*)keys)[h];
        if (seen == key) { *fresh = false; return h; }
        if (seen == EMPTY) {
            const int old = atomicCAS(&keys[h], EMPTY, key);
            if (old == EMPTY) { *fresh = true; return h; }
            if (old == key) { *fresh = false; return h; }
        }
        h = (h + 1) & (T - 1);
    }
}

// exclusive prefix sum of v over each group of G_ threads (a multiple of 32); *total gets the
// group's sum. Every thread of the block calls it (of the warp, for groups of 32).
template <int G_>
__device__ int group_exclusive_scan(int v, int* total) {
    __shared__ int sums[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    if (G_ == 32) {  // a warp: no shared memory, no barrier
        *total = __shfl_sync(FULL, x, 31);
        return x - v;
    }
    if (lane == 31) sums[warp] = x;
    __syncthreads();
    const int first = (threadIdx.x / G_) * (G_ / 32);
    int before = 0, all = 0;
    for (int w = first; w < first + G_ / 32; ++w) {
        const int s = sums[w];
        all += s;
        if (w < warp) before += s;
    }
    *total = all;
    __syncthreads();  // sums is reused by the next call
    return before + x - v;
}

// a long row of B met in a row of A, kept for the group's warps to share out
struct Listed { long long q0, p; int len, start; };

// body(p, q) for each partial product A[p]·B[q] of A's row (none when row < 0), by the G_
// threads of a group. range(k, &q0, &len) gives the part of B's row k to use (all of it, or a
// chunk of columns). The warps take the entries of A's row in turn; each warp locates the rows
// of B of its next 32 entries at once, one a lane, then, entry by entry, its lanes stride over
// that entry's row of B. (Lanes sharing out several rows of B at once were tried: in R-MAT most
// rows of B hold the same hub columns, so the lanes of one instruction collide on a slot, and
// it ran 3-7x slower.) Each row of B starts at a place drawn from the entry: B's rows are sorted
// and the hub columns open most of them, so warps starting together would update the same few
// slots at once.
// A group of several warps (CAP_ > 0) lists the rows of B longer than LONG_ROW and shares them
// out afterwards in pieces of PIECE products: taken whole, one hub row of B kept one warp busy
// while the others waited at the next barrier (most of the block's time, measured on R-MAT).
// Every thread of the block calls it.
template <int G_, int CAP_, class Range, class Body>
__device__ __forceinline__ void for_products(const long long* aptr, const int* aidx, int row,
                                             Listed* listed, int* nlisted, Range range, Body body) {
    const int warp = (threadIdx.x % G_) / 32, warps = G_ / 32, lane = threadIdx.x % 32;
    if (CAP_) {
        if (threadIdx.x % G_ == 0) *nlisted = 0;
        __syncthreads();
    }
    const long long a0 = row < 0 ? 0 : aptr[row], a1 = row < 0 ? 0 : aptr[row + 1];
    for (long long first = a0 + warp; first < a1; first += 32ll * warps) {
        const long long mine = first + (long long)lane * warps;
        long long q0 = 0;
        int len = 0, rot = 0;
        if (mine < a1) {
            range(aidx[mine], &q0, &len);
            if (CAP_ && len > LONG_ROW) {
                const int at = atomicAdd(nlisted, 1);
                if (at < CAP_) {
                    listed[at].q0 = q0; listed[at].p = mine; listed[at].len = len;
                    len = 0;
                }
            }
            if (len > 32) rot = spread(mine, len);
        }
        const int entries = (int)min(32ll, (a1 - first + warps - 1) / warps);
        for (int e = 0; e < entries; ++e) {
            const long long eq0 = __shfl_sync(FULL, q0, e);
            const int elen = __shfl_sync(FULL, len, e), erot = __shfl_sync(FULL, rot, e);
            const long long p = first + (long long)e * warps;
            for (int i = lane; i < elen; i += 32)
                body(p, eq0 + (i + erot < elen ? i + erot : i + erot - elen));
        }
    }
    if (CAP_) {
        __syncthreads();
        const int n = min(*nlisted, CAP_), t = threadIdx.x % G_;
        int total;
        const int start = group_exclusive_scan<G_>(t < n ? (listed[t].len + PIECE - 1) / PIECE : 0,
                                                   &total);
        if (t < n) listed[t].start = start;
        __syncthreads();
        for (int c = warp; c < total; c += warps) {
            int lo = 0, hi = n - 1;  // the last listed row whose pieces start at or before c
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (listed[mid].start <= c) lo = mid; else hi = mid - 1;
            }
            const long long q0 = listed[lo].q0, p = listed[lo].p;
            const int len = listed[lo].len, pieces = (len + PIECE - 1) / PIECE;
            int j = c - listed[lo].start + spread(p, pieces);  // rows' first pieces hold the hubs
            if (j >= pieces) j -= pieces;
            const int i1 = min(len, (j + 1) * PIECE);
            for (int i = j * PIECE + lane; i < i1; i += 32) body(p, q0 + i);
        }
    }
}

#define B_ROW [&](int k, long long* q0, int* len) { *q0 = bptr[k]; *len = (int)(bptr[k + 1] - *q0); }

// the first position in bidx[lo, hi) (sorted) holding a column >= col
__device__ __forceinline__ long long lower_bound(const int* bidx, long long lo, long long hi,
                                                 int col) {
    while (lo < hi) {
        const long long mid = (lo + hi) >> 1;
        if (bidx[mid] < col) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Partial products of each row of A·B, a warp a row
extern "C" __global__ void row_products(int m, const long long* aptr, const int* aidx,
                                        const long long* bptr, long long* out) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= m) return;
    long long sum = 0;
    for (long long e = aptr[row] + lane; e < aptr[row + 1]; e += 32) {
        const int k = aidx[e];
        sum += bptr[k + 1] - bptr[k];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
    if (lane == 0) out[row] = sum;
}

// Each row's bin in lo..hi: the first whose upper bound holds its count (a count of 0: none;
// above the last bound: bin nbins, the dense rows). sizes[b] counts bin b's rows.
// A row whose products pass first_products goes to the second bin (or the dense rows) even if
// its count fits the first: the numeric pass's thread-per-row bin works through every product
// alone.
extern "C" __global__ void bin_rows(long long lo, long long hi, const long long* counts,
                                    const long long* uppers, int nbins, const long long* products,
                                    long long first_products, unsigned char* bin_of, int* sizes) {
    __shared__ int local[32];
    if (threadIdx.x < 32) local[threadIdx.x] = 0;
    __syncthreads();
    const long long row = lo + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row < hi) {
        const long long c = counts[row];
        int b = NO_BIN;
        if (c > 0) {
            b = 0;
            while (b < nbins && c > uppers[b]) ++b;
            if (b == 0 && products[row] > first_products) b = 1;
            atomicAdd(&local[b], 1);
        }
        bin_of[row - lo] = (unsigned char)b;
    }
    __syncthreads();
    if (threadIdx.x <= nbins && local[threadIdx.x]) atomicAdd(&sizes[threadIdx.x], local[threadIdx.x]);
}

// The rows of lo..hi laid out bin after bin in order (any order within a bin); sizes[nbins + 1
// + b] is bin b's fill, zero at the start. A block counts its rows in shared memory first, so
// there is one global atomic per bin and block.
extern "C" __global__ void bin_scatter(long long lo, long long hi, const unsigned char* bin_of,
                                       int nbins, int* sizes, int* order) {
    __shared__ int local[32], base[32];
    if (threadIdx.x < 32) local[threadIdx.x] = 0;
    __syncthreads();
    const long long row = lo + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int b = NO_BIN, mine = 0;
    if (row < hi) {
        b = bin_of[row - lo];
        if (b != NO_BIN) mine = atomicAdd(&local[b], 1);
    }
    __syncthreads();
    if (threadIdx.x <= nbins) {
        int start = 0;
        for (int i = 0; i < (int)threadIdx.x; ++i) start += sizes[i];
        const int n = local[threadIdx.x];
        base[threadIdx.x] = start + (n ? atomicAdd(&sizes[nbins + 1 + threadIdx.x], n) : 0);
    }
    __syncthreads();
    if (b != NO_BIN) order[base[b] + mine] = (int)row;
}

// Rows of at most TINY nonzeros (and few products), a thread each: a warp per row left most
// lanes idle on graphs whose rows hold a handful of entries. The row's columns are kept in
// order in a small array as they come (insertion), so the numeric pass writes them with no
// table and no sort.
template <bool NUMERIC>
__device__ __forceinline__ int tiny_row(int row, const long long* aptr, const int* aidx,
        const val_t* aval, const long long* bptr, const int* bidx, const val_t* bval,
        int* cols, val_t* vals) {
    int n = 0;
    for (long long p = aptr[row]; p < aptr[row + 1]; ++p) {
        const int k = aidx[p];
        const val_t a = NUMERIC ? aval[p] : val_t(0);
        for (long long q = bptr[k]; q < bptr[k + 1]; ++q) {
            const int col = bidx[q];
            int i = n;
            while (i > 0 && cols[i - 1] > col) --i;
            if (i > 0 && cols[i - 1] == col) {
                if (NUMERIC) vals[i - 1] += a * bval[q];
                continue;
            }
            for (int j = n; j > i; --j) {
                cols[j] = cols[j - 1];
                if (NUMERIC) vals[j] = vals[j - 1];
            }
            cols[i] = col;
            if (NUMERIC) vals[i] = a * bval[q];
            ++n;
        }
    }
    return n;
}

extern "C" __global__ void symbolic_tiny(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, long long* row_nnz) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= nrows) return;
    int cols[TINY];
    const int row = rows[r];
    row_nnz[row] = tiny_row<false>(row, aptr, aidx, nullptr, bptr, bidx, nullptr, cols, nullptr);
}

extern "C" __global__ void numeric_tiny(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, const long long* cptr, long long cbase, int* cidx, val_t* cval) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= nrows) return;
    int cols[TINY];
    val_t vals[TINY];
    const int row = rows[r];
    const int n = tiny_row<true>(row, aptr, aidx, aval, bptr, bidx, bval, cols, vals);
    const long long base = cptr[row] - cbase;
    for (int i = 0; i < n; ++i) { cidx[base + i] = cols[i]; cval[base + i] = vals[i]; }
}

// MAX_THREADS: the largest block this module launches (at 1024, registers must fit 64)
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
symbolic_shared(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, long long* row_nnz) {
    extern __shared__ int smem[];
    __shared__ int counts[GROUPS], nlisted[GROUPS];
    __shared__ Listed listed[GROUPS * CAP + 1];
    const int g = threadIdx.x / G, lane = threadIdx.x % G;
    int* keys = smem + g * T;
    const long long r = (long long)blockIdx.x * GROUPS + g;
    for (int s = lane; s < T; s += G) keys[s] = EMPTY;
    if (lane == 0) counts[g] = 0;
    GROUP_SYNC();
    const int row = r < nrows ? rows[r] : -1;
    for_products<G, CAP>(aptr, aidx, row, listed + g * CAP, nlisted + g, B_ROW,
                         [&](long long, long long q) {
        bool fresh;
        insert(keys, bidx[q], &fresh);
        if (fresh) atomicAdd(&counts[g], 1);
    });
    GROUP_SYNC();
    if (row >= 0 && lane == 0) row_nnz[row] = counts[g];
}

extern "C" __global__ void __launch_bounds__(MAX_THREADS)
numeric_shared(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, const long long* cptr, long long cbase, int* cidx, val_t* cval) {
    extern __shared__ __align__(8) unsigned char raw[];
    __shared__ int nlisted[GROUPS];
    __shared__ Listed listed[GROUPS * CAP + 1];
    const int g = threadIdx.x / G, lane = threadIdx.x % G;
    val_t* vals = (val_t*)raw + g * T;
    int* keys = (int*)((val_t*)raw + GROUPS * T) + g * T;
    const long long r = (long long)blockIdx.x * GROUPS + g;
    for (int s = lane; s < T; s += G) { keys[s] = EMPTY; vals[s] = 0; }
    GROUP_SYNC();
    const int row = r < nrows ? rows[r] : -1;
    for_products<G, CAP>(aptr, aidx, row, listed + g * CAP, nlisted + g, B_ROW,
                         [&](long long p, long long q) {
        bool fresh;
        const int h = insert(keys, bidx[q], &fresh);
        atomicAdd(&vals[h], aval[p] * bval[q]);
    });
    GROUP_SYNC();
#if RANK_WORDS
    // One row per block. When the row's columns span at most RANK_WORDS·32, a bitmap of them
    // gives each entry its place (the set bits before it) and no sort is needed.
    {
        __shared__ int span[2];
        unsigned int* bits = (unsigned int*)(keys + T);
        int* before = (int*)(bits + RANK_WORDS);
        if (threadIdx.x == 0) { span[0] = EMPTY; span[1] = -1; }
        __syncthreads();
        int lo = EMPTY, hi = -1;
        for (int s = lane; s < T; s += G) {
            const int key = keys[s];
            if (key != EMPTY) { lo = min(lo, key); hi = max(hi, key); }
        }
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(FULL, lo, o));
            hi = max(hi, __shfl_xor_sync(FULL, hi, o));
        }
        if (threadIdx.x % 32 == 0) { atomicMin(&span[0], lo); atomicMax(&span[1], hi); }
        __syncthreads();
        const int w0 = span[0] >> 5;
        const int words = span[1] < 0 ? 0 : (span[1] >> 5) - w0 + 1;
        if (words <= RANK_WORDS) {  // the same for every thread of the block
            for (int w = lane; w < words; w += G) bits[w] = 0;
            __syncthreads();
            for (int s = lane; s < T; s += G) {
                const int key = keys[s];
                if (key != EMPTY) atomicOr(&bits[(key >> 5) - w0], 1u << (key & 31));
            }
            __syncthreads();
            const int per = (words + G - 1) / G;
            const int a = min(words, lane * per), b = min(words, a + per);
            int mine = 0, total;
            for (int w = a; w < b; ++w) mine += __popc(bits[w]);
            int at = group_exclusive_scan<G>(mine, &total);
            for (int w = a; w < b; ++w) { before[w] = at; at += __popc(bits[w]); }
            __syncthreads();
            if (row < 0) return;
            const long long base = cptr[row] - cbase;
            for (int s = lane; s < T; s += G) {
                const int key = keys[s];
                if (key == EMPTY) continue;
                const int w = (key >> 5) - w0;
                const long long pos = base + before[w] + __popc(bits[w] & ((1u << (key & 31)) - 1u));
                cidx[pos] = key;
                cval[pos] = vals[s];
            }
            return;
        }
    }
#endif
    // The entries moved to the table's front, in rounds of G slots (an entry only moves to a
    // slot already read), then sorted (bitonic) over the next power of two: a row fills at most
    // half its table, and most rows far less.
    int count = 0;
    for (int s0 = 0; s0 < T; s0 += G) {
        const int key = keys[s0 + lane];
        const val_t val = vals[s0 + lane];
        int moved;
        const int at = count + group_exclusive_scan<G>(key != EMPTY, &moved);
        GROUP_SYNC();
        if (key != EMPTY) { keys[at] = key; vals[at] = val; }
        count += moved;
    }
    int size_all = 1;
    while (size_all < count) size_all <<= 1;
    for (int s = count + lane; s < size_all; s += G) keys[s] = EMPTY;  // sorts last
    GROUP_SYNC();
    for (int size = 2; size <= size_all; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = lane; i < size_all; i += G) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool up = (i & size) == 0;
                    const int ki = keys[i], kj = keys[j];
                    if ((ki > kj) == up) {
                        keys[i] = kj; keys[j] = ki;
                        const val_t t = vals[i]; vals[i] = vals[j]; vals[j] = t;
                    }
                }
            }
            GROUP_SYNC();
        }
    }
    if (row >= 0) {
        const long long base = cptr[row] - cbase;
        for (int s = lane; s < count; s += G) { cidx[base + s] = keys[s]; cval[base + s] = vals[s]; }
    }
}

// a column's bit, set by an atomic only when a read does not find it set already
__device__ __forceinline__ void mark(unsigned int* bits, int col) {
    const unsigned int bit = 1u << (col & 31);
    if (!(bits[col >> 5] & bit)) atomicOr(&bits[col >> 5], bit);
}

#define DENSE_CAP (DENSE_G / 2)

// Rows too long for a shared table: a bitmap of all n columns in shared memory. Its count is
// the row's nonzeros.
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
symbolic_dense(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, int ncols, long long* row_nnz) {
    extern __shared__ unsigned int bits[];
    __shared__ unsigned long long count;
    __shared__ int nlisted;
    __shared__ Listed listed[DENSE_CAP];
    const int words = (ncols + 31) / 32;
    for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const int row = rows[blockIdx.x];
    for_products<DENSE_G, DENSE_CAP>(aptr, aidx, row, listed, &nlisted, B_ROW,
                                     [&](long long, long long q) { mark(bits, bidx[q]); });
    __syncthreads();
    unsigned long long mine = 0;
    for (int w = threadIdx.x; w < words; w += blockDim.x) mine += __popc(bits[w]);
    atomicAdd(&count, mine);
    __syncthreads();
    if (threadIdx.x == 0) row_nnz[row] = (long long)count;
}

// The numeric pass of rows too long for a shared table: the columns in chunks of CHUNK, each
// with a dense accumulator in shared memory and a byte per column that says it was met (a
// plain store: bits would take an atomic, and the lanes of one instruction, on neighbouring
// columns of a row of B, would wait on each other's). Every warp finds the chunk's part of
// each row of B by binary search, so each product is still read once; a scan of the bytes
// writes the chunk's entries in column order.
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
numeric_dense(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, int ncols, const long long* cptr, long long cbase, int* cidx,
        val_t* cval) {
    extern __shared__ __align__(8) unsigned char raw[];
    __shared__ int nlisted;
    __shared__ Listed listed[DENSE_CAP];
    val_t* acc = (val_t*)raw;
    unsigned char* seen = (unsigned char*)(acc + CHUNK);
    const unsigned int* seen4 = (const unsigned int*)seen;
    const int row = rows[blockIdx.x];
    long long at = cptr[row] - cbase;
    for (int c0 = 0; c0 < ncols; c0 += CHUNK) {
        const int c1 = min(ncols, c0 + CHUNK), words = (c1 - c0 + 3) / 4;
        for (int w = threadIdx.x; w < words; w += blockDim.x) ((unsigned int*)seen)[w] = 0;
        for (int c = threadIdx.x; c < c1 - c0; c += blockDim.x) acc[c] = 0;
        __syncthreads();
        for_products<DENSE_G, DENSE_CAP>(aptr, aidx, row, listed, &nlisted,
            [&](int k, long long* q0, int* len) {
                const long long lo = c0 == 0 ? bptr[k] : lower_bound(bidx, bptr[k], bptr[k + 1], c0);
                const long long hi = c1 == ncols ? bptr[k + 1]
                                                 : lower_bound(bidx, bptr[k], bptr[k + 1], c1);
                *q0 = lo;
                *len = (int)(hi - lo);
            },
            [&](long long p, long long q) {
                const int col = bidx[q] - c0;
                seen[col] = 1;
                atomicAdd(&acc[col], aval[p] * bval[q]);
            });
        __syncthreads();
        // each thread takes a contiguous run of words; a block scan of their counts gives
        // where each run's entries go
        const int per = (words + blockDim.x - 1) / blockDim.x;
        const int w0 = min(words, (int)threadIdx.x * per), w1 = min(words, w0 + per);
        int mine = 0, total;
        for (int w = w0; w < w1; ++w) mine += __popc(seen4[w]);  // a met column's byte is 1
        long long out = at + group_exclusive_scan<DENSE_G>(mine, &total);
        for (int w = w0; w < w1; ++w) {
            unsigned int word = seen4[w];
            while (word) {
                const int col = w * 4 + (__ffs(word) - 1) / 8;
                word &= word - 1;
                cidx[out] = c0 + col;
                cval[out] = acc[col];
                ++out;
            }
        }
        at += total;
        __syncthreads();  // the chunk is written before the next one clears it
    }
}
"""

_MODULES: dict = {}


def _threads(group: int, table: int, entry: int) -> int:
    """Threads per block of a shared-table kernel: several warp-sized groups share a block where
    their tables fit in the default 48 KiB, otherwise a block is one group."""
    if group < BLOCK and table * entry * (BLOCK // group) <= 48 * 1024:
        return BLOCK
    return group


def _kernel(name: str, val_t: str, group: int = 0, table: int = 0, rank_words: int = 0,
            chunk: int = 0, threads: int = 0):
    import cupy

    key = (val_t, group, table, rank_words, chunk, threads)
    module = _MODULES.get(key)
    if module is None:
        # group 0: the module of the dense and binning kernels, whose blocks are up to
        # DENSE_THREADS; otherwise a shared-table module, blocks of ``threads``
        max_threads = threads or group or DENSE_THREADS
        table, group = max(table, 2), max(group, 32)
        code = (f"#define VAL_T {val_t}\n#define G {group}\n#define T {table}\n#define TINY {TINY}\n"
                f"#define GROUPS {max(1, threads // group)}\n"
                f"#define CAP {group // 2 if group >= 64 else 0}\n"
                f"#define TBITS {table.bit_length() - 1}\n#define RANK_WORDS {rank_words}\n"
                f"#define CHUNK {max(chunk, 32)}\n#define DENSE_G {DENSE_THREADS}\n"
                f"#define MAX_THREADS {max_threads}\n" + _SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[key] = module
    return module.get_function(name)


@functools.lru_cache(maxsize=None)
def _shared_limit(device: int) -> int:
    import cupy

    optin = int(cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])
    return optin - STATIC_SHARED


def shared_limit() -> int:
    """Bytes of dynamic shared memory one block may use on this GPU (opted in), less what the
    kernels declare statically. (CuPy's ``attributes`` asks the driver for every attribute:
    cached.)"""
    import cupy

    return _shared_limit(cupy.cuda.Device().id)


def dense_chunk(val_size: int) -> int:
    """Columns per chunk of the dense numeric pass: a power of two whose accumulator and bytes
    of met columns fit in shared memory."""
    chunk = 1 << 20
    while chunk * (val_size + 1) > shared_limit():
        chunk //= 2
    return chunk


def _launch(fn, blocks: int, threads: int, smem: int, args) -> None:
    if not blocks:
        return
    try:
        if smem > 32 * 1024:  # the default cap is 48 KiB less the kernel's static shared memory
            fn.max_dynamic_shared_size_bytes = smem
        fn((blocks,), (threads,), args, shared_mem=smem)
    except Exception as exc:  # name the launch: the driver's own message does not
        info = {k: getattr(fn, k, "?") for k in ("num_regs", "max_threads_per_block",
                                                 "max_dynamic_shared_size_bytes")}
        raise RuntimeError(f"SpGEMM launch of {blocks} blocks of {threads} threads with {smem} "
                           f"bytes of shared memory refused ({info}): {exc}") from exc


def _launch_bin(kind, val_t, val_size, rows, group, table, args, ncols=0):
    """Launch the ``kind`` ("symbolic" or "numeric") kernel of one bin over ``rows`` (int32
    row ids): a thread per row (group 1), else a shared-table kernel, a group of threads a
    row. Numeric rows that get a block of their own (group >= 128) are written in order
    through a bitmap of their columns where it fits beside the table, and sorted otherwise."""
    import cupy

    n = int(rows.size)
    if group == 1:
        return _launch(_kernel(f"{kind}_tiny", val_t), -(-n // BLOCK), BLOCK, 0,
                       (rows, cupy.int32(n), *args))
    assert table % group == 0, "a group's threads take the table's slots in whole rounds"
    numeric = kind == "numeric"
    entry = 4 + (val_size if numeric else 0)
    rank_words = 0
    if numeric and group >= 128:
        threads = group
        room = (shared_limit() - table * entry) // 8  # a bitmap word and its count
        rank_words = min(_pow2_at_least(-(-ncols // 32)), 2 * table)  # few kernel variants
        while rank_words > room:
            rank_words //= 2
    else:
        threads = _threads(group, table, entry)
    groups = threads // group
    _launch(_kernel(f"{kind}_shared", val_t, group, table, rank_words, threads=threads),
            -(-n // groups), threads, groups * table * entry + 8 * rank_words,
            (rows, cupy.int32(n), *args))


def _bin_name(group: int, table: int) -> str:
    return "a thread a row" if group == 1 else f"table {table}"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_UPPERS: dict = {}


def _bin(cupy, counts, bins, lo: int = 0, hi: int | None = None, fetch=None, products=None,
         first_products: int = 2**62):
    """Row ids (int32) of rows lo..hi per bin of ``bins`` by ``counts`` (rows with a count of 0
    in none), and the rows above the last bin. Two kernels and one copy of the bins' sizes to
    the host (where CuPy's sort, search and count took a dozen calls and as many kernels).
    ``fetch`` (int64 on the device) comes to the host in the same copy, as a third result.
    Rows whose ``products`` pass ``first_products`` skip the first bin."""
    hi = int(counts.size) if hi is None else hi
    n, nbins = hi - lo, len(bins)
    key = (bins, cupy.cuda.Device().id)
    if key not in _UPPERS:
        _UPPERS[key] = cupy.asarray([upper for upper, _, _ in bins], dtype=np.int64)
    sizes = cupy.zeros(2 * (nbins + 1), dtype=np.int32)  # the bins' sizes, then their fills
    bin_of = cupy.empty(max(n, 1), dtype=np.uint8)
    order = cupy.empty(max(n, 1), dtype=np.int32)
    blocks = -(-n // BLOCK)
    _launch(_kernel("bin_rows", "float"), blocks, BLOCK, 0,
            (np.int64(lo), np.int64(hi), counts, _UPPERS[key], np.int32(nbins),
             counts if products is None else products, np.int64(first_products), bin_of, sizes))
    _launch(_kernel("bin_scatter", "float"), blocks, BLOCK, 0,
            (np.int64(lo), np.int64(hi), bin_of, np.int32(nbins), sizes, order))
    wanted = sizes[:nbins + 1]
    if fetch is not None:
        wanted = cupy.concatenate([wanted.astype(np.int64), fetch])
    host = wanted.get()
    starts = np.concatenate([[0], np.cumsum(host[:nbins + 1])])
    out = [(order[starts[i]:starts[i + 1]], group, table) for i, (_, group, table) in enumerate(bins)]
    dense = order[starts[nbins]:starts[nbins + 1]]
    return (out, dense) if fetch is None else (out, dense, host[nbins + 1:])


class _GpuProduct:
    """One A·B on the GPU: inputs on the device and the symbolic pass done on construction;
    ``numeric(lo, hi)`` fills rows lo..hi (an output larger than the GPU is made in batches)."""

    def __init__(self, a: Csr, b: Csr, profile: bool = False):
        import cupy

        self.spans = [] if profile else None  # (label, rows, start event, stop event)
        val_dtype = np.result_type(a.data.dtype, b.data.dtype)
        if val_dtype not in (np.float32, np.float64):
            val_dtype = np.dtype(np.float64)
        n = b.shape[1]
        if n >= 2**31 - 1:
            raise ValueError("the GPU SpGEMM kernel handles up to 2^31 - 2 columns; split B by columns")
        if n > MAX_DENSE_COLUMNS:  # multiply() and multiply_to_host() split B by columns
            raise ValueError(f"the GPU SpGEMM kernel handles up to {MAX_DENSE_COLUMNS} columns "
                             f"of B per product (B has {n}); split B by columns")
        self.val_dtype = np.dtype(val_dtype)
        self.val_t = "double" if val_dtype == np.float64 else "float"
        self.vsize = self.val_dtype.itemsize
        self.shape = (a.shape[0], n)
        as_dev = lambda x, t: cupy.asarray(x, dtype=t)  # noqa: E731
        self.aptr = as_dev(a.indptr, np.int64)
        self.aptr = self.aptr - self.aptr[0]
        self.aidx, self.aval = as_dev(a.indices, np.int32), as_dev(a.data, val_dtype)
        self.bptr = as_dev(b.indptr, np.int64)
        self.bptr = self.bptr - self.bptr[0]
        self.bidx, self.bval = as_dev(b.indices, np.int32), as_dev(b.data, val_dtype)
        m = self.shape[0]
        self.products = cupy.empty(m, dtype=np.int64)
        _launch(_kernel("row_products", "float"), -(-m // (BLOCK // 32)), BLOCK, 0,  # a warp a row
                (np.int32(m), self.aptr, self.aidx, self.bptr, self.products))
        counts = cupy.zeros(m + 1, dtype=np.int64)  # each row's nonzeros, after a leading 0
        self.row_nnz = counts[1:]
        self._symbolic()
        self.cptr = cupy.cumsum(counts)

    def _timed(self, label: str, rows: int, launch) -> None:
        """launch(), timed on the GPU when profiling."""
        if self.spans is None or not rows:
            return launch()
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        launch()
        stop.record()
        self.spans.append((label, rows, start, stop))

    def profile(self) -> list[dict]:
        """Each kernel launch's rows and milliseconds so far (after profile=True)."""
        import cupy

        if self.spans:
            self.spans[-1][3].synchronize()
        return [{"kernel": label, "rows": rows, "ms": cupy.cuda.get_elapsed_time(start, stop)}
                for label, rows, start, stop in self.spans or []]

    @property
    def flops(self) -> int:
        return 2 * int(self.products.sum())

    def _bitmap_bytes(self) -> int:
        return 4 * ((self.shape[1] + 31) // 32)

    def _numeric_plan(self):
        """(bins, columns per chunk of the dense pass). Where C's rows fit one chunk, a row goes
        dense rather than to a table of T slots when C has at most DENSE_RATIO·T columns: an
        accumulator indexed by column needs no hashing, and clearing and scanning it costs no
        more than the passes over the table (clear, span, rank, write)."""
        chunk = min(dense_chunk(self.vsize), _pow2_at_least(max(32, self.shape[1])))
        if self.shape[1] > chunk:
            return NUMERIC_BINS, chunk
        return tuple(b for b in NUMERIC_BINS if self.shape[1] > DENSE_RATIO * b[2]), chunk

    def _symbolic(self) -> None:
        import cupy

        bins, dense = _bin(cupy, self.products, SYMBOLIC_BINS)
        for rows, group, table in bins:
            self._timed(f"symbolic {_bin_name(group, table)}", int(rows.size), lambda: _launch_bin(
                "symbolic", self.val_t, self.vsize, rows, group, table,
                (self.aptr, self.aidx, self.bptr, self.bidx, self.row_nnz)))
        self._timed("symbolic dense", int(dense.size), lambda: _launch(
            _kernel("symbolic_dense", self.val_t), int(dense.size), DENSE_THREADS,
            self._bitmap_bytes(),
            (dense, cupy.int32(dense.size), self.aptr, self.aidx, self.bptr, self.bidx,
             cupy.int32(self.shape[1]), self.row_nnz)))

    def batches(self, max_entries: int) -> list[tuple[int, int]]:
        """Contiguous row ranges whose outputs hold at most ``max_entries`` each (a single
        row larger than that is a batch of its own)."""
        cptr = self.cptr.get()
        out, lo, m = [], 0, self.shape[0]
        while lo < m:
            hi = int(np.searchsorted(cptr, cptr[lo] + max_entries, side="right")) - 1
            hi = min(m, max(hi, lo + 1))
            out.append((lo, hi))
            lo = hi
        return out or [(0, 0)]

    def numeric(self, lo: int = 0, hi: int | None = None) -> Csr:
        """Rows lo..hi of C, on the device."""
        import cupy

        hi = self.shape[0] if hi is None else hi
        numeric_bins, chunk = self._numeric_plan()
        ends = self.cptr[lo:hi + 1:hi - lo] if hi > lo else self.cptr[lo:lo + 1].repeat(2)
        bins, dense, (base, end) = _bin(cupy, self.row_nnz, numeric_bins, lo, hi, fetch=ends,
                                        products=self.products, first_products=TINY_PRODUCTS)
        base, end = int(base), int(end)
        cidx = cupy.empty(end - base, dtype=np.int32)
        cval = cupy.empty(end - base, dtype=self.val_dtype)
        cbase = np.int64(base)  # the kernels address C's rows by their index in A
        for rows, group, table in bins:
            self._timed(f"numeric {_bin_name(group, table)}", int(rows.size), lambda: _launch_bin(
                "numeric", self.val_t, self.vsize, rows, group, table,
                (self.aptr, self.aidx, self.aval, self.bptr, self.bidx, self.bval, self.cptr,
                 cbase, cidx, cval), ncols=self.shape[1]))
        self._timed("numeric dense", int(dense.size), lambda: _launch(
            _kernel("numeric_dense", self.val_t, chunk=chunk), int(dense.size), DENSE_THREADS,
            chunk * (self.vsize + 1),
            (dense, cupy.int32(dense.size), self.aptr, self.aidx, self.aval, self.bptr,
             self.bidx, self.bval, cupy.int32(self.shape[1]), self.cptr, cbase, cidx, cval)))
        return Csr(self.cptr[lo:hi + 1] - base, cidx, cval, (hi - lo, self.shape[1]))


def _multiply_gpu(a: Csr, b: Csr) -> Csr:
    return _GpuProduct(a, b).numeric()


def multiply_to_host(xp, a: Csr, b: Csr, max_bytes: int | None = None,
                     max_columns: int | None = None) -> Csr:
    """A·B as NumPy arrays; on the GPU, made in row batches of at most ``max_bytes`` of
    output each when C is larger than that (C may be larger than the GPU), and a block of B's
    columns at a time where B is wider than ``max_columns`` (default: what the kernel takes)."""
    if xp is np:
        return multiply(np, a, b, max_columns)
    width = max_columns or MAX_DENSE_COLUMNS
    if b.shape[1] > width:
        return _by_column_blocks(
            xp, b, width, lambda block: multiply_to_host(xp, a, block, max_bytes, width), np)
    product = _GpuProduct(a, b)
    entry = 4 + product.vsize
    limit = max(1, (max_bytes or 1 << 62) // entry)
    parts = []
    for lo, hi in product.batches(limit):
        c = product.numeric(lo, hi)
        parts.append((c.indptr.get(), c.indices.get(), c.data.get()))
        del c
    indptrs, offset = [np.zeros(1, np.int64)], 0
    for ptr, _, _ in parts:
        indptrs.append(ptr[1:] + offset)
        offset += int(ptr[-1])
    return Csr(np.concatenate(indptrs), np.concatenate([p[1] for p in parts]),
               np.concatenate([p[2] for p in parts]), product.shape)
