"""Generators of input matrices: random dense, and sparse (R-MAT and look-alikes of real ones).

Dense chunks are generated and written in parallel threads (NumPy's generators and Zarr's
codecs release the GIL). Each chunk draws from its own stream, spawned from the seed and the
chunk's index, so a matrix is reproducible for a given seed and chunking.

Sparse generators are vectorised over edges and reproducible for a given seed and arguments.
They write binsparse CSR groups (``mx.storage.sparse``); duplicate entries are summed:

- ``rmat``: Graph500 R-MAT (Kronecker) graphs, skewed degrees, generated in bounded batches.
- ``banded``: an FEM-like symmetric positive definite band matrix.
- ``web``: a directed web-graph look-alike (power-law degrees, links to nearby ids).
- ``road``: a symmetric road-network look-alike (a thinned grid with local shortcuts).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import zarr

from mx.errors import UserError
from mx.storage import commit as _commit
from mx.storage import dense
from mx.storage import sparse as _sparse
from mx.units import human_bytes

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
    _commit.check_new_output(path, overwrite)
    _check_space(path, m * n * np.dtype(dtype).itemsize, f"--shape {m},{n}")
    with _commit.publishing(path, overwrite) as tmp:
        arr = zarr.create_array(store=tmp, shape=(m, n), chunks=chunks, dtype=dtype,
                                fill_value=0, zarr_format=3, compressors=dense.COMPRESSORS)
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



def _check_space(path: str, nbytes: int, what: str) -> None:
    """Refuse a matrix larger than the free space of the disk it goes to: random values do
    not compress, and a shape off by a few digits would otherwise write until the disk is full."""
    folder = _commit.nearest_existing(path)
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise UserError(f"{what}: the matrix takes {human_bytes(nbytes)} (random values do not "
                        f"compress) but {folder} has {human_bytes(free)} free; choose a smaller shape "
                        f"or another disk")


LOWRANK_ENTRY_BYTES = 64  # an observed entry's share of lowrank's temporaries (keys, sort, CSR)


def _check_memory(nbytes: int, what: str) -> None:
    """Refuse a matrix whose making needs more than this machine's memory: it would fail
    with a MemoryError (or be killed) after long work."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total:
        raise UserError(f"{what}: making it needs about {human_bytes(nbytes)} of memory but this "
                        f"machine has {human_bytes(total)}; choose a smaller shape, rank or fraction")


# ---------------------------------------------------------------------------------------------
# Sparse generators

RMAT_BATCH = 1 << 22  # edges generated at once: bounds R-MAT's temporaries at any scale


def _check_output(path: str, dtype: str, overwrite: bool) -> None:
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise UserError(f"--dtype {dtype}: use float32 or float64")
    _commit.check_new_output(path, overwrite)


def _check_n(n: int, name: str = "--n") -> None:
    if not 1 <= n < 2**31:
        raise UserError(f"{name} {n}: the matrix order must be between 1 and 2**31 - 1")


def _values(rng: np.random.Generator, k: int, dtype: str) -> np.ndarray:
    """``k`` values uniform in [0.5, 1.5) (clipped so float32 rounding cannot reach 1.5)."""
    v = rng.random(k, dtype=dtype) + np.asarray(0.5, dtype=dtype)
    return np.minimum(v, np.nextafter(np.asarray(1.5, dtype=dtype), 0))


def _write_sparse(path: str, matrix, record: dict, overwrite: bool) -> _sparse.SparseInfo:
    """Write ``matrix`` as binsparse CSR at ``path`` atomically; return what was written."""
    csr = sp.csr_array(matrix)
    csr.sum_duplicates()
    with _commit.publishing(path, overwrite) as tmp:
        _sparse.write_csr(tmp, csr, attributes={"mx": _commit.stamp(record)})
    return _sparse.SparseInfo(path=path, shape=csr.shape, dtype=csr.dtype.str, nnz=int(csr.nnz))


def _symmetric(n: int, rows, cols, vals) -> sp.csr_array:
    """The n×n symmetric matrix with the entries (i, j) given and their mirrors (j, i).

    Pairs are merged in the upper triangle before mirroring, so the values are exactly
    symmetric even where a pair was given more than once, in either orientation.
    """
    upper = sp.csr_array(sp.coo_array((vals, (np.minimum(rows, cols), np.maximum(rows, cols))),
                                      shape=(n, n)))
    upper.sum_duplicates()
    return sp.csr_array(upper + sp.triu(upper, k=1).T)


