"""Sparse C = A·B, row by row (Gustavson), on NumPy/SciPy and on the GPU with hash tables.

C's pattern is the structural product: (i, j) is stored when some k has A(i, k) and B(k, j)
stored, even if the values cancel. Rows are sorted, with no duplicates; row offsets are int64.

The GPU kernel (CuPy RawKernels) works the way SMASH and nsparse do. Each output row's
partial products are merged as they are made, in a hash table keyed by column, so no
partial-product matrix is ever stored. It runs in two passes: the symbolic pass counts each
row's nonzeros so C is allocated exactly, and the numeric pass fills it. Rows are binned by
their number of partial products:

- short rows share a block, a warp each, with a small shared-memory table;
- longer rows get a whole block and a larger shared-memory table;
- rows too long for shared tables use a bitmap of all columns in shared memory, and a dense
  accumulator in global memory for the numeric pass.

The symbolic pass bins rows by partial products, the numeric pass by the exact counts. A
shared table is sorted in place (bitonic) before it is written. A dense row comes out sorted
from a scan of its bitmap. The NumPy/SciPy path defines the expected result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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


def products_per_row(xp, a: Csr, b: Csr):
    """Partial products each row of A·B makes (int64): the work of each row."""
    if a.nnz == 0:
        return xp.zeros(a.shape[0], dtype=np.int64)
    b_len = xp.diff(b.indptr)[a.indices]
    csum = xp.concatenate([xp.zeros(1, np.int64), xp.cumsum(b_len, dtype=np.int64)])
    start = a.indptr - a.indptr[0]
    return csum[start[1:]] - csum[start[:-1]]


def multiply(xp, a: Csr, b: Csr) -> Csr:
    """The structural product A·B with sorted rows, on the array module of the inputs."""
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"A is {a.shape[0]}×{a.shape[1]} but B is {b.shape[0]}×{b.shape[1]}")
    if xp is np:
        return _multiply_scipy(a, b)
    return _multiply_gpu(a, b)


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
SYMBOLIC_BINS = ((16, 32, 32), (128, 32, 256), (512, 128, 1024), (2048, 256, 4096),
                 (16384, 1024, 32768))
NUMERIC_BINS = ((16, 32, 32), (128, 32, 256), (512, 128, 1024), (2048, 256, 4096),
                (8192, 1024, 16384))
BLOCK = 256  # threads per block for the warp-per-row bins
DENSE_THREADS = 1024
MAX_DENSE_COLUMNS = 8 * 160 * 1024  # a row bitmap of this many columns fits in shared memory
EMPTY = 0x7FFFFFFF  # an empty slot; larger than any column, so it sorts last

_SOURCE = r"""
#define EMPTY 0x7fffffff
typedef VAL_T val_t;

__device__ __forceinline__ int slot_of(int key, int mask) {
    return (int)(((unsigned int)key * 2654435761u) & (unsigned int)mask);
}

// the slot of key, inserting it; *fresh says whether it was new
__device__ __forceinline__ int insert(int* keys, int key, int mask, bool* fresh) {
    int h = slot_of(key, mask);
    while (true) {
        int old = atomicCAS(&keys[h], EMPTY, key);
        if (old == EMPTY) { *fresh = true; return h; }
        if (old == key) { *fresh = false; return h; }
        h = (h + 1) & mask;
    }
}

// The partial products of a row: each warp of the group takes one entry of A's row at a time
// and its lanes stride over the matching row of B (B's rows are short: a warp per entry keeps
// the lanes busy where a whole block per entry would idle).
#define FOR_PRODUCTS(G_, row, body)                                                     \
    {                                                                                   \
        const int warp_ = (threadIdx.x % (G_)) / 32, warps_ = ((G_) + 31) / 32;          \
        const int lane_ = threadIdx.x % 32;                                             \
        for (long long p = aptr[row] + warp_; p < aptr[row + 1]; p += warps_) {         \
            const int k = aidx[p];                                                      \
            for (long long q = bptr[k] + lane_; q < bptr[k + 1]; q += 32) { body }      \
        }                                                                               \
    }

