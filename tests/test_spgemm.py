"""SpGEMM against SciPy: the NumPy/SciPy kernel, and the op through the whole stack on real
Ray actors and in one process, on matrices with empty rows, power-law rows, explicit zeros,
1×N and N×1 shapes, float32 and float64."""

import numpy as np
import pytest
import scipy.sparse as sp

import mx
from mx.kernels import spgemm
from mx.storage import sparse


def powerlaw(rng, m, n, avg, dtype=np.float64, explicit_zeros=0.0, empty_rows=0.1):
    """Rows with power-law lengths (a few very dense), some empty, some explicit zeros."""
    lengths = np.minimum(n, (rng.pareto(1.2, m) * avg / 3).astype(np.int64))
    lengths[rng.random(m) < empty_rows] = 0
    rows = np.repeat(np.arange(m), lengths)
    cols = np.concatenate([rng.choice(n, size=l, replace=False) for l in lengths]) if lengths.sum() \
        else np.zeros(0, np.int64)
    vals = rng.standard_normal(rows.size).astype(dtype)
    vals[rng.random(rows.size) < explicit_zeros] = 0.0
    return sp.csr_array((vals, (rows, cols.astype(np.int64))), shape=(m, n))


def structural(a, b):
    ones = lambda x: sp.csr_array((np.ones(x.nnz), x.indices, x.indptr), shape=x.shape)  # noqa: E731
    return (ones(a) @ ones(b)) != 0


def check(got: sp.csr_array, a, b, tol):
    want = (a.astype(np.float64) @ b.astype(np.float64)).toarray()
    dense = got.toarray()
    scale = np.linalg.norm(want) or 1.0
    assert np.linalg.norm(dense - want) / scale < tol
    pattern = structural(a, b)
    assert got.nnz == pattern.nnz  # exactly the structural product: zeros that cancel are kept
    assert ((got != 0).astype(bool) > pattern).nnz == 0
    for r in range(got.shape[0]):
        cols = got.indices[got.indptr[r]:got.indptr[r + 1]]
        assert (np.diff(cols) > 0).all()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_cpu_kernel_matches_scipy(rng, dtype, tol):
    a = powerlaw(rng, 301, 257, 12, dtype, explicit_zeros=0.05)
    b = powerlaw(rng, 257, 199, 9, dtype, explicit_zeros=0.05)
    c = spgemm.multiply(np, spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b))
    assert c.data.dtype == dtype and c.indptr.dtype == np.int64
    check(c.to_scipy(), a, b, tol)


@pytest.mark.parametrize("width", [1, 7, 64, 198])
def test_b_wider_than_a_product_takes_is_made_a_block_of_columns_at_a_time(rng, width):
    a = powerlaw(rng, 211, 173, 10, explicit_zeros=0.05)
    b = powerlaw(rng, 173, 199, 9, explicit_zeros=0.05)
    ca, cb = spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b)
    whole = spgemm.multiply(np, ca, cb)
    for got in (spgemm.multiply(np, ca, cb, max_columns=width),
                spgemm.multiply_to_host(np, ca, cb, max_columns=width)):
        np.testing.assert_array_equal(got.indptr, whole.indptr)
        np.testing.assert_array_equal(got.indices, whole.indices)
        np.testing.assert_array_equal(got.data, whole.data)
        check(got.to_scipy(), a, b, 1e-12)
    blocks = spgemm.column_blocks(199, width)
    assert blocks[0][0] == 0 and blocks[-1][1] == 199 and max(c1 - c0 for c0, c1 in blocks) <= width
    assert all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1))


def test_cancellation_keeps_the_structural_entry():
    a = sp.csr_array(np.array([[1.0, 1.0]]))
    b = sp.csr_array(np.array([[1.0], [-1.0]]))
    c = spgemm.multiply(np, spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b))
    assert c.nnz == 1 and c.data[0] == 0.0


def write(path, matrix):
    sparse.write_csr(str(path), matrix)
    return str(path)


def job(backend, workers, params=None, a="A.zarr", b="B.zarr"):
    return {"backend": backend, "resources": {"workers": workers},
            "steps": [{"id": "c", "op": "spgemm", "inputs": {"a": a, "b": b}, "output": "C.zarr",
                       "params": params or {}}]}


@pytest.mark.parametrize("backend,workers,params", [
    ("local", 1, {}), ("local", 3, {"permute": True, "seed": 5}),
    ("local", 4, {"replicate_b": False}), ("local", 5, {}),
])
def test_op_matches_scipy_locally(tmp_path, rng, backend, workers, params):
    a = powerlaw(rng, 613, 411, 10, explicit_zeros=0.02)
    b = powerlaw(rng, 411, 389, 8, explicit_zeros=0.02)
    write(tmp_path / "A.zarr", a)
    write(tmp_path / "B.zarr", b)
    job_id = mx.submit(job(backend, workers, params), base=str(tmp_path))
    check(sparse.read_csr(str(tmp_path / "C.zarr")), a, b, 1e-12)
    info = sparse.inspect(str(tmp_path / "C.zarr"))
    assert info.nnz == structural(a, b).nnz
    assert "row chunks" in mx.logs(job_id)