def rmat(path: str, scale: int, edge_factor: int = 16, seed: int = 0, dtype: str = "float64",
         overwrite: bool = False, a: float = 0.57, b: float = 0.19,
         c: float = 0.19) -> _sparse.SparseInfo:
    """Write a Graph500 R-MAT matrix: 2**scale vertices, edge_factor * 2**scale edges.

    Each edge picks its (row, column) by ``scale`` recursive choices of a quadrant: top-left
    with probability a, top-right b, bottom-left c, bottom-right 1 - a - b - c. Values are
    uniform in [0.5, 1.5); duplicate edges are merged by summing, so nnz <= the edge count.
    Vertex ids are not permuted: row 0 is the heaviest.
    """
    if not 1 <= scale <= 31:
        raise UserError(f"--scale {scale}: must be between 1 and 31 (2**scale vertices)")
    if edge_factor < 1:
        raise UserError(f"--edge-factor {edge_factor}: must be at least 1 (edges per vertex)")
    if min(a, b, c) < 0 or a + b + c > 1:
        raise UserError(f"R-MAT probabilities a={a}, b={b}, c={c}: each must be >= 0 and "
                        f"a + b + c <= 1 (d = 1 - a - b - c)")
    _check_output(path, dtype, overwrite)
    n, edges = 1 << scale, edge_factor << scale
    rng = np.random.default_rng(seed)
    itype = np.int32 if scale < 31 else np.int64
    total = None
    for start in range(0, edges, RMAT_BATCH):
        k = min(RMAT_BATCH, edges - start)
        rows, cols = np.zeros(k, itype), np.zeros(k, itype)
        for level in range(scale):
            u = rng.random(k, dtype=np.float32)
            down = u >= a + b                        # bottom half: quadrants c, d
            right = (u >= a) & ~down | (u >= a + b + c)  # right half: quadrants b, d
            bit = itype(1 << (scale - 1 - level))
            rows |= down * bit
            cols |= right * bit
        batch = sp.csr_array(sp.coo_array((_values(rng, k, dtype), (rows, cols)), shape=(n, n)))
        batch.sum_duplicates()
        total = batch if total is None else total + batch
    return _write_sparse(path, total, {"generator": "rmat", "scale": scale,
                                       "edge_factor": edge_factor, "seed": seed,
                                       "a": a, "b": b, "c": c}, overwrite)


def banded(path: str, n: int, bandwidth: int, density: float = 1.0, seed: int = 0,
           dtype: str = "float64", overwrite: bool = False) -> _sparse.SparseInfo:
    """Write an FEM-like symmetric band matrix: entries (i, j) with |i - j| <= bandwidth.

    Each off-diagonal pair is kept with probability ``density``; the diagonal always is.
    Off-diagonal values are -U[0.5, 1.5) and each diagonal entry is the row's sum of their
    magnitudes plus U[0.5, 1.5): the matrix is symmetric, diagonally dominant and positive
    definite, like a stiffness matrix.
    """
    _check_n(n)
    if not 0 <= bandwidth < n:
        raise UserError(f"--bandwidth {bandwidth}: must be between 0 and n - 1 = {n - 1}")
    if not 0 < density <= 1:
        raise UserError(f"--density {density}: must be in (0, 1]")
    _check_output(path, dtype, overwrite)
    rng = np.random.default_rng(seed)
    # the upper band by diagonals: offset d holds n - d pairs (i, i + d)
    offsets = np.arange(1, bandwidth + 1, dtype=np.int64)
    lengths = n - offsets
    starts = np.concatenate([[0], np.cumsum(lengths)])
    d = np.repeat(offsets, lengths)
    i = np.arange(starts[-1], dtype=np.int64) - np.repeat(starts[:-1], lengths)
    if density < 1:
        keep = rng.random(i.size) < density
        i, d = i[keep], d[keep]
    vals = -_values(rng, i.size, dtype)
    diag = (np.bincount(i, -vals, minlength=n) + np.bincount(i + d, -vals, minlength=n)
            + _values(rng, n, dtype)).astype(dtype)
    ids = np.arange(n, dtype=np.int64)
    m = _symmetric(n, np.concatenate([i, ids]), np.concatenate([i + d, ids]),
                   np.concatenate([vals, diag]))
    return _write_sparse(path, m, {"generator": "banded", "n": n, "bandwidth": bandwidth,
                                   "density": density, "seed": seed}, overwrite)


