"""Dense matrices as 2-D Zarr arrays: inspect, read a block, create an output, write a block.

Any 2-D Zarr array of a real numeric dtype is a dense matrix, whoever wrote it and however it
is chunked: blocks are read by slicing, so mx's blocks need not match the store's chunks.
Outputs are created by mx with chunks that tile mx's blocks exactly, so that every writer owns
whole chunks (zarr-python loses data when two writers share a chunk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from mx.errors import UserError
from mx.storage import chunkio

# Output chunks are kept near this size: a chunk is the unit of I/O and of compression, and
# tens of MiB keeps both efficient without huge single reads.
TARGET_CHUNK_BYTES = 32 * 2**20
# How mx compresses the dense arrays it writes: LZ4 on byte-shuffled values. On float32 GEMM
# products it writes 2.6× faster than Zarr's default (zstd) and compresses better (1.33 against
# 1.23; the shuffle groups the exponent bytes), and it reads a little faster. Any Zarr reader
# decodes it.
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)


@dataclass(frozen=True)
class DenseInfo:
    """What a job needs to know about a dense matrix before it runs (plain data)."""

    path: str
    shape: tuple[int, int]
    dtype: str
    chunks: tuple[int, int]

    @property
    def kind(self) -> str:
        return "dense"


def inspect(path: str, what: str = "matrix") -> DenseInfo:
    """Open ``path`` read-only and check it is a 2-D real numeric Zarr array.

    ``what`` names the input in errors (e.g. ``steps[0] (id: c).inputs.a``).
    """
    if not os.path.exists(path):
        raise UserError(f"{what}: {path} does not exist; create it with `mx data random` or "
                        f"`mx data import`, or fix the path")
    try:
        arr = zarr.open_array(store=path, mode="r")
    except Exception as exc:  # zarr raises several types for "not an array"
        if _is_group(path):
            raise UserError(f"{what}: {path} is a Zarr group (a sparse matrix?), not a dense "
                            f"2-D array; this op needs a dense matrix") from None
        raise UserError(f"{what}: {path} is not a readable Zarr array ({exc}); point it at a "
                        f"2-D Zarr array") from None
    if arr.ndim != 2:
        raise UserError(f"{what}: {path} is {arr.ndim}-D with shape {tuple(arr.shape)}; a matrix "
                        f"must be a 2-D array")
    dtype = check_dtype(arr.dtype, path, what)
    return DenseInfo(path=path, shape=(int(arr.shape[0]), int(arr.shape[1])), dtype=dtype.str,
                     chunks=(int(arr.chunks[0]), int(arr.chunks[1])))


def check_dtype(dtype, path: str, what: str) -> np.dtype:
    """A matrix's values must be real numbers mx computes with (float32/64, integers, bools)."""
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
            or dtype == np.bool_):
        raise UserError(f"{what}: {path} has dtype {dtype}, which is not a real number type; "
                        f"store the matrix as float32 or float64")
    if dtype.itemsize > 8 or dtype == np.float16:
        raise UserError(f"{what}: {path} has dtype {dtype}; mx computes in float32 or float64: "
                        f"convert the array to one of those")
    return dtype


def compute_dtype(*dtypes: str) -> np.dtype:
    """The floating dtype a product of these inputs is computed and stored in."""
    dt = np.result_type(*[np.dtype(d) for d in dtypes])
    if not np.issubdtype(dt, np.floating):
        return np.dtype(np.float64)  # integer or boolean inputs are promoted, as NumPy does
    return dt


def _is_group(path: str) -> bool:
    try:
        zarr.open_group(store=path, mode="r")
        return True
    except Exception:
        return False


# Arrays this small stay pageable: their copies are latency-bound anyway, and a small array
# may share a page with another that is locked already.
LOCK_MIN_BYTES = 1 << 20


def empty_host(shape, dtype, pinned: bool = False) -> np.ndarray:
    """A host array, page-locked when it is bound for (or comes from) a GPU: locked memory
    moves at full PCIe/NVLink-C2C speed and lets copies run asynchronously."""
    out = np.empty(shape, np.dtype(dtype))
    if not pinned or out.nbytes < LOCK_MIN_BYTES:
        return out
    _touch(out)
    return page_lock(out)