@pytest.mark.parametrize("shape", [((1, 300), (300, 250)), ((300, 1), (1, 250)), ((1, 1), (1, 1)),
                                   ((250, 300), (300, 1))])
def test_degenerate_shapes(tmp_path, rng, shape):
    (m, k), (_, n) = shape
    a = sp.random(m, k, density=0.3, format="csr", random_state=int(rng.integers(1 << 30)))
    b = sp.random(k, n, density=0.3, format="csr", random_state=int(rng.integers(1 << 30)))
    write(tmp_path / "A.zarr", a)
    write(tmp_path / "B.zarr", b)
    mx.submit(job("local", 3), base=str(tmp_path))
    check(sparse.read_csr(str(tmp_path / "C.zarr")), a, b, 1e-12)


def test_ray_actors_with_tiny_value_chunks(tmp_path, rng, ray_session, monkeypatch):
    """Many Zarr chunks shared between workers: the pieces must meet at their owners."""
    from mx.tasks import spgemm as op

    monkeypatch.setattr(op, "VALUE_CHUNK", 97)
    a = powerlaw(rng, 900, 700, 9, np.float32)
    b = powerlaw(rng, 700, 650, 7, np.float32)
    write(tmp_path / "A.zarr", a)
    write(tmp_path / "B.zarr", b)
    mx.submit(job("ray", 4, {"permute": True}), base=str(tmp_path))
    got = sparse.read_csr(str(tmp_path / "C.zarr"))
    assert got.dtype == np.float32
    check(got, a, b, 1e-5)


def test_the_plan_states_b_and_the_memory_budget_in_units_that_fit(tmp_path, rng):
    a = powerlaw(rng, 97, 89, 5)
    b = sp.random_array((89, 83), density=0.2, format="csr", rng=rng)  # 1477 entries, 18 KiB
    write(tmp_path / "A.zarr", a)
    write(tmp_path / "B.zarr", b)
    job_id = mx.submit(job("local", 2, {"memory": "40MiB"}), base=str(tmp_path))
    check(sparse.read_csr(str(tmp_path / "C.zarr")), a, b, 1e-12)
    b_bytes = b.nnz * 12 + 90 * 8  # values, int32 indices, int64 row offsets
    log = mx.logs(job_id)
    assert f"B is replicated on every worker: B takes {b_bytes / 2**10:.2f} KiB, worker memory " \
           f"40.00 MiB (params.memory)" in log, log


def test_shape_mismatch_and_dense_input(tmp_path, rng):
    from mx.errors import UserError
    from conftest import write_dense

    write(tmp_path / "A.zarr", sp.random(5, 6, density=0.5, format="csr"))
    write(tmp_path / "B.zarr", sp.random(7, 4, density=0.5, format="csr"))
    with pytest.raises(UserError, match="A is 5×6 but B is 7×4"):
        mx.submit(job("local", 2), base=str(tmp_path))
    write(tmp_path / "B6.zarr", sp.random(6, 4, density=0.5, format="csr"))
    for seed in (-1, 2**64):  # a seed NumPy refuses is a params error, not a traceback
        with pytest.raises(UserError, match=r"steps\[0\] \(id: c\)\.params\.seed"):
            mx.submit(job("local", 2, {"permute": True, "seed": seed}, b="B6.zarr"),
                      base=str(tmp_path))
    write_dense(tmp_path / "D.zarr", rng.random((6, 4)))
    with pytest.raises(UserError, match=r"steps\[0\] \(id: \w+\)\.inputs\.b.*not a Zarr group|binsparse"):
        mx.submit(job("local", 2, b="D.zarr"), base=str(tmp_path))


def test_a_chained_product_plans_without_the_earlier_outputs_size(tmp_path, rng):
    a = powerlaw(rng, 211, 211, 6)
    write(tmp_path / "A.zarr", a)
    two = job("local", 3, {"memory": "64MiB"}, b="A.zarr")
    two["steps"].append({"id": "d", "op": "spgemm", "inputs": {"a": "step:c", "b": "step:c"},
                         "output": "D.zarr", "params": {"memory": "64MiB"}})
    job_id = mx.submit(two, base=str(tmp_path))
    log = mx.logs(job_id)
    assert "-1 nnz" not in log and "nnz known once the earlier step has run" in log
    assert "B is an earlier step's output, its size unknown until that step runs" in log
    c = (a @ a).tocsr()
    check(sparse.read_csr(str(tmp_path / "D.zarr")), c, c, 1e-10)