def web(path: str, n: int, avg_degree: float = 8, seed: int = 0, dtype: str = "float64",
        overwrite: bool = False, locality: float = 0.5) -> _sparse.SparseInfo:
    """Write a directed web-graph look-alike (row i holds page i's out-links).

    Out-degrees are Poisson around Zipf-like weights (rank**-0.6, a power law of exponent
    about 2.7) placed on random ids, scaled to mean ``avg_degree`` and capped at n. A fraction
    ``locality`` of links goes to a nearby id (a geometric distance, mean 16 + the page's
    out-degree, either side: pages of one site); the rest to a target drawn by popularity,
    Zipf-like weights rank**-0.9 on other random ids (in-degree exponent about 2.1), so
    in-degrees are heavier-tailed than out-degrees, as in web-Google or wb-edu. Duplicate
    links merge.
    """
    _check_n(n)
    if not 0 < avg_degree <= n:
        raise UserError(f"--avg-degree {avg_degree}: must be > 0 and at most n = {n}")
    if not 0 <= locality <= 1:
        raise UserError(f"locality {locality}: must be in [0, 1]")
    _check_output(path, dtype, overwrite)
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w_out = rng.permutation(ranks ** -0.6)
    deg = np.minimum(rng.poisson(w_out * (avg_degree / w_out.mean())), n)
    src = np.repeat(np.arange(n, dtype=np.int64), deg)
    k = src.size
    popularity = np.cumsum(rng.permutation(ranks ** -0.9))
    dst = np.searchsorted(popularity, rng.random(k) * popularity[-1], side="right")
    local = rng.random(k) < locality
    step = rng.geometric(1 / (16 + deg[src]), k) * rng.choice(np.array([-1, 1]), k)
    dst = np.where(local, (src + step) % n, np.minimum(dst, n - 1))
    m = sp.coo_array((_values(rng, k, dtype), (src, dst)), shape=(n, n))
    return _write_sparse(path, m, {"generator": "web", "n": n, "avg_degree": avg_degree,
                                   "locality": locality, "seed": seed}, overwrite)


