"""Generators of input matrices: random dense.

Chunks are generated and written in parallel threads (NumPy's generators and Zarr's codecs
release the GIL). Each chunk draws from its own stream, spawned from the seed and the chunk's
index, so a matrix is reproducible for a given seed and chunking.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from mx.errors import UserError
from mx.storage import commit as _commit

DISTRIBUTIONS = ("uniform", "normal")


def random_dense(path: str, shape: tuple[int, int], chunks: tuple[int, int], seed: int = 0,
                 dtype: str = "float64", distribution: str = "uniform",
                 overwrite: bool = False) -> None:
    """Write an m×n matrix of i.i.d. uniform [0, 1) or standard normal entries."""
    m, n = shape
    if m < 1 or n < 1:
        raise UserError(f"--shape {m},{n}: both dimensions must be at least 1")
    if chunks[0] < 1 or chunks[1] < 1:
        raise UserError(f"--chunks {chunks[0]},{chunks[1]}: chunk sides must be at least 1")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise UserError(f"--dtype {dtype}: use float32 or float64")
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"--distribution {distribution}: use one of {', '.join(DISTRIBUTIONS)}")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it or choose "
                        f"another path")
    job = f"gen{os.getpid()}"
    tmp = _commit.begin(path, job)
    try:
        arr = zarr.create_array(store=tmp, shape=(m, n), chunks=chunks, dtype=dtype,
                                fill_value=0, zarr_format=3)
        grid = [(i, j) for i in range(-(-m // chunks[0])) for j in range(-(-n // chunks[1]))]
        root = np.random.SeedSequence(seed)

        def fill(ij):
            i, j = ij
            rng = np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=(i, j)))
            r0, c0 = i * chunks[0], j * chunks[1]
            r1, c1 = min(r0 + chunks[0], m), min(c0 + chunks[1], n)
            if distribution == "uniform":
                block = rng.random((r1 - r0, c1 - c0), dtype=dtype)
            else:
                block = rng.standard_normal((r1 - r0, c1 - c0), dtype=dtype)
            arr[r0:r1, c0:c1] = block

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, grid))
        arr.attrs["mx"] = _commit.stamp({"generator": "random", "seed": seed,
                                         "distribution": distribution})
        _commit.commit(tmp, path, job, force=True)
    except BaseException:
        _commit.abort(tmp)
        raise