def pooled_pinned(shape, dtype) -> np.ndarray:
    """A host array in CuPy's pinned memory pool, for buffers one process makes again and
    again (MPI staging): the pool keeps freed ones, so only the first of a size is costly."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if not count:
        return np.empty(shape, dtype)
    import cupy

    mem = cupy.cuda.alloc_pinned_memory(count * dtype.itemsize)
    return np.frombuffer(mem, dtype, count).reshape(shape)


class _Locked:
    """Owns a NumPy buffer locked in place with cudaHostRegister and unlocks it when the last
    array viewing it goes. Locking memory that is already touched costs ~0.04 s/GiB, against
    ~0.6 s/GiB for a fresh cudaHostAlloc: a worker starts without a warm pinned pool every step,
    so allocating pinned would cost more than the copies it speeds up."""

    def __init__(self, array: np.ndarray):
        import cupy

        cupy.cuda.runtime.hostRegister(array.ctypes.data, array.nbytes, 0)
        self.array = array
        self.__array_interface__ = array.__array_interface__
        # held here: at interpreter exit an import in __del__ fails
        self._unregister = cupy.cuda.runtime.hostUnregister

    def __del__(self):
        try:
            self._unregister(self.array.ctypes.data)
        except Exception:  # at interpreter exit CUDA may be gone: nothing left to unlock
            pass


def page_lock(array: np.ndarray) -> np.ndarray:
    """``array`` (C-contiguous, touched) page-locked in place; unchanged where CUDA refuses,
    since a pageable array still copies correctly, only slower."""
    if array.nbytes < LOCK_MIN_BYTES:
        return array
    import cupy

    try:
        return np.asarray(_Locked(array))
    except cupy.cuda.runtime.CUDARuntimeError:
        return array


def upload(xp, array, dtype=None):
    """A host array as an ``xp`` array (cast to ``dtype``), copied to a GPU from page-locked
    memory. CuPy stages a pageable array through its pinned pool, which a fresh worker fills at
    0.75 s/GiB (0.13 s/GiB once warm); locking the array in place and copying takes 0.06 s/GiB
    (H100)."""
    if xp is np or not isinstance(array, np.ndarray):
        return xp.asarray(array, dtype=dtype)
    host = page_lock(np.ascontiguousarray(array, dtype=dtype))
    device = xp.asarray(host)
    if host is not array:
        # the copy from locked memory may still run; the lock (and maybe the host copy) goes
        # with ``host``
        xp.cuda.get_current_stream().synchronize()
    return device


def _touch(array: np.ndarray) -> None:
    """Fault in a fresh array's pages on the I/O threads (the kernel zeroes each page as it is
    first touched, ~0.3 s/GiB on one thread)."""
    flat = array.reshape(-1)
    step = max(1, -(-flat.size // chunkio.IO_THREADS))
    list(chunkio.pool().map(lambda lo: flat[lo:lo + step].fill(0), range(0, flat.size, step)))


def read_block(path: str, rows: tuple[int, int], cols: tuple[int, int],
               dtype: str | None = None, pinned: bool = False) -> np.ndarray:
    """Read ``A[r0:r1, c0:c1]`` into a C-contiguous array (optionally cast, optionally
    page-locked), each chunk decoded on an I/O thread straight into its place in the result."""
    arr = zarr.open_array(store=path, mode="r")
    out = empty_host((rows[1] - rows[0], cols[1] - cols[0]), dtype or arr.dtype, pinned)
    return chunkio.read(arr, (rows, cols), out)


def create(path: str, shape: tuple[int, int], chunks: tuple[int, int], dtype,
           attributes: dict | None = None) -> None:
    """Create an empty dense array at ``path`` (which must not exist)."""
    zarr.create_array(store=path, shape=shape, chunks=tuple(max(1, c) for c in chunks),
                      dtype=np.dtype(dtype), fill_value=0, zarr_format=3,
                      compressors=COMPRESSORS, attributes=attributes or {})


def write_block(path: str, rows: tuple[int, int], cols: tuple[int, int], block) -> dict:
    """Write ``block`` into ``C[r0:r1, c0:c1]``; the region must cover whole chunks. Chunks are
    encoded and written in parallel, a chunk per thread."""
    block = np.asarray(block)
    expect = (rows[1] - rows[0], cols[1] - cols[0])
    if block.shape != expect:
        raise ValueError(f"block of shape {block.shape} written to a {expect} region")
    if block.size:
        chunkio.write(zarr.open_array(store=path, mode="r+"), (rows, cols), block)
    return {"rows": list(rows), "cols": list(cols), "bytes": int(block.nbytes)}


def chunk_side(itemsize: int) -> int:
    """The side of a square chunk of about TARGET_CHUNK_BYTES."""
    return max(1, int((TARGET_CHUNK_BYTES // itemsize) ** 0.5))
