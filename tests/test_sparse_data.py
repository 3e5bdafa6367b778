"""Sparse generators: Graph500 R-MAT and look-alikes of FEM, web and road matrices."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import leftovers
from mx.cli.main import cli
from mx.errors import UserError
from mx.storage import generate, sparse


def seed_of(rng):
    return int(rng.integers(1 << 30))


def assert_canonical_csr(m):
    """Row pointers nondecreasing; column indices in range, sorted and unique within each row."""
    ptr, idx = m.indptr, m.indices
    assert ptr[0] == 0 and ptr[-1] == m.nnz and (np.diff(ptr) >= 0).all()
    assert m.nnz == 0 or (idx.min() >= 0 and idx.max() < m.shape[1])
    step = np.diff(idx.astype(np.int64))
    row_start = np.zeros(m.nnz, dtype=bool)
    row_start[ptr[:-1][ptr[:-1] < m.nnz]] = True
    assert (step[~row_start[1:]] > 0).all()


def degrees(m):
    return np.diff(m.indptr)


def is_symmetric(m):
    d = (m - m.T).tocsr()
    d.eliminate_zeros()
    return d.nnz == 0


@pytest.mark.parametrize("scale", [6, 7, 8, 9, 10])
def test_rmat_shape_nnz_and_layout(tmp_path, rng, scale):
    ef, n = 16, 1 << scale
    path = str(tmp_path / "R.zarr")
    info = generate.rmat(path, scale, edge_factor=ef, seed=seed_of(rng))
    m = sparse.read_csr(path)
    assert m.shape == (n, n) == info.shape and m.nnz == info.nnz
    # duplicates are merged: at scale 6 about half of the edges survive (0.50 ± 0.01), more
    # at larger scales; never more than the edge count
    assert 0.45 * ef * n < m.nnz <= ef * n
    assert_canonical_csr(m)
    assert m.dtype == np.float64 and m.data.min() >= 0.5
    deg = degrees(m)
    assert deg.max() > 3 * deg.mean()  # skewed: row 0 gets (a + b)**scale of the edges
    if scale == 10:
        assert deg.max() > 15 * deg.mean()
    assert leftovers(tmp_path) == []


def test_rmat_reproducible_per_seed_and_float32(tmp_path):
    for name, seed in (("A", 3), ("B", 3), ("C", 4)):
        generate.rmat(str(tmp_path / name), 9, edge_factor=8, seed=seed, dtype="float32")
    a, b, c = (sparse.read_csr(str(tmp_path / x)) for x in "ABC")
    assert a.dtype == np.float32
    for x, y in ((a.indptr, b.indptr), (a.indices, b.indices), (a.data, b.data)):
        np.testing.assert_array_equal(x, y)
    assert a.nnz != c.nnz or not np.array_equal(a.indices, c.indices)
    assert a.data.min() >= 0.5  # single edges lie in [0.5, 1.5), merged ones are sums


@pytest.mark.parametrize("abc", [(0.57, 0.19, 0.19), (0.45, 0.15, 0.25), (0.25, 0.25, 0.25)])
def test_rmat_quadrant_probabilities(tmp_path, rng, abc):
    a, b, c = abc
    path = str(tmp_path / "R.zarr")
    generate.rmat(path, 10, edge_factor=16, seed=seed_of(rng), a=a, b=b, c=c)
    m = sparse.read_csr(path)
    h = m.shape[0] // 2
    # every edge carries a value of mean 1, merged or not: value mass counts edges
    total = m.sum()
    got = [m[:h, :h].sum() / total, m[:h, h:].sum() / total, m[h:, :h].sum() / total]
    np.testing.assert_allclose(got, [a, b, c], atol=0.025)
    deg = degrees(m)
    if a == b == c == 0.25:  # uniform: Erdős–Rényi, no hubs
        assert deg.max() < 3 * deg.mean()


def test_rmat_rejects_bad_arguments(tmp_path):
    path = str(tmp_path / "R.zarr")
    for kwargs, words in (({"scale": 0}, "--scale 0"), ({"scale": 32}, "--scale 32"),
                          ({"scale": 5, "edge_factor": 0}, "--edge-factor 0"),
                          ({"scale": 5, "a": 0.6, "b": 0.3, "c": 0.2}, "a + b + c"),
                          ({"scale": 5, "dtype": "int32"}, "--dtype int32")):
        with pytest.raises(UserError, match=words.replace("+", r"\+")):
            generate.rmat(path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_lowrank_rejects_non_finite_noise_and_condition(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "L.zarr")
    for args, words in ((["--noise", "nan"], "--noise nan"), (["--noise", "-0.5"], "--noise -0.5"),
                        (["--noise", "inf"], "--noise inf"),
                        (["--condition", "nan"], "--condition nan"),
                        (["--condition", "inf"], "--condition inf"),
                        (["--condition", "0.5"], "--condition 0.5")):
        result = runner.invoke(cli, ["data", "lowrank", out, "--shape", "9,7", "--rank", "2",
                                     "--fraction", "0.5", *args])
        assert result.exit_code == 2 and words in result.output, (args, result.output)
        assert result.output.startswith("mx: error: ") and result.output.count("\n") == 1
    assert os.listdir(tmp_path) == []  # nothing written


def test_lowrank_sampling_of_a_large_matrix_gives_distinct_entries_at_the_asked_rate(rng):
    """Past 2²⁶ entries the observed set is drawn with replacement and merged: every entry
    once, in row-major order, each kept with the asked probability."""
    m, n = int(rng.integers(9000, 11000)), int(rng.integers(9000, 11000))
    fraction = float(rng.uniform(0.005, 0.05))
    rows, cols = generate._sample_entries(np.random.default_rng(seed_of(rng)), m, n, fraction)
    keys = rows * n + cols
    assert (np.diff(keys) > 0).all() and rows.min() >= 0 and rows.max() < m and cols.max() < n
    # the count is binomial(m·n, fraction): within 6 standard deviations
    assert abs(keys.size - fraction * m * n) < 6 * np.sqrt(fraction * m * n)
    assert np.bincount(cols, minlength=n).min() > 0  # spread over every column


def test_rmat_cli(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "R.zarr")
    result = runner.invoke(cli, ["data", "rmat", out, "--scale", "8", "--edge-factor", "4",
                                 "--seed", "7", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    m = sparse.read_csr(out)
    assert m.shape == (256, 256) and m.dtype == np.float32
    assert f"sparse CSR 256×256 <f4, nnz {m.nnz}" in result.output
    info = runner.invoke(cli, ["data", "info", out])
    assert info.exit_code == 0 and f"sparse CSR 256×256 <f4 nnz {m.nnz}" in info.output

    before = sorted(os.listdir(tmp_path))
    stamp = os.stat(os.path.join(out, "zarr.json")).st_mtime_ns
    for args, words in ((["--scale", "0"], "--scale 0"), (["--scale", "40"], "--scale 40"),
                        (["--scale", "5", "--edge-factor", "0"], "--edge-factor 0")):
        result = runner.invoke(cli, ["data", "rmat", str(tmp_path / "new.zarr"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
    result = runner.invoke(cli, ["data", "rmat", out, "--scale", "5"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporaries
    assert os.stat(os.path.join(out, "zarr.json")).st_mtime_ns == stamp
    assert sparse.read_csr(out).shape == (256, 256)

    result = runner.invoke(cli, ["data", "rmat", out, "--scale", "5", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sparse.read_csr(out).shape == (32, 32) and leftovers(tmp_path) == []


@pytest.mark.parametrize("bandwidth,density", [(0, 1.0), (3, 1.0), (12, 0.3)])
def test_banded(tmp_path, rng, bandwidth, density):
    n, path = 300, str(tmp_path / "B.zarr")
    generate.banded(path, n, bandwidth, density=density, seed=seed_of(rng))
    m = sparse.read_csr(path)
    assert m.shape == (n, n)
    assert_canonical_csr(m)
    assert is_symmetric(m)
    coo = m.tocoo()
    assert np.abs(coo.row - coo.col).max() <= bandwidth
    assert (m.diagonal() > 0).all()  # the diagonal is always kept
    band = bandwidth * n - bandwidth * (bandwidth + 1) // 2  # pairs above the diagonal
    if density == 1:
        assert m.nnz == n + 2 * band
    else:
        assert abs((m.nnz - n) / 2 - density * band) < 5 * np.sqrt(band * density * (1 - density))
    assert np.linalg.eigvalsh(m.toarray()).min() > 0  # FEM-like: positive definite


def test_web(tmp_path, rng):
    n, path = 20000, str(tmp_path / "W.zarr")
    generate.web(path, n, avg_degree=8, seed=seed_of(rng))
    m = sparse.read_csr(path)
    assert m.shape == (n, n)
    assert_canonical_csr(m)
    out_deg, in_deg = degrees(m), np.bincount(m.indices, minlength=n)
    assert 7 < out_deg.mean() <= 8.5  # avg_degree, less a few merged duplicate links
    assert out_deg.max() > 50 * out_deg.mean()  # power-law out-degrees
    assert in_deg.max() > 200 * in_deg.mean()  # heavier-tailed in-degrees

    def top_share(deg):  # fraction of the links held by the top 1% of pages
        return np.sort(deg)[-n // 100:].sum() / m.nnz

    assert top_share(in_deg) > top_share(out_deg) + 0.03
    assert not is_symmetric(m)
    coo = m.tocoo()
    near = np.abs(coo.row - coo.col) <= 200
    assert 0.4 < near.mean() < 0.65  # about half the links are local


def test_road(tmp_path, rng):
    side, path = 60, str(tmp_path / "Road.zarr")
    generate.road(path, side, seed=seed_of(rng))
    m = sparse.read_csr(path)
    n = side * side
    assert m.shape == (n, n)
    assert_canonical_csr(m)
    assert is_symmetric(m)
    assert (m.diagonal() == 0).all()
    deg = degrees(m)
    assert 2.5 <= deg.mean() <= 3.1 and deg.max() <= 10
    coo = m.tocoo()
    span = np.abs(coo.row - coo.col)
    assert np.isin(span, [1, side]).mean() > 0.9  # mostly grid neighbours
    assert span.max() <= 8 * side + 8  # shortcuts stay local


@pytest.mark.parametrize("kind,n,shape", [("banded", 500, 500), ("web", 3000, 3000),
                                          ("road", 1000, 1024)])
def test_sparse_cli(tmp_path, kind, n, shape):
    runner = CliRunner()
    out = str(tmp_path / "S.zarr")
    result = runner.invoke(cli, ["data", "sparse", out, "--kind", kind, "--n", str(n),
                                 "--seed", "2", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    m = sparse.read_csr(out)
    assert m.shape == (shape, shape) and m.dtype == np.float32
    assert f"sparse CSR {shape}×{shape} <f4, nnz {m.nnz}" in result.output
    result = runner.invoke(cli, ["data", "sparse", out, "--kind", kind, "--n", str(n)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(cli, ["data", "sparse", str(tmp_path / "T.zarr"), "--kind", kind,
                                 "--n", "0"])
    assert result.exit_code == 2 and "--n 0" in result.output
    assert sorted(os.listdir(tmp_path)) == ["S.zarr"]


def _raw_csr(path, shape, ptr, idx, val, **meta):
    """A binsparse group written with plain zarr, as another tool would (no checks)."""
    import zarr

    g = zarr.open_group(str(path), mode="w")
    g.create_array("pointers_to_1", data=np.asarray(ptr, dtype="int64"))
    g.create_array("indices_1", data=np.asarray(idx, dtype="int32"))
    g.create_array("values", data=np.asarray(val))
    g.attrs["binsparse"] = {"version": "0.1", "format": "CSR", "shape": shape, **meta}


def test_malformed_sparse_inputs_are_refused_by_name(tmp_path, rng):
    import mx
    from mx.errors import JobFailed

    n = int(rng.integers(3, 9))
    eye = tmp_path / "eye.zarr"
    _raw_csr(eye, [n, n], np.arange(n + 1), np.arange(n), np.ones(n))
    cases = {  # name: (shape, pointers, indices, values, what the message says)
        "noshape": (None, [0, 1, 2], [0, 1], [1.0, 2.0], "binsparse 'shape' is None"),
        "textshape": ("2x2", [0, 1, 2], [0, 1], [1.0, 2.0], "binsparse 'shape' is '2x2'"),
        "rows": ([n + 3, n], [0, 1, 2], [0, 1], [1.0, 2.0], "pointers_to_1 has 3 entries"),
        "short": ([2, n], [0, 1, 2], [0, 1], [1.0], "values has 1 entries but indices_1 has 2"),
        "ends": ([2, n], [0, 1, 3], [0, 1], [1.0, 2.0], "pointers_to_1 runs from 0 to 3"),
        "complex": ([2, n], [0, 1, 2], [0, 1], np.array([1 + 1j, 2j]), "not a real number type"),
    }
    for name, (shape, ptr, idx, val, says) in cases.items():
        _raw_csr(tmp_path / f"{name}.zarr", shape, ptr, idx, val)
        job = {"backend": "local", "resources": {"workers": 2},
               "steps": [{"id": "c", "op": "spgemm", "inputs": {"a": f"{name}.zarr", "b": "eye.zarr"},
                          "output": f"C-{name}.zarr"}]}
        with pytest.raises(UserError, match=says):
            mx.submit(job, base=str(tmp_path))
        result = CliRunner().invoke(cli, ["data", "info", str(tmp_path / f"{name}.zarr")])
        assert result.exit_code == 2 and says.split("'")[0] in result.output, result.output
    # only the entries show a column past the end: the job stops with the index named
    bad_col = int(rng.integers(n, 3 * n))
    _raw_csr(tmp_path / "oob.zarr", [2, n], [0, 1, 2], [0, bad_col], [1.0, 2.0])
    job = {"backend": "local", "resources": {"workers": 2},
           "steps": [{"id": "c", "op": "spgemm", "inputs": {"a": "oob.zarr", "b": "eye.zarr"},
                      "output": "C-oob.zarr"}]}
    with pytest.raises(JobFailed, match=f"column index {bad_col} is outside the matrix's {n}"):
        mx.submit(job, base=str(tmp_path))
    assert not any(p.startswith("C-") for p in os.listdir(tmp_path)) and not leftovers(tmp_path)


def test_lowrank_larger_than_memory_is_refused_before_work(tmp_path):
    side = 10 ** 8
    result = CliRunner().invoke(cli, ["data", "lowrank", str(tmp_path / "L.zarr"), "--shape",
                                      f"{side},{side}", "--rank", "1", "--fraction", "1"])
    assert result.exit_code == 2, result.output
    assert "of memory but this machine has" in result.output and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []
