"""Sparse matrices as Zarr v3 groups in the binsparse v0.1 CSR layout.

A group holds the attribute ``binsparse`` = {"version": "0.1", "format": "CSR", "shape": [m, n],
"number_of_stored_values": nnz, "data_types": {...}} and 1-D arrays ``pointers_to_1`` (m + 1
row offsets), ``indices_1`` (0-based column indices, sorted within each row, no duplicates)
and ``values``. mx reads any group in that layout and writes its outputs in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import zarr

from mx.errors import UserError
from mx.storage import chunkio, dense

# 1-D chunks of this many elements keep row-range reads cheap without tiny files.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class SparseInfo:
    path: str
    shape: tuple[int, int]
    dtype: str
    nnz: int

    @property
    def kind(self) -> str:
        return "sparse"


def inspect(path: str, what: str = "matrix") -> SparseInfo:
    """Open ``path`` read-only and check it is a binsparse CSR group."""
    if not os.path.exists(path):
        raise UserError(f"{what}: {path} does not exist; create it with `mx data import` or "
                        f"fix the path")
    try:
        group = zarr.open_group(store=path, mode="r")
    except Exception:
        raise UserError(f"{what}: {path} is not a Zarr group; a sparse matrix is a binsparse "
                        f"CSR group") from None
    meta = group.attrs.get("binsparse")
    if not isinstance(meta, dict):
        raise UserError(f"{what}: {path} has no 'binsparse' attribute; it is not a binsparse "
                        f"sparse matrix")
    if meta.get("format") != "CSR":
        raise UserError(f"{what}: {path} is binsparse format {meta.get('format')!r}; mx reads "
                        f"CSR (convert it, e.g. with scipy's tocsr())")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise UserError(f"{what}: {path}: binsparse 'shape' is {shape!r}; it must be [rows, "
                        f"columns], two non-negative integers")
    m, n = shape
    arrays = {}
    for name in ("pointers_to_1", "indices_1", "values"):
        node = group.get(name)
        if node is None:
            raise UserError(f"{what}: {path} lacks the array '{name}' that binsparse CSR needs")
        if not isinstance(node, zarr.Array) or node.ndim != 1:
            raise UserError(f"{what}: {path}/{name} must be a 1-D array")
        arrays[name] = node
    ptr, indices, values = arrays["pointers_to_1"], arrays["indices_1"], arrays["values"]
    if ptr.shape[0] != m + 1:
        raise UserError(f"{what}: {path}: pointers_to_1 has {ptr.shape[0]} entries but a matrix "
                        f"of {m} rows needs {m + 1}; the shape or the pointers are wrong")
    if not np.issubdtype(np.dtype(indices.dtype), np.integer):
        raise UserError(f"{what}: {path}/indices_1 has dtype {indices.dtype}; column indices "
                        f"must be integers")
    nnz = int(indices.shape[0])
    if values.shape[0] != nnz:
        raise UserError(f"{what}: {path}: values has {values.shape[0]} entries but indices_1 "
                        f"has {nnz}; each stored entry needs both")
    ends = (int(ptr[0]), int(ptr[m]))
    if ends != (0, nnz):
        raise UserError(f"{what}: {path}: pointers_to_1 runs from {ends[0]} to {ends[1]}; it "
                        f"must run from 0 to the {nnz} stored entries")
    dtype = dense.check_dtype(values.dtype, path, what)
    return SparseInfo(path=path, shape=(m, n), dtype=dtype.str, nnz=nnz)


# The kernels trust the entries they are given: a column index past the end would be dropped
# silently or read out of bounds. Both checks run on what a worker reads, as it reads it.
def check_pointers(path: str, pointers: np.ndarray) -> None:
    """Row offsets must never go back."""
    back = np.flatnonzero(np.diff(pointers) < 0)
    if back.size:
        raise UserError(f"{path}: pointers_to_1 decreases at row {int(back[0])}; row offsets "
                        f"must never go back")


def check_indices(path: str, indices: np.ndarray, n: int) -> None:
    """Column indices must lie in [0, n)."""
    if indices.size == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= n:
        raise UserError(f"{path}: column index {low if low < 0 else high} is outside the "
                        f"matrix's {n} columns; indices_1 must hold 0-based column indices "
                        f"below {n}")


def write_csr(path: str, matrix, attributes: dict | None = None) -> None:
    """Write a SciPy sparse matrix (any format) as a binsparse CSR group at ``path``."""
    csr = sp.csr_array(matrix)
    csr.sum_duplicates()
    csr.sort_indices()
    m, n = csr.shape
    index_dtype = np.int32 if n < 2**31 else np.int64
    group = zarr.open_group(store=path, mode="w-", zarr_format=3)
    arrays = {"pointers_to_1": csr.indptr.astype(np.int64),
              "indices_1": csr.indices.astype(index_dtype),
              "values": csr.data}
    for name, data in arrays.items():
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                 chunks=(max(1, min(CHUNK_ELEMENTS, data.shape[0])),),
                                 fill_value=0)
        if data.size:
            arr[:] = data
    group.attrs["binsparse"] = {
        "version": "0.1", "format": "CSR", "shape": [m, n],
        "number_of_stored_values": int(csr.nnz),
        "data_types": {k: np.dtype(v.dtype).name for k, v in arrays.items()},
    }
    for key, value in (attributes or {}).items():
        group.attrs[key] = value


def read_csr(path: str, rows: tuple[int, int] | None = None) -> sp.csr_array:
    """Read the whole matrix, or the row range ``rows``, as a SciPy CSR array."""
    group = zarr.open_group(store=path, mode="r")
    m, n = (int(x) for x in group.attrs["binsparse"]["shape"])
    r0, r1 = rows if rows is not None else (0, m)
    ptr = _read_range(group["pointers_to_1"], r0, r1 + 1, np.int64)
    lo, hi = int(ptr[0]), int(ptr[-1])
    indices = _read_range(group["indices_1"], lo, hi)
    check_pointers(path, ptr)
    check_indices(path, indices, n)
    values = _read_range(group["values"], lo, hi)
    return sp.csr_array((values, indices, ptr - lo), shape=(r1 - r0, n))


def _read_range(array, lo: int, hi: int, dtype=None) -> np.ndarray:
    """``array[lo:hi]`` of a 1-D Zarr array, its chunks decoded in parallel."""
    return chunkio.read(array, ((lo, hi),), np.empty(hi - lo, dtype or array.dtype))


# ------------------------------------------------------------- writing by several workers
# An output is created in two steps: the group (shape, types) before the job runs, the arrays
# once the total number of stored values is known. Workers then write disjoint, chunk-aligned
# pieces: row offsets by whole pointer chunks (row partitions are multiples of the pointer
# chunk), indices and values by whole value chunks (see ``pieces``).

def create_group(path: str, shape: tuple[int, int], dtype, attributes: dict | None = None) -> None:
    group = zarr.open_group(store=path, mode="w-", zarr_format=3)
    index_dtype = np.int32 if shape[1] < 2**31 else np.int64
    group.attrs["binsparse"] = {
        "version": "0.1", "format": "CSR", "shape": list(shape), "number_of_stored_values": 0,
        "data_types": {"pointers_to_1": "int64", "indices_1": np.dtype(index_dtype).name,
                       "values": np.dtype(dtype).name},
    }
    for key, value in (attributes or {}).items():
        group.attrs[key] = value


def create_arrays(path: str, nnz: int, pointer_chunk: int, value_chunk: int) -> None:
    group = zarr.open_group(store=path, mode="r+")
    meta = dict(group.attrs["binsparse"])
    m = int(meta["shape"][0])
    types = meta["data_types"]
    group.create_array("pointers_to_1", shape=(m + 1,), dtype=types["pointers_to_1"],
                       chunks=(max(1, pointer_chunk),), fill_value=0)
    for name in ("indices_1", "values"):
        group.create_array(name, shape=(nnz,), dtype=types[name],
                           chunks=(max(1, value_chunk),), fill_value=0)
    meta["number_of_stored_values"] = int(nnz)
    group.attrs["binsparse"] = meta


def write_pointers(path: str, start: int, offsets: np.ndarray) -> None:
    """Row offsets ``offsets`` for rows ``start..`` (whole pointer chunks)."""
    if len(offsets):
        zarr.open_array(store=f"{path}/pointers_to_1", mode="r+")[start:start + len(offsets)] = offsets


def write_entries(path: str, offset: int, indices: np.ndarray, values: np.ndarray) -> None:
    """Column indices and values of stored entries ``offset..`` (whole value chunks)."""
    if len(indices):
        stop = offset + len(indices)
        zarr.open_array(store=f"{path}/indices_1", mode="r+")[offset:stop] = indices
        zarr.open_array(store=f"{path}/values", mode="r+")[offset:stop] = values


def pieces(start: int, stop: int, chunk: int, total: int) -> list[tuple[int, int, bool]]:
    """Split the entry range [start, stop) of an array of ``total`` entries at chunk
    boundaries: (lo, hi, whole), where whole says the piece is its entire chunk."""
    out = []
    lo = start
    while lo < stop:
        end = min((lo // chunk + 1) * chunk, total)
        hi = min(stop, end)
        out.append((lo, hi, lo % chunk == 0 and hi == end))
        lo = hi
    return out


def read_pointers(path: str) -> np.ndarray:
    pointers = zarr.open_group(store=path, mode="r")["pointers_to_1"]
    return _read_range(pointers, 0, pointers.shape[0], np.int64)


def column_counts(path: str, batch: int = 1 << 24) -> np.ndarray:
    """Stored entries per column, from the column indices read ``batch`` at a time."""
    group = zarr.open_group(store=path, mode="r")
    n = int(group.attrs["binsparse"]["shape"][1])
    indices = group["indices_1"]
    counts = np.zeros(n, dtype=np.int64)
    for lo in range(0, indices.shape[0], batch):
        hi = min(lo + batch, indices.shape[0])
        part = _read_range(indices, lo, hi, np.int64)
        check_indices(path, part, n)
        counts += np.bincount(part, minlength=n)
    return counts


def fingerprint(path: str) -> str:
    """Names, sizes and modification times of every file of a store, hashed: it changes when
    the matrix is rewritten in place (a checkpoint of older data must not be resumed)."""
    import hashlib

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            st = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def read_rows(path: str, rows: np.ndarray, max_gap: int = 64) -> sp.csr_array:
    """The given rows (sorted, unique) as a compact CSR: row t of the result is rows[t].
    Nearby rows are read as one range (gaps up to ``max_gap`` rows)."""
    group = zarr.open_group(store=path, mode="r")
    m, n = (int(x) for x in group.attrs["binsparse"]["shape"])
    ptr = read_pointers(path)
    check_pointers(path, ptr)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return sp.csr_array((np.zeros(0, group["values"].dtype), np.zeros(0, np.int32),
                             np.zeros(1, np.int64)), shape=(0, n))
    breaks = np.nonzero(np.diff(rows) > max_gap)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    idx_parts, val_parts = [], []
    indices, values = group["indices_1"], group["values"]
    for s, e in zip(starts, stops):
        lo, hi = int(ptr[rows[s]]), int(ptr[rows[e - 1] + 1])
        block_idx = _read_range(indices, lo, hi)
        check_indices(path, block_idx, n)
        block_val = _read_range(values, lo, hi)
        local = ptr[rows[s:e]] - lo
        length = ptr[rows[s:e] + 1] - ptr[rows[s:e]]
        take = np.repeat(local - np.concatenate([[0], np.cumsum(length)[:-1]]), length) + \
            np.arange(int(length.sum()))
        idx_parts.append(block_idx[take])
        val_parts.append(block_val[take])
    lengths = ptr[rows + 1] - ptr[rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return sp.csr_array((np.concatenate(val_parts), np.concatenate(idx_parts), indptr),
                        shape=(rows.size, n))