extern "C" __global__ void symbolic_shared(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, long long* row_nnz) {
    extern __shared__ int smem[];
    __shared__ int counts[32];
    const int groups = blockDim.x / G, g = threadIdx.x / G, lane = threadIdx.x % G;
    int* keys = smem + g * T;
    const long long r = (long long)blockIdx.x * groups + g;
    for (int s = lane; s < T; s += G) keys[s] = EMPTY;
    if (lane == 0) counts[g] = 0;
    __syncthreads();
    if (r < nrows) {
        const int row = rows[r];
        FOR_PRODUCTS(G, row, {
            bool fresh;
            insert(keys, bidx[q], T - 1, &fresh);
            if (fresh) atomicAdd(&counts[g], 1);
        })
    }
    __syncthreads();
    if (r < nrows && lane == 0) row_nnz[rows[r]] = counts[g];
}

extern "C" __global__ void numeric_shared(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, const long long* cptr, int* cidx, val_t* cval) {
    extern __shared__ __align__(8) unsigned char raw[];
    const int groups = blockDim.x / G, g = threadIdx.x / G, lane = threadIdx.x % G;
    val_t* vals = (val_t*)raw + g * T;
    int* keys = (int*)((val_t*)raw + groups * T) + g * T;
    const long long r = (long long)blockIdx.x * groups + g;
    for (int s = lane; s < T; s += G) { keys[s] = EMPTY; vals[s] = 0; }
    __syncthreads();
    if (r < nrows) {
        const int row = rows[r];
        FOR_PRODUCTS(G, row, {
            bool fresh;
            const int h = insert(keys, bidx[q], T - 1, &fresh);
            atomicAdd(&vals[h], aval[p] * bval[q]);
        })
    }
    __syncthreads();
    // bitonic sort of the table by key; empty slots (EMPTY) sort last
    for (int size = 2; size <= T; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = lane; i < T; i += G) {
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
            __syncthreads();
        }
    }
    if (r < nrows) {
        const int row = rows[r];
        const long long base = cptr[row], count = cptr[row + 1] - base;
        for (int s = lane; s < count; s += G) { cidx[base + s] = keys[s]; cval[base + s] = vals[s]; }
    }
}

// Rows too long for a shared table: a bitmap of all n columns in shared memory (and, for
// the numeric pass, a dense accumulator of n values in global memory). Scanning the bitmap
// in column order writes the row sorted, with no sort at all.
extern "C" __global__ void symbolic_dense(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, int ncols, long long* row_nnz) {
    extern __shared__ unsigned int bits[];
    __shared__ unsigned long long count;
    const int words = (ncols + 31) / 32;
    for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const int row = rows[blockIdx.x];
    FOR_PRODUCTS(DENSE_G, row, {
        const int col = bidx[q];
        atomicOr(&bits[col >> 5], 1u << (col & 31));
    })
    __syncthreads();
    unsigned long long mine = 0;
    for (int w = threadIdx.x; w < words; w += blockDim.x) mine += __popc(bits[w]);
    atomicAdd(&count, mine);
    __syncthreads();
    if (threadIdx.x == 0) row_nnz[row] = (long long)count;
}

extern "C" __global__ void numeric_dense(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, int ncols, val_t* dense, const long long* cptr, int* cidx,
        val_t* cval) {
    extern __shared__ unsigned int bits[];
    __shared__ int scan[DENSE_G];
    const int words = (ncols + 31) / 32;
    val_t* acc = dense + (long long)blockIdx.x * ncols;
    for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
    for (int c = threadIdx.x; c < ncols; c += blockDim.x) acc[c] = 0;
    __syncthreads();
    const int row = rows[blockIdx.x];
    FOR_PRODUCTS(DENSE_G, row, {
        const int col = bidx[q];
        atomicOr(&bits[col >> 5], 1u << (col & 31));
        atomicAdd(&acc[col], aval[p] * bval[q]);
    })
    __syncthreads();
    // each thread takes a contiguous run of words; a block scan of their counts gives where
    // each run's entries go, in column order
    const int per = (words + blockDim.x - 1) / blockDim.x;
    const int w0 = min(words, threadIdx.x * per), w1 = min(words, w0 + per);
    int mine = 0;
    for (int w = w0; w < w1; ++w) mine += __popc(bits[w]);
    scan[threadIdx.x] = mine;
    __syncthreads();
    for (int off = 1; off < blockDim.x; off <<= 1) {
        const int add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
    }
    long long at = cptr[row] + scan[threadIdx.x] - mine;
    for (int w = w0; w < w1; ++w) {
        unsigned int word = bits[w];
        while (word) {
            const int bit = __ffs(word) - 1;
            word &= word - 1;
            const int col = w * 32 + bit;
            cidx[at] = col;
            cval[at] = acc[col];
            ++at;
        }
    }
}
"""

_MODULES: dict = {}


def _kernel(name: str, val_t: str, group: int = 0, table: int = 0):
    import cupy

    key = (val_t, group, table)
    module = _MODULES.get(key)
    if module is None:
        code = (f"#define VAL_T {val_t}\n#define G {max(group, 1)}\n#define T {max(table, 2)}\n"
                f"#define DENSE_G {DENSE_THREADS}\n" + _SOURCE)
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[key] = module
    return module.get_function(name)


def _launch(fn, blocks: int, threads: int, smem: int, args) -> None:
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    if blocks:
        fn((blocks,), (threads,), args, shared_mem=smem)


def _launch_shared(name, val_t, val_size, rows, group, table, args):
    """Launch a shared-table kernel over ``rows`` (int32 row ids), a group of threads each."""
    import cupy

    entry = 4 + (val_size if name.startswith("numeric") else 0)
    threads = BLOCK if group < BLOCK and table * entry * (BLOCK // group) <= 48 * 1024 else group
    groups = threads // group
    n = int(rows.size)
    _launch(_kernel(name, val_t, group, table), -(-n // groups), threads,
            groups * table * entry, (rows, cupy.int32(n), *args))


def _bin(cupy, counts, bins):
    """Row ids (int32) per bin of ``bins`` by ``counts``, and the rows above the last bin."""
    out, lower = [], 0
    for upper, group, table in bins:
        out.append((cupy.nonzero((counts > lower) & (counts <= upper))[0].astype(np.int32), group, table))
        lower = upper
    return out, cupy.nonzero(counts > lower)[0].astype(np.int32)


class _GpuProduct:
    """One A·B on the GPU: inputs on the device and the symbolic pass done on construction;
    ``numeric(lo, hi)`` fills rows lo..hi (an output larger than the GPU is made in batches)."""

    def __init__(self, a: Csr, b: Csr, dense_budget: int = 1 << 30):
        import cupy

        val_dtype = np.result_type(a.data.dtype, b.data.dtype)
        if val_dtype not in (np.float32, np.float64):
            val_dtype = np.dtype(np.float64)
        n = b.shape[1]
        if n >= 2**31 - 1:
            raise ValueError("the GPU SpGEMM kernel handles up to 2^31 - 2 columns; split B by columns")
        if n > MAX_DENSE_COLUMNS:
            raise ValueError(f"the GPU SpGEMM kernel handles up to {MAX_DENSE_COLUMNS} columns "
                             f"of B per product (B has {n}); split B by columns")
        self.val_dtype = np.dtype(val_dtype)
        self.val_t = "double" if val_dtype == np.float64 else "float"
        self.vsize = self.val_dtype.itemsize
        self.shape = (a.shape[0], n)
        self.dense_budget = dense_budget
        as_dev = lambda x, t: cupy.asarray(x, dtype=t)  # noqa: E731
        self.aptr = as_dev(a.indptr, np.int64)
        self.aptr = self.aptr - self.aptr[0]
        self.aidx, self.aval = as_dev(a.indices, np.int32), as_dev(a.data, val_dtype)
        self.bptr = as_dev(b.indptr, np.int64)
        self.bptr = self.bptr - self.bptr[0]
        self.bidx, self.bval = as_dev(b.indices, np.int32), as_dev(b.data, val_dtype)
        self.products = products_per_row(cupy, Csr(self.aptr, self.aidx, self.aval, a.shape),
                                          Csr(self.bptr, self.bidx, self.bval, b.shape))
        self.row_nnz = self._symbolic()
        self.cptr = cupy.concatenate([cupy.zeros(1, np.int64), cupy.cumsum(self.row_nnz)])

    @property
    def flops(self) -> int:
        return 2 * int(self.products.sum())

    def _bitmap_bytes(self) -> int:
        return 4 * ((self.shape[1] + 31) // 32)

    def _symbolic(self):
        import cupy

        row_nnz = cupy.zeros(self.shape[0], dtype=np.int64)
        bins, dense = _bin(cupy, self.products, SYMBOLIC_BINS)
        for rows, group, table in bins:
            _launch_shared("symbolic_shared", self.val_t, self.vsize, rows, group, table,
                           (self.aptr, self.aidx, self.bptr, self.bidx, row_nnz))
        _launch(_kernel("symbolic_dense", self.val_t), int(dense.size), DENSE_THREADS,
                self._bitmap_bytes(),
                (dense, cupy.int32(dense.size), self.aptr, self.aidx, self.bptr, self.bidx,
                 cupy.int32(self.shape[1]), row_nnz))
        return row_nnz

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
        base = int(self.cptr[lo])
        cptr = self.cptr - base  # the kernels address rows by their index in A
        total = int(self.cptr[hi]) - base
        cidx = cupy.empty(total, dtype=np.int32)
        cval = cupy.empty(total, dtype=self.val_dtype)
        counts = cupy.zeros_like(self.row_nnz)
        counts[lo:hi] = self.row_nnz[lo:hi]
        bins, dense = _bin(cupy, counts, NUMERIC_BINS)
        for rows, group, table in bins:
            _launch_shared("numeric_shared", self.val_t, self.vsize, rows, group, table,
                           (self.aptr, self.aidx, self.aval, self.bptr, self.bidx, self.bval,
                            cptr, cidx, cval))
        if dense.size:
            # dense accumulators for as many rows at a time as the budget allows
            per = max(1, self.dense_budget // (self.shape[1] * self.vsize))
            fn = _kernel("numeric_dense", self.val_t)
            for start in range(0, int(dense.size), per):
                rows = dense[start:start + per]
                acc = cupy.empty(int(rows.size) * self.shape[1], dtype=self.val_dtype)
                _launch(fn, int(rows.size), DENSE_THREADS, self._bitmap_bytes(),
                        (rows, cupy.int32(rows.size), self.aptr, self.aidx, self.aval,
                         self.bptr, self.bidx, self.bval, cupy.int32(self.shape[1]), acc,
                         cptr, cidx, cval))
                del acc
        return Csr(self.cptr[lo:hi + 1] - base, cidx, cval, (hi - lo, self.shape[1]))


def _multiply_gpu(a: Csr, b: Csr) -> Csr:
    return _GpuProduct(a, b).numeric()


def multiply_to_host(xp, a: Csr, b: Csr, max_bytes: int | None = None) -> Csr:
    """A·B as NumPy arrays; on the GPU, made in row batches of at most ``max_bytes`` of
    output each when C is larger than that (C may be larger than the GPU)."""
    if xp is np:
        return multiply(np, a, b)
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
