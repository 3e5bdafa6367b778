"""Dense blocks read from and written to real Zarr stores, chunk by chunk on the I/O threads."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from mx.storage import dense


def _store(path, rng, shape, chunks, dtype):
    values = rng.standard_normal(shape).astype(dtype)
    zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, zarr_format=3)[...] = values
    return values


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_blocks_read_across_chunk_edges_match_slicing(tmp_path, dtype):
    rng = np.random.default_rng()
    shape = tuple(int(s) for s in rng.integers(150, 260, size=2))
    chunks = tuple(int(c) for c in rng.integers(17, 61, size=2))
    values = _store(tmp_path / "A.zarr", rng, shape, chunks, "float64")
    for _ in range(6):
        r0, c0 = (int(rng.integers(0, s - 1)) for s in shape)
        r1, c1 = int(rng.integers(r0 + 1, shape[0] + 1)), int(rng.integers(c0 + 1, shape[1] + 1))
        got = dense.read_block(str(tmp_path / "A.zarr"), (r0, r1), (c0, c1), dtype)
        want = values[r0:r1, c0:c1].astype(dtype or values.dtype)
        assert got.dtype == want.dtype and got.flags.c_contiguous
        assert np.array_equal(got, want)


def test_blocks_read_on_many_threads_at_once_stay_apart(tmp_path):
    rng = np.random.default_rng()
    values = _store(tmp_path / "A.zarr", rng, (301, 233), (40, 29), "float32")
    regions = [((i, i + 97), (j, j + 61)) for i in range(0, 200, 37) for j in range(0, 170, 43)]
    with ThreadPoolExecutor(8) as threads:
        got = list(threads.map(lambda r: dense.read_block(str(tmp_path / "A.zarr"), *r), regions))
    for (rows, cols), block in zip(regions, got):
        assert np.array_equal(block, values[slice(*rows), slice(*cols)])


def test_a_written_block_lands_in_its_chunks_and_nowhere_else(tmp_path):
    rng = np.random.default_rng()
    path = str(tmp_path / "C.zarr")
    dense.create(path, (190, 130), (38, 26), "float64")
    rows, cols = (38, 152), (26, 130)
    block = rng.standard_normal((114, 104))
    # a strided view: the writer must not assume C order
    dense.write_block(path, rows, cols, np.asfortranarray(block))
    stored = zarr.open_array(store=path, mode="r")[...]
    assert np.array_equal(stored[38:152, 26:130], block)
    stored[38:152, 26:130] = 0
    assert not stored.any()
    with pytest.raises(ValueError, match="block of shape"):
        dense.write_block(path, rows, cols, block[:, :-1])
