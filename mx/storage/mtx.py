"""Matrix Market import: dense ``array`` files to a Zarr array, ``coordinate`` files to a
binsparse CSR group (or, on request, to a dense array)."""

from __future__ import annotations

import os

import numpy as np
import scipy.io
import scipy.sparse as sp

from mx.errors import UserError
from mx.storage import commit as _commit
from mx.storage import dense, sparse


def import_mtx(source: str, output: str, as_dense: bool = False, dtype: str | None = None,
               chunks: tuple[int, int] | None = None, overwrite: bool = False) -> str:
    """Import ``source`` (.mtx, optionally .gz/.bz2) into ``output``; returns the kind written."""
    if not os.path.isfile(source):
        raise UserError(f"{source} does not exist or is not a file; give a Matrix Market file")
    _commit.check_new_output(output, overwrite)
    try:
        rows, cols, _, fmt, field, _ = scipy.io.mminfo(source)
    except Exception as exc:
        raise UserError(f"{source} is not a Matrix Market file ({exc})") from None
    if field == "complex":
        raise UserError(f"{source} holds complex values; mx handles real matrices only")
    try:
        if fmt == "array" and rows == 0:
            # SciPy's reader divides by the row count here: SIGFPE, the process dies silently
            data = np.zeros((0, cols))
        else:
            data = scipy.io.mmread(source)
    except Exception as exc:
        raise UserError(f"{source}: cannot be read as Matrix Market ({exc})") from None
    target = np.dtype(dtype) if dtype else np.dtype(np.float64)
    if target not in (np.float32, np.float64):
        raise UserError(f"--dtype {dtype}: use float32 or float64")

    with _commit.publishing(output, overwrite) as tmp:
        if sp.issparse(data) and not as_dense:
            kind = "sparse"
            sparse.write_csr(tmp, sp.csr_array(data).astype(target),
                             attributes={"mx": _commit.stamp({"imported": os.path.basename(source)})})
        else:
            kind = "dense"
            values = data.toarray() if sp.issparse(data) else np.asarray(data)
            values = np.ascontiguousarray(values, dtype=target)
            if values.ndim != 2:
                raise UserError(f"{source}: expected a matrix, got {values.ndim} dimensions")
            side = dense.chunk_side(target.itemsize)
            ch = chunks or (min(values.shape[0], side), min(values.shape[1], side))
            dense.create(tmp, values.shape, ch, target,
                         attributes={"mx": _commit.stamp({"imported": os.path.basename(source)})})
            dense.write_block(tmp, (0, values.shape[0]), (0, values.shape[1]), values)
    return kind
