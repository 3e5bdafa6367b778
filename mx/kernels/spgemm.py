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
- rows too long for shared memory use a table in global memory.

A shared table is sorted in place (bitonic) before it is written. Global-table rows are
compacted, then sorted by one radix sort over (row, column). The NumPy/SciPy path defines the
expected result.
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
# bins: (largest product count, threads per row, table slots); tables hold at most half
# their slots (nnz of a row <= its products), so linear probing stays short
SHARED_BINS = ((16, 32, 32), (128, 32, 256), (512, 128, 1024), (2048, 256, 4096),
               (4096, 512, 8192))
BLOCK = 256  # threads per block for the small (warp-per-row) bins
GLOBAL_THREADS = 512
EMPTY = 0x7FFFFFFF  # an empty slot; larger than any column, so it sorts last

_SOURCE = r"""
#define EMPTY 0x7fffffff
typedef VAL_T val_t;

__device__ __forceinline__ int slot_of(int key, int mask) {
    return (int)(((unsigned int)key * 2654435761u) & (unsigned int)mask);
}

// returns the slot of key, inserting it; *fresh says whether it was new
__device__ __forceinline__ int insert(int* keys, int key, int mask, bool* fresh) {
    int h = slot_of(key, mask);
    while (true) {
        int old = atomicCAS(&keys[h], EMPTY, key);
        if (old == EMPTY) { *fresh = true; return h; }
        if (old == key) { *fresh = false; return h; }
        h = (h + 1) & mask;
    }
}

// one group of G threads per row, a table of T slots per group in shared memory
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
        for (long long p = aptr[row]; p < aptr[row + 1]; ++p) {
            const int k = aidx[p];
            for (long long q = bptr[k] + lane; q < bptr[k + 1]; q += G) {
                bool fresh;
                insert(keys, bidx[q], T - 1, &fresh);
                if (fresh) atomicAdd(&counts[g], 1);
            }
        }
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
        for (long long p = aptr[row]; p < aptr[row + 1]; ++p) {
            const int k = aidx[p];
            const val_t av = aval[p];
            for (long long q = bptr[k] + lane; q < bptr[k + 1]; q += G) {
                bool fresh;
                const int h = insert(keys, bidx[q], T - 1, &fresh);
                atomicAdd(&vals[h], av * bval[q]);
            }
        }
    }
    __syncthreads();
    // bitonic sort of the whole table by key; empty slots (EMPTY) sort last
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

// one block per row, its table in global memory at offset[r] with size[r] slots (power of 2)
extern "C" __global__ void symbolic_global(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const long long* bptr, const int* bidx, const long long* offset,
        const int* size, int* table, long long* row_nnz) {
    __shared__ unsigned long long count;
    const long long r = blockIdx.x;
    if (r >= nrows) return;
    int* keys = table + offset[r];
    const int mask = size[r] - 1;
    for (long long s = threadIdx.x; s < size[r]; s += blockDim.x) keys[s] = EMPTY;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const int row = rows[r];
    for (long long p = aptr[row]; p < aptr[row + 1]; ++p) {
        const int k = aidx[p];
        for (long long q = bptr[k] + threadIdx.x; q < bptr[k + 1]; q += blockDim.x) {
            bool fresh;
            insert(keys, bidx[q], mask, &fresh);
            if (fresh) atomicAdd(&count, 1ull);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) row_nnz[row] = (long long)count;
}

extern "C" __global__ void numeric_global(const int* rows, int nrows, const long long* aptr,
        const int* aidx, const val_t* aval, const long long* bptr, const int* bidx,
        const val_t* bval, const long long* offset, const int* size, int* table,
        val_t* table_vals, const long long* cptr, int* cidx, val_t* cval) {
    __shared__ unsigned long long next;
    const long long r = blockIdx.x;
    if (r >= nrows) return;
    int* keys = table + offset[r];
    val_t* vals = table_vals + offset[r];
    const int mask = size[r] - 1;
    for (long long s = threadIdx.x; s < size[r]; s += blockDim.x) { keys[s] = EMPTY; vals[s] = 0; }
    if (threadIdx.x == 0) next = 0;
    __syncthreads();
    const int row = rows[r];
    for (long long p = aptr[row]; p < aptr[row + 1]; ++p) {
        const int k = aidx[p];
        const val_t av = aval[p];
        for (long long q = bptr[k] + threadIdx.x; q < bptr[k + 1]; q += blockDim.x) {
            bool fresh;
            const int h = insert(keys, bidx[q], mask, &fresh);
            atomicAdd(&vals[h], av * bval[q]);
        }
    }
    __syncthreads();
    // compact, unsorted; a radix sort over (row, column) orders these rows afterwards
    const long long base = cptr[row];
    for (long long s = threadIdx.x; s < size[r]; s += blockDim.x) {
        if (keys[s] != EMPTY) {
            const long long at = base + (long long)atomicAdd(&next, 1ull);
            cidx[at] = keys[s]; cval[at] = vals[s];
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
        code = f"#define VAL_T {val_t}\n#define G {max(group, 1)}\n#define T {max(table, 2)}\n" + _SOURCE
        module = cupy.RawModule(code=code, options=("-std=c++14",))
        _MODULES[key] = module
    return module.get_function(name)


def _shared_bytes(val_size: int, groups: int, table: int, numeric: bool) -> int:
    return groups * table * (4 + (val_size if numeric else 0))


def _launch_shared(name, val_t, val_size, rows, group, table, args):
    """Launch a shared-table kernel over ``rows`` (int32 row ids)."""
    import cupy

    threads = BLOCK if group < BLOCK and table * (4 + val_size) * (BLOCK // group) <= 48 * 1024 \
        else group
    groups = threads // group
    smem = _shared_bytes(val_size, groups, table, name.startswith("numeric"))
    fn = _kernel(name, val_t, group, table)
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    n = int(rows.size)
    blocks = -(-n // groups)
    if blocks:
        fn((blocks,), (threads,), (rows, cupy.int32(n), *args), shared_mem=smem)


def _global_tables(xp, products, rows, limit_slots):
    """Table sizes (power of 2 >= 2·products) and offsets for ``rows``, split into batches of
    at most ``limit_slots`` slots."""
    need = products[rows]
    size = (2 ** xp.ceil(xp.log2(xp.maximum(2 * need, 2)))).astype(np.int64)
    sizes = size.get()
    batches, start, total = [], 0, 0
    for i, s in enumerate(sizes.tolist()):
        if total and total + s > limit_slots:
            batches.append((start, i))
            start, total = i, 0
        total += s
    batches.append((start, len(sizes)))
    return size, batches


class _GpuProduct:
    """One A·B on the GPU: inputs on the device, rows binned, the symbolic pass done on
    construction; ``numeric(lo, hi)`` fills rows lo..hi (so an output larger than the GPU is
    made in row batches)."""

    def __init__(self, a: Csr, b: Csr, table_budget: int = 1 << 28):
        import cupy

        val_dtype = np.result_type(a.data.dtype, b.data.dtype)
        if val_dtype not in (np.float32, np.float64):
            val_dtype = np.dtype(np.float64)
        if b.shape[1] >= 2**31 - 1:
            raise ValueError("the GPU SpGEMM kernel handles up to 2^31 - 2 columns; split B by columns")
        self.val_dtype = np.dtype(val_dtype)
        self.val_t = "double" if val_dtype == np.float64 else "float"
        self.vsize = self.val_dtype.itemsize
        self.shape = (a.shape[0], b.shape[1])
        self.table_budget = table_budget
        as_dev = lambda x, t: cupy.asarray(x, dtype=t)  # noqa: E731
        self.aptr = as_dev(a.indptr, np.int64)
        self.aptr = self.aptr - self.aptr[0]
        self.aidx, self.aval = as_dev(a.indices, np.int32), as_dev(a.data, val_dtype)
        self.bptr = as_dev(b.indptr, np.int64)
        self.bptr = self.bptr - self.bptr[0]
        self.bidx, self.bval = as_dev(b.indices, np.int32), as_dev(b.data, val_dtype)
        self.products = products_per_row(cupy, Csr(self.aptr, self.aidx, self.aval, a.shape),
                                          Csr(self.bptr, self.bidx, self.bval, b.shape))
        lower = 0
        self.bins = []
        for upper, group, table in SHARED_BINS:
            rows = cupy.nonzero((self.products > lower) & (self.products <= upper))[0]
            self.bins.append((rows.astype(np.int32), group, table))
            lower = upper
        self.big = cupy.nonzero(self.products > lower)[0].astype(np.int32)
        self.row_nnz = self._symbolic()
        self.cptr = cupy.concatenate([cupy.zeros(1, np.int64), cupy.cumsum(self.row_nnz)])

    @property
    def flops(self) -> int:
        return 2 * int(self.products.sum())

    def _big_batches(self, rows):
        import cupy

        size, batches = _global_tables(cupy, self.products, rows, self.table_budget // (4 + self.vsize))
        for lo, hi in batches:
            sizes = size[lo:hi]
            offset = cupy.concatenate([cupy.zeros(1, np.int64), cupy.cumsum(sizes)[:-1]])
            yield rows[lo:hi], sizes, offset

    def _symbolic(self):
        import cupy

        row_nnz = cupy.zeros(self.shape[0], dtype=np.int64)
        for rows, group, table in self.bins:
            _launch_shared("symbolic_shared", self.val_t, self.vsize, rows, group, table,
                           (self.aptr, self.aidx, self.bptr, self.bidx, row_nnz))
        if self.big.size:
            sym = _kernel("symbolic_global", self.val_t)
            for rows, sizes, offset in self._big_batches(self.big):
                table = cupy.empty(int(sizes.sum()), dtype=np.int32)
                sym((int(rows.size),), (GLOBAL_THREADS,),
                    (rows, cupy.int32(rows.size), self.aptr, self.aidx, self.bptr, self.bidx,
                     offset, sizes.astype(np.int32), table, row_nnz))
                del table
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
        pick = lambda rows: rows[(rows >= lo) & (rows < hi)]  # noqa: E731
        args = (self.aptr, self.aidx, self.aval, self.bptr, self.bidx, self.bval, cptr, cidx, cval)
        for rows, group, table in self.bins:
            _launch_shared("numeric_shared", self.val_t, self.vsize, pick(rows), group, table, args)
        big = pick(self.big)
        if big.size:
            num = _kernel("numeric_global", self.val_t)
            for rows, sizes, offset in self._big_batches(big):
                slots = int(sizes.sum())
                table = cupy.empty(slots, dtype=np.int32)
                table_vals = cupy.empty(slots, dtype=self.val_dtype)
                num((int(rows.size),), (GLOBAL_THREADS,),
                    (rows, cupy.int32(rows.size), self.aptr, self.aidx, self.aval, self.bptr,
                     self.bidx, self.bval, offset, sizes.astype(np.int32), table, table_vals,
                     cptr, cidx, cval))
                del table, table_vals
            _sort_rows(cupy, big, cptr, cidx, cval, self.shape[1])
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


def _sort_rows(cupy, rows, cptr, cidx, cval, ncols):
    """Sort the entries of ``rows`` by column (they were written unsorted)."""
    starts, stops = cptr[rows.astype(np.int64)], cptr[rows.astype(np.int64) + 1]
    lengths = stops - starts
    total = int(lengths.sum())
    if not total:
        return
    # positions of every entry of these rows, and which row (0..len(rows)) each belongs to
    owner = cupy.repeat(cupy.arange(rows.size, dtype=np.int64), lengths)
    first = cupy.concatenate([cupy.zeros(1, np.int64), cupy.cumsum(lengths)[:-1]])
    pos = starts[owner] + (cupy.arange(total, dtype=np.int64) - first[owner])
    keys = owner * np.int64(ncols + 1) + cidx[pos].astype(np.int64)
    order = cupy.argsort(keys)
    cidx[pos] = cidx[pos][order]
    cval[pos] = cval[pos][order]
