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
    for name in ("pointers_to_1", "indices_1", "values"):
        if name not in group:
            raise UserError(f"{what}: {path} lacks the array '{name}' that binsparse CSR needs")
    m, n = (int(x) for x in meta["shape"])
    return SparseInfo(path=path, shape=(m, n), dtype=np.dtype(group["values"].dtype).str,
                      nnz=int(group["indices_1"].shape[0]))


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
    ptr = np.asarray(group["pointers_to_1"][r0:r1 + 1]).astype(np.int64)
    lo, hi = int(ptr[0]), int(ptr[-1])
    indices = np.asarray(group["indices_1"][lo:hi])
    values = np.asarray(group["values"][lo:hi])
    return sp.csr_array((values, indices, ptr - lo), shape=(r1 - r0, n))