def road(path: str, side: int, seed: int = 0, dtype: str = "float64",
         overwrite: bool = False) -> _sparse.SparseInfo:
    """Write a symmetric road-network look-alike on side² vertices (ids in row-major order).

    Each vertex of a side×side grid links to its right and lower neighbours; each such link is
    kept with probability 0.7, and 2% of vertices get a shortcut to a vertex up to 8 cells
    away. The average degree is about 2.8 and the maximum small, like roadNet-CA; values
    (lengths) are U[0.5, 1.5) and symmetric.
    """
    if side < 1:
        raise UserError(f"road side {side}: must be at least 1 (side² vertices)")
    _check_n(side * side, "--n")
    _check_output(path, dtype, overwrite)
    rng = np.random.default_rng(seed)
    n = side * side
    v = np.arange(n, dtype=np.int64)
    r, c = np.divmod(v, side)
    rows = np.concatenate([v[c < side - 1], v[r < side - 1]])
    cols = np.concatenate([v[c < side - 1] + 1, v[r < side - 1] + side])
    keep = rng.random(rows.size) < 0.7
    rows, cols = rows[keep], cols[keep]
    hubs = rng.choice(n, size=n // 50, replace=False)
    hr = np.clip(r[hubs] + rng.integers(-8, 9, hubs.size), 0, side - 1)
    hc = np.clip(c[hubs] + rng.integers(-8, 9, hubs.size), 0, side - 1)
    far = hr * side + hc
    rows, cols = np.concatenate([rows, hubs]), np.concatenate([cols, far])
    ok = rows != cols
    rows, cols = rows[ok], cols[ok]
    m = _symmetric(n, rows, cols, _values(rng, rows.size, dtype))
    return _write_sparse(path, m, {"generator": "road", "side": side, "seed": seed}, overwrite)


def lowrank(path: str, shape: tuple[int, int], rank: int, fraction: float, noise: float = 0.0,
            condition: float = 1.0, seed: int = 0, dtype: str = "float64",
            overwrite: bool = False) -> _sparse.SparseInfo:
    """Observed entries of a planted rank-``rank`` matrix M = U Vᵀ, as binsparse CSR.

    U and V are random orthonormal bases (incoherent with high probability) scaled by singular
    values spaced geometrically from 1 down to 1/``condition``, times sqrt(m·n/rank) so entries
    are of order one. Each entry is observed with probability ``fraction`` (``noise``: the
    standard deviation of Gaussian noise added to observed values). The ground-truth factors
    are kept in the group as ``truth_u`` (m×rank) and ``truth_v`` (n×rank).
    """
    m, n = shape
    _check_output(path, dtype, overwrite)
    if m < 1 or n < 1:
        raise UserError(f"--shape {m},{n}: both dimensions must be at least 1")
    if not 1 <= rank <= min(m, n):
        raise UserError(f"--rank {rank}: must be between 1 and min(m, n) = {min(m, n)}")
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: give the observed fraction, in (0, 1]")
    # written as ranges so that NaN fails them too (it compares false with everything)
    if not 0 <= noise < np.inf:
        raise UserError(f"--noise {noise}: give a finite standard deviation >= 0")
    if not 1 <= condition < np.inf:
        raise UserError(f"--condition {condition}: give a finite ratio >= 1 of the largest to "
                        f"the smallest singular value")
    _check_memory(int(fraction * m * n * LOWRANK_ENTRY_BYTES + 16 * (m + n) * rank),
                  f"--shape {m},{n} --rank {rank} --fraction {fraction:g}")
    rng = np.random.default_rng(seed)
    scale = np.geomspace(1.0, 1.0 / condition, rank) * np.sqrt(m * n / rank)
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0] * np.sqrt(scale)
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0] * np.sqrt(scale)
    rows, cols = _sample_entries(rng, m, n, fraction)
    vals = np.empty(rows.size, dtype=np.float64)
    for lo in range(0, rows.size, 1 << 22):
        hi = min(rows.size, lo + (1 << 22))
        vals[lo:hi] = np.einsum("ij,ij->i", u[rows[lo:hi]], v[cols[lo:hi]])
    if noise:
        vals += noise * rng.standard_normal(vals.size)
    matrix = sp.csr_array((vals.astype(dtype), (rows, cols)), shape=(m, n))
    with _commit.publishing(path, overwrite) as tmp:
        record = {"generator": "lowrank", "rank": rank, "fraction": fraction, "noise": noise,
                  "condition": condition, "seed": seed}
        _sparse.write_csr(tmp, matrix, attributes={"mx": _commit.stamp(record)})
        group = zarr.open_group(store=tmp, mode="r+")
        for name, factor in (("truth_u", u), ("truth_v", v)):
            arr = group.create_array(name, shape=factor.shape, dtype=dtype,
                                     chunks=(min(factor.shape[0], 1 << 16), rank))
            arr[...] = factor.astype(dtype)
    return _sparse.SparseInfo(path=path, shape=(m, n), dtype=np.dtype(dtype).str, nnz=int(matrix.nnz))


def _sample_entries(rng, m: int, n: int, fraction: float):
    """Row and column indices of the observed entries, each entry kept with probability
    ``fraction`` (exactly for small matrices; by sampling with replacement and merging
    duplicates when m·n is large)."""
    if m * n <= 1 << 26:
        rows, cols = np.nonzero(rng.random((m, n)) < fraction)
        return rows.astype(np.int64), cols.astype(np.int64)
    count = int(-np.log1p(-fraction) * m * n) if fraction < 1 else m * n
    keys = rng.integers(0, m * n, size=count, dtype=np.int64)
    # sorted, then deduplicated by neighbours: np.unique's hash table was 7× slower here
    # (27 against 4 s for 3e7 keys), from cache misses
    keys.sort()
    keep = np.empty(keys.size, dtype=bool)
    keep[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    keys = keys[keep]
    return keys // n, keys % n
