"""GPU paths against the NumPy reference: CuPy kernels, cuBLAS precisions, NCCL shifts across
GPU actors, ABFT on the GPU. Skipped where no GPU is present (CI); run on a GPU machine."""

import contextlib
import os
import re

import numpy as np
import pytest

import mx
from conftest import (cg_progress, hold_checkpoint_writes, near_the_stop, random_rows,
                      read_dense, rel_error, write_dense)
from test_service import head  # noqa: F401  (the fixture: a `mx cluster up` head)
from mx.cluster import devices
from mx.kernels import abft, gemm, precision as prec

GPUS, WHY = devices.gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason=f"no GPU: {WHY}")]


def test_bf16_conversion_is_bit_exact_with_the_numpy_twin(rng):
    import cupy

    x = (rng.standard_normal(1_000_003) * 10.0 ** rng.integers(-30, 30, 1_000_003)).astype(np.float32)
    x[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    x[5:7] = [1 + 2**-8, 1 + 3 * 2**-8]
    got = cupy.asnumpy(prec.to_device(cupy, x, "bf16"))
    want = prec.round_bf16(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(prec.bf16_to_float32(got[nan])).all()
    # a block that does not start on a 16-byte boundary takes the one-value-at-a-time path
    shifted = cupy.asnumpy(prec.to_device(cupy, cupy.asarray(x)[1:], "bf16"))
    np.testing.assert_array_equal(shifted[~nan[1:]], want[1:][~nan[1:]])


@pytest.mark.parametrize("precision,tol_exact,tol_rounded", [
    ("fp64", 1e-12, None), ("fp32", 1e-5, None), ("tf32", 5e-3, None), ("bf16", 2e-2, 1e-5)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_cublas_products_match_numpy(rng, precision, tol_exact, tol_rounded, beta):
    import cupy

    m, k, n = 517, 1031, 263
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    c0 = rng.standard_normal((m, n))
    dtype = prec.output_dtype(precision)
    c = cupy.asarray(c0.astype(dtype))
    gemm.accumulate(cupy, c, prec.to_device(cupy, a, precision), prec.to_device(cupy, b, precision),
                    precision, beta=beta)
    got = cupy.asnumpy(c)
    assert rel_error(got, a @ b + beta * c0) < tol_exact
    if tol_rounded:
        ar = prec.bf16_to_float32(prec.round_bf16(a.astype(np.float32))).astype(np.float64)
        br = prec.bf16_to_float32(prec.round_bf16(b.astype(np.float32))).astype(np.float64)
        assert rel_error(got, ar @ br + beta * c0.astype(np.float32)) < tol_rounded


def gemm_job(gpus, precision=None, verify="none", algorithm="auto", backend="ray"):
    params = {"algorithm": algorithm, "verify": verify}
    if precision:
        params["precision"] = precision
    return {"backend": backend, "resources": {"gpus": gpus, "workers": gpus},
            "steps": [{"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                       "output": "C.zarr", "params": params}]}


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16"])
def test_one_gpu_actor(tmp_path, rng, ray_session, precision):
    m, k, n = 1001, 777, 1333
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    job_id = mx.submit(gemm_job(1, precision), base=str(tmp_path))
    tol = {"fp64": 1e-12, "fp32": 1e-5, "bf16": 2e-2}[precision]
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < tol
    assert "gpu0" in mx.logs(job_id)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("gpus", sorted({2, min(GPUS, 4), min(GPUS, 3)}))
def test_multi_gpu_over_nccl(tmp_path, rng, ray_session, gpus):
    m, k, n = 2049, 1537, 1025
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    job_id = mx.submit(gemm_job(gpus, "fp64"), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    log = mx.logs(job_id)
    assert "gang transport nccl" in log
    rec = mx.status(job_id)
    assert rec["steps"][0]["counters"].get("bytes-shifted", 0) > 0


@pytest.mark.skipif(GPUS < 4, reason="needs 4 GPUs")
def test_cannon_and_summa_on_four_gpus_bf16(tmp_path, rng, ray_session):
    m, k, n = 3001, 2999, 1999
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a.astype(np.float32))
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    for algorithm in ("cannon", "summa"):
        mx.submit(gemm_job(4, "bf16", algorithm=algorithm), base=str(tmp_path))
        assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 2e-2


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_abft_over_nccl_retries_a_step_whose_block_was_corrupted(tmp_path, rng, ray_session,
                                                                 monkeypatch):
    m, k, n = 1025, 6001, 777  # SUMMA panels: each C block is a sum of several products
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a.astype(np.float32))
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    monkeypatch.setenv(abft.FAULT_ENV, "abft:1:1")
    monkeypatch.setenv(abft.FAULT_ONCE_ENV, str(tmp_path / "fired"))
    job_id = mx.submit(gemm_job(2, "bf16", "abft", algorithm="summa"), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 2e-2
    assert (tmp_path / "fired").exists()
    log = mx.logs(job_id)
    assert "failed their ABFT checksums" in log and "retry 1 of" in log
    assert mx.status(job_id)["steps"][0]["counters"]["abft-checked"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_abft_on_the_gpu(tmp_path, rng, monkeypatch, precision):
    a, b = rng.standard_normal((700, 900)), rng.standard_normal((900, 650))
    write_dense(tmp_path / "A.zarr", a.astype(np.float32))
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    monkeypatch.setenv(abft.FAULT_ENV, "abft:0:0")
    job_id = mx.submit(gemm_job(1, precision, "abft", backend="local"), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < {"fp32": 1e-5, "bf16": 2e-2}[precision]
    assert mx.status(job_id)["steps"][0]["counters"]["abft-recomputed"] == 1


@pytest.mark.parametrize("cols", [520, 333])  # 16-byte rows, and rows that are not
def test_abft_checks_taken_while_rounding_to_bf16(rng, cols):
    import cupy

    m, k = 301, 457
    a = rng.standard_normal((m, k)) * 10.0 ** rng.integers(-2, 3, (m, 1))
    b = rng.standard_normal((k, cols)).astype(np.float32)
    c, counters = cupy.zeros((m, cols), np.float32), {}
    checks = abft.start(cupy, c, "bf16")
    da, db = abft.to_device(cupy, a, b, "bf16", checks, counters)
    # the blocks are bit for bit what the plain conversion makes (NaN included)
    a[3, 4] = np.nan
    bits, _, _ = abft._convert_checks_cupy(a, None, None, None)
    assert (cupy.asnumpy(bits) == cupy.asnumpy(prec.to_device(cupy, a, "bf16"))).all()
    assert (cupy.asnumpy(db) == cupy.asnumpy(prec.to_device(cupy, b, "bf16"))).all()
    # the share taken on the way is the one the separate passes take
    separate = abft.start(cupy, c, "bf16")
    abft.accumulate(cupy, cupy.zeros_like(c), da, db, "bf16", separate)
    assert rel_error(cupy.asnumpy(checks.expect), cupy.asnumpy(separate.expect)) < 1e-5
    assert counters == {"abft-products": 1} and checks.only is not None
    # a clean product passes; a corrupted one is caught and its row recomputed
    ha, hb = (prec.bf16_to_float32(cupy.asnumpy(x)).astype(np.float64) for x in (da, db))
    abft.accumulate(cupy, c, da, db, "bf16", None)
    assert abft.verify(cupy, c, checks, "bf16", counters, "t") == 0
    c[...] = 0
    abft.accumulate(cupy, c, da, db, "bf16", None, corrupt=True)
    assert abft.verify(cupy, c, checks, "bf16", counters, "t") == 1
    assert rel_error(cupy.asnumpy(c), ha @ hb) < 1e-5


def test_abft_out_of_core_bf16_on_the_gpu(tmp_path, rng, monkeypatch):
    m, k, n = 1501, 1300, 1377
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a.astype(np.float32))
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    job = gemm_job(1, "bf16", "abft", backend="local")
    job["steps"][0]["params"]["memory"] = "8MiB"
    monkeypatch.setenv(abft.FAULT_ENV, "abft:0:1")  # a later slab: the step is retried
    monkeypatch.setenv(abft.FAULT_ONCE_ENV, str(tmp_path / "fired"))
    job_id = mx.submit(job, base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 2e-2
    assert "algorithm stream (out of core)" in mx.logs(job_id)
    assert (tmp_path / "fired").exists()  # the fault really happened
    log = mx.logs(job_id)
    assert "failed their ABFT checksums" in log and "retry 1 of" in log
    counters = mx.status(job_id)["steps"][0]["counters"]
    assert counters["abft-checked"] >= 2 and counters["abft-products"] >= 4


@pytest.mark.parametrize("precision", ["bf16", "fp32", "tf32", "fp64"])
@pytest.mark.parametrize("cols", [520, 333])  # 16-byte rows, and rows that are not
def test_abft_kernels_match_the_numpy_twin(rng, precision, cols):
    import cupy

    m, k = 301, 457
    a = rng.standard_normal((m, k)) * 10.0 ** rng.integers(-2, 3, (m, 1))
    b = rng.standard_normal((k, cols))
    da, db = prec.to_device(cupy, a, precision), prec.to_device(cupy, b, precision)
    # the values the GPU blocks hold (bf16 widened), for the NumPy twin
    ha, hb = (cupy.asnumpy(prec.as_float(cupy, x, precision)) for x in (da, db))
    bv, b_abs = abft.row_checks(cupy, db, None, precision)
    hbv, hb_abs = abft.row_checks(np, hb, None, precision)
    tol = 1e-12 if precision == "fp64" else 1e-5
    assert rel_error(cupy.asnumpy(bv), hbv) < tol and abs(float(b_abs[0]) / hb_abs[0] - 1) < tol
    av, a_abs = abft.row_checks(cupy, da, bv, precision)
    hav, ha_abs = abft.row_checks(np, ha, hbv, precision)
    assert rel_error(cupy.asnumpy(av), hav) < tol and abs(float(a_abs[0]) / ha_abs[0] - 1) < tol
    expect, hexpect = cupy.zeros((m, 3), av.dtype), np.zeros((m, 3), hav.dtype)
    for _ in range(2):  # a product's share of the running checksums, added twice
        abft.add_checks(cupy, da, bv, b_abs, expect, precision)
        abft.add_checks(np, ha, hbv, hb_abs, hexpect, precision)
    assert rel_error(cupy.asnumpy(expect), hexpect) < tol
    # running checksums over three products: clean, a corrupted later product (not repairable
    # here), and a corrupted single product (its failing row recomputed)
    dtype = prec.output_dtype(precision)
    want = 3 * (ha.astype(np.float64) @ hb.astype(np.float64))
    loose = 1e-12 if precision == "fp64" else 5e-3 if precision == "tf32" else 1e-5
    for bad in (None, 2):
        c, counters = cupy.zeros((m, cols), dtype), {}
        checks = abft.start(cupy, c, precision)
        for t in range(3):
            abft.accumulate(cupy, c, da, db, precision, checks, counters, corrupt=t == bad)
        if bad is None:
            assert abft.verify(cupy, c, checks, precision, counters, "t") == 0
            assert rel_error(cupy.asnumpy(c), want) < loose
        else:
            with pytest.raises(abft.ChecksumError, match="1 of 301 rows"):
                abft.verify(cupy, c, checks, precision, counters, "t")
    c, counters = cupy.zeros((m, cols), dtype), {}
    checks = abft.start(cupy, c, precision)
    abft.accumulate(cupy, c, da, db, precision, checks, counters, corrupt=True)
    assert abft.verify(cupy, c, checks, precision, counters, "t") == 1
    assert rel_error(cupy.asnumpy(c), want / 3) < loose


def test_gemm_model_measures_this_gpu(tmp_path, monkeypatch):
    from mx.kernels import gemm_model

    monkeypatch.setenv("MX_HOME", str(tmp_path))
    table = gemm_model.load_or_measure("test-gpu", "fp32", allow_measure=True)
    assert len(table) == len(gemm_model.SIDES) * len(gemm_model.WIDTHS)
    assert all(rate > 0 for rate in table.values())
    # thin panels starve the GPU: the widest panel beats the thinnest at the largest side
    side = gemm_model.SIDES[-1]
    assert table[f"{side},{gemm_model.WIDTHS[-1]}"] > table[f"{side},{gemm_model.WIDTHS[0]}"]
    assert gemm_model.load_or_measure("test-gpu", "fp32", allow_measure=False) == table


def test_out_of_core_on_the_gpu(tmp_path, rng, ray_session):
    m, k, n = 3001, 2500, 2777
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a.astype(np.float32))
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    job = gemm_job(1, "fp32")
    job["steps"][0]["params"]["memory"] = "24MiB"
    job_id = mx.submit(job, base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-5
    assert "algorithm stream (out of core)" in mx.logs(job_id)


def test_blocks_read_for_and_copied_from_the_gpu_are_page_locked(tmp_path, rng):
    import cupy

    from mx.cluster.comm import GangContext
    from mx.storage import dense

    registered = lambda x: cupy.cuda.runtime.pointerGetAttributes(x.ctypes.data).type == 1  # noqa: E731
    a = rng.standard_normal((1531, 977)).astype(np.float32)
    write_dense(tmp_path / "A.zarr", a, chunks=(256, 300))
    got = dense.read_block(str(tmp_path / "A.zarr"), (100, 1400), (0, 977), pinned=True)
    assert registered(got) and np.array_equal(got, a[100:1400])
    view = got[5:]
    del got  # a view keeps the lock (and the memory) alive
    assert registered(view) and np.array_equal(cupy.asnumpy(cupy.asarray(view)), a[105:1400])
    assert not registered(dense.read_block(str(tmp_path / "A.zarr"), (0, 1531), (0, 977)))
    ctx = GangContext(None, cupy)
    host = ctx.to_host(cupy.asarray(a))
    assert registered(host) and np.array_equal(host, a)


# ---------------------------------------------------------------------------------- SpGEMM
def _powerlaw(rng, m, n, avg, dtype, heavy_rows=0):
    import scipy.sparse as sp

    lengths = np.minimum(n, (rng.pareto(1.1, m) * avg / 3).astype(np.int64))
    lengths[rng.random(m) < 0.1] = 0
    lengths[rng.choice(m, heavy_rows, replace=False)] = n  # rows long enough for global tables
    rows = np.repeat(np.arange(m), lengths)
    cols = np.concatenate([rng.choice(n, size=l, replace=False) for l in lengths])
    vals = rng.standard_normal(rows.size).astype(dtype)
    vals[rng.random(rows.size) < 0.02] = 0.0  # explicit zeros
    return sp.csr_array((vals, (rows, cols)), shape=(m, n))


# 20011 columns: every block row is written through its bitmap, and long rows are filled in
# one chunk (float32) or two (float64); 300007: wide rows fall back to the sort, and dense rows
# take many chunks
@pytest.mark.parametrize("cols", [20011, 300007])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_hash_spgemm_matches_the_scipy_twin(rng, dtype, tol, cols):
    import cupy
    from mx.kernels import spgemm

    a = _powerlaw(rng, 3001, 2003, 20, dtype, heavy_rows=3)
    b = _powerlaw(rng, 2003, cols, 15, dtype, heavy_rows=2)
    ca, cb = spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b)
    want = spgemm.multiply(np, ca, cb)
    product = spgemm._GpuProduct(ca, cb)
    # every path is taken: each shared bin, and dense rows in both passes
    sym_bins, sym_dense = spgemm._bin(cupy, product.products, spgemm.SYMBOLIC_BINS)
    num_bins, num_dense = spgemm._bin(cupy, product.row_nnz, product._numeric_plan()[0])
    assert all(rows.size for rows, _, _ in sym_bins[:4]) and sym_dense.size
    assert all(rows.size for rows, _, _ in num_bins[:4]) and num_dense.size
    got = product.numeric()
    np.testing.assert_array_equal(cupy.asnumpy(got.indptr), want.indptr)
    np.testing.assert_array_equal(cupy.asnumpy(got.indices), want.indices)
    assert rel_error(cupy.asnumpy(got.data), want.data) < tol
    # the same product made in row batches, brought to the host
    batched = spgemm.multiply_to_host(cupy, ca, cb, max_bytes=64 * 1024)
    assert len(product.batches(64 * 1024 // (4 + np.dtype(dtype).itemsize))) > 3
    np.testing.assert_array_equal(batched.indptr, want.indptr)
    np.testing.assert_array_equal(batched.indices, want.indices)
    assert rel_error(batched.data, want.data) < tol


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_hash_spgemm_with_b_wider_than_a_product_takes(rng, dtype, tol):
    """B wider than the kernel takes is multiplied a block of columns at a time (here the
    widest block is made small), on the device and in row batches to the host."""
    import cupy
    from mx.kernels import spgemm

    a = _powerlaw(rng, 1201, 903, 20, dtype, heavy_rows=2)
    b = _powerlaw(rng, 903, 40009, 15, dtype, heavy_rows=2)
    ca, cb = spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b)
    want = spgemm.multiply(np, ca, cb)
    dev, bdev = ca.on(cupy), cb.on(cupy)
    on_device = spgemm.multiply(cupy, dev, bdev, max_columns=9001)
    to_host = spgemm.multiply_to_host(cupy, dev, bdev, max_bytes=256 * 1024, max_columns=9001)
    for got in ((cupy.asnumpy(on_device.indptr), cupy.asnumpy(on_device.indices),
                 cupy.asnumpy(on_device.data)), (to_host.indptr, to_host.indices, to_host.data)):
        np.testing.assert_array_equal(got[0], want.indptr)
        np.testing.assert_array_equal(got[1], want.indices)
        assert rel_error(got[2], want.data) < tol


def test_hash_spgemm_with_more_long_rows_of_b_than_a_group_lists(rng):
    """Rows of A meeting more long rows of B than a group's list holds: the rest are worked
    through where they are met, and the result is the same."""
    import cupy
    import scipy.sparse as sp
    from mx.kernels import spgemm

    k, n = 1777, 5003
    b_lengths = rng.integers(65, 300, size=k)  # every row of B longer than LONG_ROW (64)
    b_rows = np.repeat(np.arange(k), b_lengths)
    b_cols = np.concatenate([rng.choice(n, size=l, replace=False) for l in b_lengths])
    b = sp.csr_array((rng.standard_normal(b_rows.size), (b_rows, b_cols)), shape=(k, n))
    a_lengths = np.array([k, 1200, 700, 90, 0, 3])  # 1200 long entries: above the list's 512
    a_rows = np.repeat(np.arange(a_lengths.size), a_lengths)
    a_cols = np.concatenate([rng.choice(k, size=l, replace=False) for l in a_lengths])
    a = sp.csr_array((rng.standard_normal(a_rows.size), (a_rows, a_cols)), shape=(a_lengths.size, k))
    ca, cb = spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b)
    want = spgemm.multiply(np, ca, cb)
    got = spgemm._GpuProduct(ca, cb).numeric()
    np.testing.assert_array_equal(cupy.asnumpy(got.indptr), want.indptr)
    np.testing.assert_array_equal(cupy.asnumpy(got.indices), want.indices)
    assert rel_error(cupy.asnumpy(got.data), want.data) < 1e-12


def test_hash_spgemm_rows_of_few_nonzeros_but_many_products(rng):
    """A row with few nonzeros made of many products skips the thread-per-row bin; the rest of
    the short rows take it; both are right."""
    import cupy
    import scipy.sparse as sp
    from mx.kernels import spgemm

    k, n = 300, 1001
    b_cols = [rng.choice(5, size=3, replace=False) for _ in range(k // 2)]  # 5 columns in all
    b_cols += [rng.choice(n, size=rng.integers(0, 4), replace=False) for _ in range(k - k // 2)]
    b_rows = np.repeat(np.arange(k), [len(c) for c in b_cols])
    b = sp.csr_array((rng.standard_normal(b_rows.size), (b_rows, np.concatenate(b_cols))), shape=(k, n))
    a_cols = [np.arange(k // 2)] + [rng.choice(k, size=rng.integers(0, 4), replace=False)
                                    for _ in range(499)]
    a_rows = np.repeat(np.arange(len(a_cols)), [len(c) for c in a_cols])
    a = sp.csr_array((rng.standard_normal(a_rows.size), (a_rows, np.concatenate(a_cols))),
                     shape=(len(a_cols), k))
    ca, cb = spgemm.Csr.from_scipy(a), spgemm.Csr.from_scipy(b)
    product = spgemm._GpuProduct(ca, cb)
    assert int(product.row_nnz[0]) <= spgemm.TINY < int(product.products[0]) // 2
    bins, _ = spgemm._bin(cupy, product.row_nnz, product._numeric_plan()[0],
                          products=product.products, first_products=spgemm.TINY_PRODUCTS)
    tiny = cupy.asnumpy(bins[0][0])
    assert 0 not in tiny and tiny.size > 200
    got, want = product.numeric(), spgemm.multiply(np, ca, cb)
    np.testing.assert_array_equal(cupy.asnumpy(got.indptr), want.indptr)
    np.testing.assert_array_equal(cupy.asnumpy(got.indices), want.indices)
    assert rel_error(cupy.asnumpy(got.data), want.data) < 1e-12


def test_spgemm_op_on_gpu_actors(tmp_path, rng, ray_session):
    from mx.storage import sparse

    a = _powerlaw(rng, 1500, 1200, 12, np.float32, heavy_rows=1)
    b = _powerlaw(rng, 1200, 1300, 10, np.float32, heavy_rows=1)
    sparse.write_csr(str(tmp_path / "A.zarr"), a)
    sparse.write_csr(str(tmp_path / "B.zarr"), b)
    gpus = min(GPUS, 2)
    job = {"resources": {"gpus": gpus},
           "steps": [{"id": "c", "op": "spgemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                      "output": "C.zarr", "params": {"permute": True}}]}
    mx.submit(job, base=str(tmp_path))
    got = sparse.read_csr(str(tmp_path / "C.zarr"))
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert rel_error(got.toarray(), want.toarray()) < 1e-5


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_gemm_on_mpi_ranks_with_gpus(tmp_path, rng):
    import shutil
    import sys
    import os as _os

    if not (shutil.which("mpiexec") or _os.path.exists(_os.path.join(_os.path.dirname(sys.executable), "mpiexec"))):
        pytest.skip("no mpiexec on this machine")
    a, b = rng.standard_normal((2049, 1537)), rng.standard_normal((1537, 1025))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    job = gemm_job(2, "fp64", backend="mpi")
    job_id = mx.submit(job, base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    assert "gang transport: " in mx.logs(job_id) and "MPI" in mx.logs(job_id)


def complete_planted(tmp_path, resources: dict, params: dict) -> str:
    """A `complete` step on the planted O.zarr in tmp_path: asserts the planted matrix is
    recovered to 1e-6 and returns the job's log."""
    import zarr

    job = {"resources": resources,
           "steps": [{"id": "f", "op": "complete", "inputs": {"observed": "O.zarr"}, "output": "F.zarr",
                      "params": {"tol": 1e-9, "max_iters": 80, **params}}]}
    job_id = mx.submit(job, base=str(tmp_path))
    g, o = zarr.open_group(str(tmp_path / "F.zarr")), zarr.open_group(str(tmp_path / "O.zarr"))
    got = np.asarray(g["u"][...]) @ np.asarray(g["v"][...]).T
    want = np.asarray(o["truth_u"][...]) @ np.asarray(o["truth_v"][...]).T
    assert rel_error(got, want) < 1e-6, g.attrs["stopped"]
    return mx.logs(job_id)


@pytest.mark.parametrize("method", ["altmin-sketch", "als", "als-cg"])
def test_completion_on_gpu_actors(tmp_path, ray_session, method):
    from mx.storage import generate

    generate.lowrank(str(tmp_path / "O.zarr"), (901, 777), 8, 0.2, condition=10.0, seed=5)
    log = complete_planted(tmp_path, {"gpus": min(GPUS, 2)}, {"rank": 8, "method": method})
    if method == "altmin-sketch":  # rank 8 on a GPU, κ = 10, rows below 64k = 512: exact
        assert "row-solves-exact" in log and "row-solves-sketch" not in log, log
        assert "rows below that are solved exactly (on a GPU at rank <= 32" in log, log


def test_a_gpu_checkpoint_is_the_state_after_its_sweep_while_the_sweeps_go_on(tmp_path,
                                                                            monkeypatch):
    """On a GPU a checkpoint is written from host copies while the next sweeps run
    (``altmin.Checkpoints``): what is committed must be the state after its sweep, the
    factors a run stopped there returns, though its write waited until the sweeps had gone
    five further."""
    import zarr

    from mx.storage import generate

    generate.lowrank(str(tmp_path / "O.zarr"), (1310, 1170), 6, 0.05, condition=30.0, seed=3)
    release = hold_checkpoint_writes(monkeypatch)

    def job(sweeps):
        return {"backend": "local", "resources": {"gpus": 1},
                "steps": [{"id": "f", "op": "complete", "inputs": {"observed": "O.zarr"},
                           "output": "F.zarr", "params": {"rank": 6, "tol": 1e-14,
                                                          "max_iters": sweeps}}]}

    mx.submit(job(10), base=str(tmp_path))
    saved = zarr.open_group(str(tmp_path / ".F.zarr.mx-checkpoint"), mode="r")
    iteration, slot = saved.attrs["iteration"], saved.attrs["latest"]
    assert 1 <= iteration < 10
    release()
    reference = tmp_path / "ref"
    reference.mkdir()
    os.symlink(tmp_path / "O.zarr", reference / "O.zarr")
    mx.submit({**job(iteration), "steps": [{**job(iteration)["steps"][0],
                                            "params": {"rank": 6, "tol": 1e-14,
                                                       "max_iters": iteration,
                                                       "checkpoint": False}}]},
              base=str(reference))
    g = zarr.open_group(str(reference / "F.zarr"), mode="r")
    for name in ("u", "v"):  # the one worker's blocks
        blocks = list((tmp_path / ".F.zarr.mx-checkpoint").glob(f"{name}{slot}-*.f8"))
        assert len(blocks) == 1
        got = np.fromfile(blocks[0]).reshape(-1, 6)
        assert np.array_equal(got, np.asarray(g[name][...])), name


def test_completion_on_a_gpu_iterates_light_rows_against_a_well_conditioned_factor(
        tmp_path, rng, ray_session):
    """Rows and columns of about 12k observations (light) get plain CG steps on a GPU where the
    other factor is well conditioned, and the answer is the planted matrix all the same."""
    from mx.storage import generate

    m, n = int(rng.integers(1400, 1600)), int(rng.integers(1150, 1250))
    generate.lowrank(str(tmp_path / "O.zarr"), (m, n), 8, 0.08, seed=int(rng.integers(1 << 30)))
    log = complete_planted(tmp_path, {"gpus": 1}, {"rank": 8})
    assert "row-solves-plain-cg" in log and not re.search(r"row-solves-exact [1-9]", log), log
    assert "the other lighter rows (< 128) get them too" in log, log


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("condition,heavy", [(1.0, "plain-cg"), (30.0, "sketch")])
def test_completion_over_nccl_solves_heavy_rows_iteratively(tmp_path, rng, ray_session,
                                                            condition, heavy):
    """Two GPU actors, Ω's by-columns part and the factor blocks sent over NCCL, with rows
    heavy enough for the iterative solvers: plain CG against a well-conditioned factor, the
    sketch otherwise (rank 4: from 64k = 256 observations, so the ~256 a row are split
    between it and exact solves)."""
    from mx.storage import generate

    m, n = int(rng.integers(2900, 3100)), int(rng.integers(500, 530))
    generate.lowrank(str(tmp_path / "O.zarr"), (m, n), 4, 0.5, condition=condition,
                     seed=int(rng.integers(1 << 30)))
    log = complete_planted(tmp_path, {"gpus": 2, "workers": 2}, {"rank": 4})
    assert f"row-solves-{heavy}" in log and "gang transport nccl" in log, log


def test_a_gpu_job_on_the_head_runs_and_cancel_gives_the_gpu_back(head, tmp_path, rng):
    """Through `mx cluster up`: a gemm on the GPU through the Jobs API, then a long
    out-of-core gemm cancelled mid-run; afterwards the head's GPUs are all free again."""
    from conftest import mx_cli, wait_for
    from test_service import gemm_job, live_actors, query

    gpus = query(head, "result = ray.cluster_resources().get('GPU', 0)")
    assert gpus >= 1
    want = gemm_job(tmp_path, rng, 1031, 517, 777, workers=1, name="gpugemm")
    (tmp_path / "job.yaml").write_text((tmp_path / "job.yaml").read_text()
                                       .replace("workers: 1", "workers: 1\n  gpus: 1"))
    job_id = mx_cli("submit", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    assert "GPU ids" in mx_cli("logs", job_id, env=head["env"], check=True).stdout

    # a long one: out of core through a small memory budget, panels streamed from Zarr
    big = tmp_path / "big"
    big.mkdir()
    gemm_job(big, rng, 6144, 6144, 6144, workers=1, name="gpustream")
    (big / "job.yaml").write_text((big / "job.yaml").read_text()
                                  .replace("workers: 1", "workers: 1\n  gpus: 1")
                                  .replace("output: C.zarr", "output: C.zarr\n  params: {memory: 48MiB}"))
    job_id = mx_cli("submit", "--detach", big / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    log = head["home"] / "jobs" / job_id / "log"
    wait_for(lambda: log.exists() and "GPU ids" in log.read_text(), "the GPU worker to start")
    assert "stream" in log.read_text()
    assert query(head, "result = ray.available_resources().get('GPU', 0)") == gpus - 1
    assert "cancelled" in mx_cli("cancel", job_id, env=head["env"], check=True).stdout
    assert live_actors(head, job_id) == []
    assert not (big / "C.zarr").exists()
    free = query(head, "import time; time.sleep(1); result = ray.available_resources().get('GPU', 0)")
    assert free == gpus


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k", [1, 7, 32, 33, 64, 65, 128])
def test_fused_row_solves_match_the_numpy_reference(rng, dtype, k):
    """The one-kernel ALS row solve (Gram, Cholesky, solve) against the NumPy batched path,
    on rows of awkward degrees: empty, fewer entries than the rank, heavy, and a subset."""
    import cupy

    from mx.kernels import lsq, rowsolve

    m, n = 301, 1777
    degree = rng.integers(0, 3 * k + 5, size=m)
    degree[rng.choice(m, 5, replace=False)] = rng.integers(1000, n, size=5)  # heavy rows
    degree[:3] = 0
    indptr, cols, vals = random_rows(rng, degree, n)
    vals = vals.astype(dtype)
    y = rng.standard_normal((n, k)).astype(dtype)
    subset = np.sort(rng.choice(m, m // 2, replace=False)).astype(np.int64)
    g = lambda a: cupy.asarray(a)  # noqa: E731
    eps = np.finfo(dtype).eps
    for reg, rows in [(0.0, None), (0.37, None), (0.05, subset)]:
        # float64 reference; each row may differ by what its conditioning allows in dtype
        want = lsq.solve_exact(np, y.astype(np.float64), indptr, cols, vals.astype(np.float64),
                               reg, rows_subset=rows)
        got = lsq.solve_exact(cupy, g(y), g(indptr), g(cols), g(vals), reg,
                              rows_subset=None if rows is None else g(rows)).get()
        picked = np.arange(m) if rows is None else rows
        for i in picked:
            ys = y[cols[indptr[i]:indptr[i + 1]]].astype(np.float64)
            gram = ys.T @ ys + reg * np.eye(k)
            kappa = np.linalg.cond(gram) if degree[i] >= k or reg else np.inf
            if not np.isfinite(kappa) or kappa > min(1e6, 0.1 / rowsolve.singular_floor(dtype)):
                continue  # singular in this precision: the kernel leaves it to a pseudo-inverse
            err = np.linalg.norm(got[i] - want[i]) / (np.linalg.norm(want[i]) + 1e-30)
            # rounding: forming G_i and b_i sums degree terms (b_i may cancel), solving
            # amplifies by G_i's condition
            ms = vals[indptr[i]:indptr[i + 1]].astype(np.float64)
            cancel = np.linalg.norm(np.abs(ys).T @ np.abs(ms)) / (np.linalg.norm(ys.T @ ms) + 1e-300)
            assert err < eps * kappa * (100 + 4 * degree[i]) * max(1.0, cancel), \
                (i, reg, k, err, kappa, cancel)
        assert not got[np.setdiff1d(np.arange(m), picked)].any()  # rows not asked for stay 0
    # the kernel itself flags the rows it cannot factor (fewer entries than k, no reg)
    out = cupy.zeros((m, k), dtype=dtype)
    flagged = rowsolve.solve(cupy, g(y), g(indptr), g(cols), g(vals), 0.0,
                             cupy.arange(m, dtype=cupy.int64), out).get()
    assert set(flagged.tolist()) >= set(np.nonzero(degree < k)[0].tolist())
    # and those rows get the minimum-norm solution
    got = lsq.solve_exact(cupy, g(y), g(indptr), g(cols), g(vals), 0.0).get()
    for i in np.nonzero((degree < k) & (degree > 0))[0][:20] if dtype == np.float64 else []:
        ys = y[cols[indptr[i]:indptr[i + 1]]].astype(np.float64)
        want = np.linalg.lstsq(ys, vals[indptr[i]:indptr[i + 1]].astype(np.float64), rcond=None)[0]
        err = np.linalg.norm(got[i] - want) / np.linalg.norm(want)
        assert err < 1e-6, (i, err)


def _precisions(dtype, tol):
    """(refine, tolerance) pairs a CG solve is checked at against the float64 reference:
    float64 factors both in float64 step for step (``tol``) and refined, the correction in
    float32 (float32's 2e-3); float32 factors as they are."""
    return [(False, tol), (True, 2e-3)] if dtype == np.float64 else [(True, tol)]


def _cases(dtype, tol):
    """(refine, storage, tolerance) triples a CG solve is checked at: ``_precisions``, and
    refined ones with the correction's steps gathering Y in float16 (lsq.CORRECTION_STORAGE)
    and in float32. There float16's rounding (5e-4) grows through the steps, and its steps
    stop at 4e-3 of the starting residual (rowsolve.HALF_CONVERGED), which the reference
    passes on rows with fewer entries than unknowns: 3e-2 (1.1e-2 seen, at k = 7)."""
    return [(refine, storage, 3e-2 if refine and storage == np.float16 else tol)
            for refine, tol in _precisions(dtype, tol)
            for storage in ((np.float16, None) if refine else (None,))]


@contextlib.contextmanager
def _lsq_settings(refine: bool, storage):
    """lsq.REFINE and lsq.CORRECTION_STORAGE as given inside the block, as they were after."""
    from mx.kernels import lsq

    keep = lsq.REFINE, lsq.CORRECTION_STORAGE
    lsq.REFINE, lsq.CORRECTION_STORAGE = refine, storage
    try:
        yield
    finally:
        lsq.REFINE, lsq.CORRECTION_STORAGE = keep


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-7), (np.float32, 2e-3)])
@pytest.mark.parametrize("k", [1, 7, 32, 33, 64, 65, 128])
def test_fused_sketch_solves_match_the_numpy_reference(rng, dtype, tol, k):
    """The one-kernel sketch-preconditioned CG (sketch, its Gram's inverse, CG passes)
    against the NumPy reference, step for step, on heavy rows of awkward degrees, with and
    without regularisation; rows whose sketch is singular get the exact solve."""
    import cupy

    from mx.kernels import lsq

    m, n = 203, 2311
    degree = rng.integers(4 * k, 4 * k + 300, size=m)
    degree[rng.choice(m, 4, replace=False)] = rng.integers(1500, n, size=4)
    indptr, cols, vals = random_rows(rng, degree, n)
    y = rng.standard_normal((n, k)) * np.geomspace(1, 30, k)  # unequal scales: preconditioning matters
    x0 = rng.standard_normal((m, k))
    rows = np.sort(rng.choice(m, m - 17, replace=False)).astype(np.int64)
    g = lambda a: cupy.asarray(a.astype(dtype) if a.dtype == np.float64 else a)  # noqa: E731
    for refine, storage, tol in _cases(dtype, tol):
        with _lsq_settings(refine, storage):
            for reg, steps, seed in [(0.0, 1, 3), (0.0, 3, 11), (0.7, 2, 5)]:
                want = lsq.solve_sketch(np, x0, y, indptr, cols, vals, reg, rows, steps, seed)
                got = lsq.solve_sketch(cupy, g(x0), g(y), g(indptr), g(cols), g(vals), reg,
                                       g(rows), steps, seed).get()
                moved = np.linalg.norm(want[rows] - x0[rows])
                err = np.linalg.norm(got[rows] - want[rows]) / moved
                assert err < tol, (refine, storage, reg, steps, err)
                others = np.setdiff1d(np.arange(m), rows)
                assert np.array_equal(got[others], x0[others].astype(dtype))  # the others stay
    if dtype == np.float64 and k > 1:
        # Y of rank k - 1: every sketch is singular, every row gets the minimum-norm solve
        low = y.copy()
        low[:, -1] = low[:, 0]
        got = lsq.solve_sketch(cupy, g(x0), g(low), g(indptr), g(cols), g(vals), 0.0, g(rows),
                               2, 1).get()
        for i in rows[:10]:
            ys = low[cols[indptr[i]:indptr[i + 1]]]
            best = np.linalg.lstsq(ys, vals[indptr[i]:indptr[i + 1]], rcond=None)[0]
            assert np.linalg.norm(got[i] - best) / np.linalg.norm(best) < 1e-6, i


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 2e-3)])
@pytest.mark.parametrize("k", [1, 7, 33, 64, 100, 128])
@pytest.mark.parametrize("wide_degree", [None, 500])
def test_fused_plain_cg_matches_the_numpy_reference(rng, dtype, tol, k, wide_degree,
                                                     monkeypatch):
    """All of a row's CG steps in one warp (residual pass, then one pass per step) against
    the NumPy reference, on rows of awkward degrees (empty ones too), with and without
    regularisation, a shared preconditioner and a stop (rows whose residual comes near it
    may stop a step apart: not compared); rows not asked for keep their start. With
    ``wide_degree`` the four heaviest rows get a block of warps each
    (``rowsolve.WIDE_DEGREE``)."""
    import cupy

    from mx.kernels import lsq, rowsolve

    if wide_degree:
        monkeypatch.setattr(rowsolve, "WIDE_DEGREE", wide_degree)

    m, n = 211, 1907
    degree = rng.integers(0, 3 * k + 40, size=m)
    degree[rng.choice(m, 4, replace=False)] = rng.integers(900, n, size=4)
    indptr, cols, vals = random_rows(rng, degree, n)
    y = rng.standard_normal((n, k)) * np.geomspace(1, 5, k)
    x0 = rng.standard_normal((m, k))
    rows = np.sort(rng.choice(m, m - 19, replace=False)).astype(np.int64)
    # a preconditioner every row shares: the inverse of an average row's Gram matrix
    average = y.T @ y * (3 * k / n) + np.eye(k)
    precond = np.linalg.inv(average)
    # and as a whitening (W, s): W·Wᵀ = precond, WᵀW = diag(s)
    evals, evecs = np.linalg.eigh(average)
    whitening = (evecs / np.sqrt(evals), 1 / evals)
    g = lambda a: cupy.asarray(a.astype(dtype) if a.dtype == np.float64 else a)  # noqa: E731
    for refine, storage, tol in _cases(dtype, tol):
        with _lsq_settings(refine, storage):
            for reg, steps, p, firm in [(0.0, 1, None, None), (0.0, 4, None, None),
                                        (0.9, 3, None, None), (0.0, 4, precond, None),
                                        (0.9, 3, precond, None), (0.0, 4, None, 1),
                                        (0.9, 3, precond, 2)]:
                stop, near = None, np.zeros(m, dtype=bool)
                if firm is not None:  # about half the rows stop before their last step
                    progress = cg_progress(y, x0, indptr, cols, vals, reg, steps, p)
                    middle = np.sort(progress[steps - 1, rows])[rows.size // 2:][:2]
                    stop = (firm, float(np.sqrt(middle[0] * middle[1])))
                    margin = (0.1 if storage == np.float16 else
                              1e-6 if dtype == np.float64 and not refine else 1e-2)
                    near = near_the_stop(progress, firm, stop[1], margin)
                want = lsq.solve_cg_rows(np, x0, y, indptr, cols, vals, reg, rows, steps, p,
                                         stop)
                got = lsq.solve_cg_rows(cupy, g(x0), g(y), g(indptr), g(cols), g(vals), reg,
                                        g(rows), steps, None if p is None else g(p),
                                        stop).get()
                moved = np.linalg.norm(want[rows] - x0[rows])
                # float16 steps stop once the residual is 4e-3 of the start's
                # (rowsolve.HALF_CONVERGED): on a regularised row of fewer entries than
                # unknowns the rest lies in reg·I's directions, where that leaves a large
                # error (seen: 7.9 on a row of 2 at k = 64). Such rows must only not lose
                # in the norm of their normal equations, in which CG steps only gain.
                early = rows[(storage == np.float16) & (reg > 0) & (degree[rows] < k)
                             & ~near[rows]]
                checked = np.setdiff1d(rows[~near[rows]], early)
                others = np.setdiff1d(np.arange(m), rows)

                def a_norm(i, e):
                    return np.sqrt(np.sum((y[cols[indptr[i]:indptr[i + 1]]] @ e) ** 2)
                                   + reg * (e @ e))

                def check(got, what):
                    err = np.linalg.norm(got[checked] - want[checked]) / moved
                    what = (what, stop)
                    assert err < tol, (refine, storage, reg, steps, what, err)
                    lost = [i for i in early if a_norm(i, got[i] - want[i])
                            > a_norm(i, x0[i] - want[i]) * (1 + tol)]
                    assert not lost, (what, lost)
                    assert np.array_equal(got[others], x0[others].astype(dtype))

                check(got, "plain" if p is None else "preconditioned")
                if p is not None:  # as plain steps against the whitened Y (refined float64)
                    group = lsq.cg_group(g(rows), steps, g(p), whitening=whitening, stop=stop)
                    check(lsq.solve_cg_groups(cupy, g(x0), g(y), g(indptr), g(cols), g(vals),
                                              reg, [group], float(np.abs(y).max())).get(),
                          "whitened")
            # disjoint groups of rows in one call, each its own steps, preconditioner and stop
            # (the plain ones share a launch, a row stopping by its own group's rule), two
            # with their launch split and max |Y| given: as each group solved on its own
            parts = np.array_split(rng.permutation(rows), 3)
            ratio = float(np.median(cg_progress(y, x0, indptr, cols, vals, 0.4, 2)[1]))
            specs = [(g(part), steps, None if p is None else g(p), stop) for part, steps, p, stop
                     in [(parts[0], 2, None, None), (parts[1], 4, precond, None),
                         (parts[2], 3, None, (1, ratio))]]
            gx0, gy, gi, gc, gv = g(x0), g(y), g(indptr), g(cols), g(vals)
            want = gx0
            for part, steps, p, stop in specs:
                want = lsq.solve_cg_rows(cupy, want, gy, gi, gc, gv, 0.4, part, steps, p, stop)
            groups = [lsq.cg_group(part, steps, p, rowsolve.split_rows(cupy, gi, part) if i
                                   else None, stop=stop)
                      for i, (part, steps, p, stop) in enumerate(specs)]
            got = lsq.solve_cg_groups(cupy, gx0, gy, gi, gc, gv, 0.4, groups,
                                      float(cupy.abs(gy).max()))
            want, got = want.get(), got.get()
            # at the case's tolerance: a row at its convergence threshold may take a step more
            # or less where the wide rows' warps add in another order
            err = np.linalg.norm(got - want) / np.linalg.norm(want - x0.astype(dtype))
            assert err < tol, (refine, storage, "groups", err)
            assert np.array_equal(got[others], x0[others].astype(dtype))


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])
def test_cg_steps_gathering_float16_hold_at_any_magnitude(rng, magnitude):
    """CG steps that gather Y in float16 scale it into float16's range by a power of two (Y
    of 1e6 would overflow it, of 1e-6 lose its digits): at any magnitude they agree with the
    same steps gathering float32, to float16's precision."""
    import cupy

    from mx.kernels import rowsolve

    m, n, k = 150, 1100, 24
    degree = rng.integers(3 * k, 10 * k, size=m)
    indptr, cols, _ = random_rows(rng, degree, n)
    indptr = cupy.asarray(indptr)
    y = cupy.asarray((rng.standard_normal((n, k)) * magnitude).astype(np.float32))
    r0 = cupy.asarray((rng.standard_normal((m, k)) * magnitude).astype(np.float32))
    rows = cupy.arange(m, dtype=np.int64)
    reg = float(rng.uniform(0.1, 1.0)) * magnitude ** 2
    got, want = cupy.zeros((m, k), np.float32), cupy.zeros((m, k), np.float32)
    for storage, out in ((np.float16, got), (None, want)):
        rowsolve.cg_solve(cupy, y, None, indptr, cupy.asarray(cols), None, reg, rows, 3, out,
                          r0=r0, storage=storage)
    assert float(cupy.linalg.norm(got - want) / cupy.linalg.norm(want)) < 5e-3


@pytest.mark.parametrize("k", [16, 48])
def test_heavy_rows_on_the_gpu_get_plain_cg_against_a_well_conditioned_factor(rng, k,
                                                                            monkeypatch):
    """altmin-sketch's half-sweep on the GPU against the same on NumPy: against a
    well-conditioned factor every row gets plain CG on the GPU (light rows their own steps),
    as on NumPy told to iterate light rows; against an ill-conditioned one heavy rows get the
    sketch, which on the GPU at rank <= 32 gives way to the fused exact solve on rows below
    64k observations, light rows steps preconditioned by the factor's Gram matrix, but the
    exact solve at rank <= 32, and the thin rows CG steps still: plain where they are barely
    determined, else preconditioned by the factor's Gram matrix."""
    import cupy

    from mx.kernels import altmin, lsq

    m, n, big = 61, 4001, 5
    degree = rng.integers(altmin.HEAVY_DEGREE * k, 40 * k, size=m)
    top = altmin.SMALL_RANK_SKETCH_DEGREE * k
    degree[:big] = rng.integers(top, top + 400, size=big)  # sketched at any rank
    light = 3  # light, not thin
    degree[big:big + light] = rng.integers(altmin.THIN_DEGREE * k, altmin.HEAVY_DEGREE * k,
                                           size=light)
    degree[-7:-3] = rng.integers(k, np.ceil(altmin.GRAM_CG_DEGREE * k), size=4)  # thin
    degree[-3:] = rng.integers(np.ceil(altmin.GRAM_CG_DEGREE * k), 3 * k, size=3)  # thin
    indptr, cols, vals = random_rows(rng, degree, n)
    g = cupy.asarray
    # without the heavy rows' stop (tested with the CG kernel): a row near it may stop a
    # step apart on the two devices, which would move it by more than this test's bound
    monkeypatch.setattr(altmin, "CG_STOP", {})
    for scale in (1.0, 30.0):
        y = rng.standard_normal((n, k)) * np.geomspace(1, scale, k)
        reg = float(rng.uniform(0.0, 1.0))
        exact = lsq.solve_exact(np, y, indptr, cols, vals, reg)
        x0 = exact + 0.1 * rng.standard_normal((m, k)) * np.abs(exact).mean()
        with monkeypatch.context() as patch:  # the NumPy reference of the GPU's rule
            patch.setattr(altmin, "light_rows_iterative", lambda gpu, k, well=True: True)
            want, used, _ = altmin._solve(np, "altmin-sketch", x0, y, (indptr, cols, vals), reg,
                                          None, k, 0)
        got, used_gpu, _ = altmin._solve(cupy, "altmin-sketch", g(x0), g(y),
                                         (g(indptr), g(cols), g(vals)), reg, None, k, 0)
        thin = {"plain-cg": 4, "gram-cg": 3}
        assert used == ({"plain-cg": m} if scale == 1.0 else
                        {"plain-cg": 4, "gram-cg": 3 + light, "sketch": m - 7 - light}), used
        if scale == 30.0 and k <= altmin.FUSED_EXACT_MAX_RANK:
            assert used_gpu == {"exact": m - big - 7, "sketch": big, **thin}, used_gpu
            want = np.concatenate([want[:big], exact[big:-7], want[-7:]])
        else:
            assert used_gpu == used, used_gpu
        # the GPU's steps solve for their correction in float32: far within their progress
        rel = np.linalg.norm(got.get() - want) / np.linalg.norm(want - x0)
        assert rel < 2e-3, (scale, rel)


@pytest.mark.parametrize("solver", ["plain-cg", "exact"])
@pytest.mark.parametrize("k", [5, 64, 128])
def test_float64_solves_refined_in_float32_reach_the_float64_solution(rng, k, solver):
    """Half-sweeps of float64 row solves repeated from their own result: each solves for its
    correction in float32 from a float64 residual, so they reach the least-squares solution
    to float64's accuracy, far below float32's; the first exact one is already within
    float32's."""
    import cupy

    from mx.kernels import lsq

    m, n, reg = 97, 2003, 0.4
    degree = rng.integers(8 * k, 8 * k + 200, size=m)  # well-conditioned rows: CG converges
    indptr, cols, vals = random_rows(rng, degree, n)
    y = rng.standard_normal((n, k)) * np.geomspace(1, 3, k)
    best = np.empty((m, k))
    for i in range(m):
        ys = y[cols[indptr[i]:indptr[i + 1]]]
        best[i] = np.linalg.solve(ys.T @ ys + reg * np.eye(k), ys.T @ vals[indptr[i]:indptr[i + 1]])
    g = cupy.asarray
    start = rng.standard_normal((m, k))
    x = g(start)
    rows = g(np.arange(m, dtype=np.int64))
    rel = lambda a: np.linalg.norm(a - best, axis=1) / np.linalg.norm(best, axis=1)  # noqa: E731
    for sweep in range(25 if solver == "plain-cg" else 3):
        if solver == "plain-cg":
            x = lsq.solve_cg_rows(cupy, x, g(y), g(indptr), g(cols), g(vals), reg, rows, 10)
        else:
            x = lsq.solve_exact(cupy, g(y), g(indptr), g(cols), g(vals), reg, x0=x)
            if sweep == 0:
                moved = np.linalg.norm(best - start, axis=1) / np.linalg.norm(best, axis=1)
                assert (rel(x.get()) / moved).max() < 1e-4
    assert rel(x.get()).max() < 1e-11


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("width", [1, 40, 72, 136, 256, 300])
def test_sparse_times_dense_matches_scipy(rng, dtype, tol, width):
    """The randomized SVD's sparse × dense products (one warp per row up to 256 wide,
    cuSPARSE beyond) against SciPy, on rows of awkward degrees, empty ones too."""
    import cupy
    import scipy.sparse as sps

    from mx.kernels import lsq

    m, n = 263, 1409
    a = sps.random(m, n, density=0.05, format="csr", random_state=int(rng.integers(1 << 30)))
    keep = np.ones(m)
    keep[rng.choice(m, 5, replace=False)] = 0  # empty rows
    a = (sps.diags(keep) @ a).tocsr()
    a.eliminate_zeros()
    a = a.astype(dtype)
    x = rng.standard_normal((n, width)).astype(dtype)
    want = a.astype(np.float64) @ x.astype(np.float64)
    got = lsq.spmm(cupy, cupy.asarray(a.indptr), cupy.asarray(a.indices), cupy.asarray(a.data),
                   cupy.asarray(x), a.shape).get()
    assert got.dtype == dtype and got.shape == (m, width)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


@pytest.mark.parametrize("k", [1, 7, 33, 64, 100])
@pytest.mark.parametrize("wide_degree", [None, 300])
def test_the_residual_pass_gives_the_squared_error_too(rng, monkeypatch, k, wide_degree):
    """x0's residual rows for every row and its squared error on the stored entries, in one
    pass (``lsq.residual_and_error``), against NumPy: rows of no entries, light rows, and rows
    a block of warps shares (``rowsolve.WIDE_DEGREE``)."""
    import cupy

    from mx.kernels import lsq, rowsolve

    if wide_degree:
        monkeypatch.setattr(rowsolve, "WIDE_DEGREE", wide_degree)
    m, n = int(rng.integers(200, 300)), int(rng.integers(1200, 1400))
    degree = rng.integers(0, 40, size=m)
    degree[rng.choice(m, 4, replace=False)] = rng.integers(900, n, size=4)
    degree[rng.choice(m, 3, replace=False)] = 0
    indptr, cols, values = random_rows(rng, degree, n)
    x, y, reg = rng.standard_normal((m, k)), rng.standard_normal((n, k)), 0.3
    rows = lsq.row_ids(np, indptr)
    miss = values - lsq.predictions(np, x, y, rows, cols)
    want_r = lsq.csr(np, indptr, cols, miss, (m, n)) @ y - reg * x
    g = cupy.asarray
    for low, tol in ((False, 1e-12), (True, 1e-5)):  # float64, float32 (lsq.LOW_RESIDUAL)
        r, sq = lsq.residual_and_error(cupy, g(x), g(y), g(indptr), g(cols), g(values), reg,
                                       low)
        assert r.dtype == (np.float32 if low else np.float64)
        assert rel_error(r.get(), want_r) < tol
        assert abs(float(sq) - (miss * miss).sum()) / (miss * miss).sum() < tol
    # where the solves start from no residual (float32), the error alone, by its own pass
    r, sq = lsq.residual_and_error(cupy, g(x.astype(np.float32)), g(y.astype(np.float32)),
                                   g(indptr), g(cols), g(values.astype(np.float32)), reg)
    assert r is None and abs(float(sq) - (miss * miss).sum()) / (miss * miss).sum() < 1e-5


@pytest.mark.parametrize("method,k,noise", [("altmin-sketch", 8, 0.05), ("altmin-sketch", 8, 0.0),
                                            ("altmin-sketch", 40, 0.05), ("als", 40, 0.05),
                                            ("als", 40, 0.0), ("als-cg", 8, 0.0)])
def test_each_sweeps_training_error_on_a_gpu_is_that_of_the_factors_it_left(rng, monkeypatch,
                                                                           method, k, noise):
    """On a GPU a sweep's training error comes from the residual pass the next sweep's V
    solves start from: it must be the training RMSE of the factors a run stopped after that
    sweep returns, as on the CPU (tests/test_complete.py), to float32's rounding of the
    predictions while that pass is float32's (``lsq.LOW_RESIDUAL``). Noise-free, the sweeps
    then go on below float32's floor as with float64 residuals throughout."""
    import cupy

    from mx.cluster.comm import GangContext, LocalComm, Mailroom
    from mx.kernels import altmin, lsq

    m, n = int(rng.integers(700, 900)), int(rng.integers(500, 650))
    seen = rng.random((m, n)) < 0.4
    rows, cols = np.nonzero(seen)
    truth_u, truth_v = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    vals = (truth_u[rows] * truth_v[cols]).sum(axis=1) + noise * rng.standard_normal(rows.size)
    held = altmin.holdout_mask(np, rows, cols, 0.05, 0)
    scale = float(np.sqrt((vals * vals).mean()))
    g = cupy.asarray
    R, C, H = (tuple(g(a) for a in altmin.sorted_csr(np, *parts)) for parts in (
        (rows[~held], cols[~held], vals[~held], m, n), (cols[~held], rows[~held], vals[~held], n, m),
        (rows[held], cols[held], vals[held], m, n)))

    def run(sweeps):
        ctx = GangContext(comm_or_factory=LocalComm(Mailroom(), 0, 1), xp=cupy)
        return altmin.iterate(ctx, R, C, H, (m, n), k, [(0, m)], [(0, n)], method, 0.0,
                              sweeps, 0.01 if noise else 0.0, None, 0)

    history = run(4 if noise else 20)[2]
    sweeps = len(history)  # noise-free, it may stop at float64's floor
    for after in range(1, sweeps + 1):
        u, v, _, _ = run(after)
        direct = np.sqrt(float(lsq.squared_error(np, u.get(), v.get(), *(a.get() for a in R)))
                         / R[2].size)
        # a sweep's own error is the next one's residual pass's, the last sweep's float64's
        low = after < sweeps and altmin._low_residual(history[:after])
        slack = (1e-6 if low else 1e-12) * scale
        assert abs(history[after - 1]["train_rmse"] - direct) <= 1e-9 * direct + slack, after
    if not noise:
        monkeypatch.setattr(lsq, "LOW_RESIDUAL", None)
        want = run(sweeps)[2][-1]["holdout_rel_error"]
        assert want < 1e-8 and history[-1]["holdout_rel_error"] < 2 * want + 1e-13, (history, want)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("k", [1, 7, 33, 64, 100])
def test_warp_row_kernels_match_the_numpy_operators(rng, dtype, tol, k):
    """Squared errors on the stored entries and the CG normal operator, one warp per row,
    against NumPy."""
    import cupy

    from mx.kernels import lsq, rowsolve

    m, n = 257, 1301
    degree = rng.integers(0, 40, size=m)
    degree[rng.choice(m, 3, replace=False)] = rng.integers(900, n, size=3)
    indptr, cols, _ = random_rows(rng, degree, n)
    x = rng.standard_normal((m, k)).astype(dtype)
    y = rng.standard_normal((n, k)).astype(dtype)
    g = lambda a: cupy.asarray(a)  # noqa: E731
    rows = lsq.row_ids(np, indptr)
    values = rng.standard_normal(cols.size).astype(dtype)
    miss = lsq.predictions(np, x.astype(np.float64), y.astype(np.float64), rows, cols) - values
    want = np.bincount(rows, weights=miss * miss, minlength=m)
    got = rowsolve.row_sq_error(cupy, g(x), g(y), g(indptr), g(cols), g(values)).get()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
    total = float(lsq.squared_error(cupy, g(x), g(y), g(indptr), g(cols), g(values)))
    assert abs(total - want.sum()) / want.sum() < tol
    total = float(lsq.squared_error(np, x, y, indptr, cols, values))
    assert abs(total - want.sum()) / want.sum() < tol
    reg = 0.3
    want = lsq.normal_apply(np, x.astype(np.float64), y.astype(np.float64), rows, cols, indptr,
                            (m, n), reg)
    got = lsq.normal_apply(cupy, g(x), g(y), g(rows), g(cols), g(indptr), (m, n), reg).get()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_gpu_jobs_submitted_together_queue_for_the_gpus(head, tmp_path, rng):
    """More 1-GPU jobs than the head has GPUs, submitted at once: all finish correctly, and
    no two hold the same GPU at the same time (their steps' task spans never overlap beyond
    the head's GPU count)."""
    import json

    from conftest import mx_cli, wait_for
    from test_service import gemm_job, query, record

    gpus = int(query(head, "result = ray.cluster_resources().get('GPU', 0)"))
    ids, wants = [], []
    for i in range(gpus + 2):
        folder = tmp_path / f"j{i}"
        folder.mkdir()
        wants.append(gemm_job(folder, rng, 2048 + 64 * i, 2048, 2048, workers=1, name=f"q{i}"))
        (folder / "job.yaml").write_text((folder / "job.yaml").read_text()
                                         .replace("workers: 1", "workers: 1\n  gpus: 1"))
        ids.append(mx_cli("submit", "--detach", folder / "job.yaml", "--address",
                          head["dashboard"], env=head["env"], check=True).stdout.strip())
    spans = []
    for i, job_id in enumerate(ids):
        wait_for(lambda: record(head, job_id)["state"] in ("succeeded", "failed"), job_id, 300)
        assert record(head, job_id)["state"] == "succeeded"
        assert rel_error(read_dense(tmp_path / f"j{i}" / "C.zarr"), wants[i]) < 1e-12
        tasks = json.loads((head["home"] / "jobs" / job_id / "timeline.json").read_text())
        tasks = tasks["steps"]["c"]["tasks"]
        spans.append((min(t["start"] for t in tasks), max(t["start"] + t["seconds"] for t in tasks)))
    for t in sorted(s for span in spans for s in span):  # at any instant, at most `gpus` busy
        assert sum(lo < t < hi for lo, hi in spans) <= gpus


# ----------------------------------------------------------------------------- diffuse
def _attention_reference(q, k, v):
    s = np.einsum("hnd,hmd->hnm", q, k) / np.sqrt(q.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hnm,hmd->hnd", e / e.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("heads,n,total,d", [(3, 333, 517, 72), (2, 64, 64, 32), (4, 1, 200, 128),
                                             (1, 1000, 7, 20)])
def test_fused_attention_matches_float64(rng, heads, n, total, d):
    """Awkward counts (not multiples of the 64-row tiles), head dims padded to 16, and q read
    through the strides of a fused qkv projection."""
    import cupy

    from mx.kernels import attention

    qkv = rng.standard_normal((n, 3, heads, d)) * 2
    k, v = rng.standard_normal((2, heads, total, d)) * 2
    q = qkv.transpose(1, 2, 0, 3)[0]
    want = _attention_reference(q, k, v)
    qd = cupy.asarray(qkv, dtype=np.float16).transpose(1, 2, 0, 3)[0]
    assert attention.fused(cupy, qd) and (n == 1 or not qd.flags.c_contiguous)
    got = cupy.asnumpy(attention.attend(cupy, qd, cupy.asarray(k, np.float16),
                                        cupy.asarray(v, np.float16))).astype(np.float64)
    assert rel_error(got, want) < 3e-3  # float16 inputs and output
    chunked = attention.attend(np, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert rel_error(chunked, want) < 1e-5


@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 45), (5, 1090), (1003, 1152), (9, 4099)])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float16, 2e-3)])
def test_adaln_kernels_match_numpy(rng, rows, cols, dtype, tol):
    import cupy

    from mx.kernels import norm

    # an offset far from zero: float32 statistics taken as E[x²] - E[x]² would lose it (float16's
    # own rounding of x at that offset would drown the test)
    x = rng.standard_normal((rows, cols)) + (30 if dtype == np.float32 else 4)
    y = rng.standard_normal((rows, cols))
    gate, bias, shift, scale = rng.standard_normal((4, 1, cols))
    want_x, want_h = norm.residual_modulate(np, x, gate, y, bias, shift, scale)
    d = lambda a: cupy.asarray(a, dtype)  # noqa: E731
    got_x, got_h = norm.residual_modulate(cupy, d(x), d(gate), d(y), d(bias), d(shift), d(scale))
    assert rel_error(cupy.asnumpy(got_x), want_x) < tol
    assert rel_error(cupy.asnumpy(got_h), want_h) < 4 * tol
    alone = norm.modulate(cupy, d(want_x), d(shift), d(scale))
    assert rel_error(cupy.asnumpy(alone), norm.modulate(np, want_x, shift, scale)) < 4 * tol
    with pytest.raises(ValueError, match="shift"):
        norm.modulate(cupy, d(x), d(shift[:, :-1]) if cols > 1 else d(np.ones((1, 2))), d(scale))


# (70001, 6): more rows than a grid's second dimension holds, so blocks stride over rows
@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 45), (5, 1090), (300, 4608), (70001, 6)])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float16, 2e-3)])
def test_bias_kernels_match_numpy(rng, rows, cols, dtype, tol):
    import cupy

    from mx.kernels import pointwise

    def close(got, want):
        # errors against the outputs' scale: one float16 output near zero (x + b cancelling, or
        # GELU's tail) has no relative accuracy to speak of
        return np.abs(cupy.asnumpy(got) - want).max() <= tol * max(1.0, np.abs(want).max())

    # the inputs as the kernel sees them, so the reference measures its arithmetic alone
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype).astype(np.float64)
    b = rng.standard_normal((1, cols)).astype(dtype).astype(np.float64)
    assert close(pointwise.bias_gelu(cupy, cupy.asarray(x, dtype), cupy.asarray(b, dtype)),
                 pointwise.bias_gelu(np, x, b))
    xd = cupy.asarray(x, dtype)
    assert pointwise.add_bias(cupy, xd, cupy.asarray(b, dtype)) is xd  # in place
    assert close(xd, x + b)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 2e-2)])
def test_dit_on_the_gpu_matches_numpy(rng, dtype, tol):
    import cupy

    from mx.kernels import dit

    x = rng.standard_normal((3, 38, 26))
    t = int(rng.integers(0, 1000))
    ref_net = dit.load("builtin:dit-tiny", np, np.float64)
    want = dit.forward_band(ref_net, np, x, (0, 19), (19, 13), dit.condition(ref_net, np, t, None),
                            dit.own_kv)
    net = dit.load("builtin:dit-tiny", cupy, dtype)
    got = dit.forward_band(net, cupy, cupy.asarray(x, dtype), (0, 19), (19, 13),
                           dit.condition(net, cupy, t, None), dit.own_kv)
    assert rel_error(cupy.asnumpy(got), want) < tol


def test_diffuse_job_on_a_gpu_equals_the_cpu_run(tmp_path):
    from mx.storage import image

    steps = [{"id": "img", "op": "diffuse", "inputs": {"model": "builtin:dit-tiny"},
              "output": "gpu.zarr", "params": {"height": 36, "width": 28, "steps": 8, "seed": 2,
                                               "precision": "fp32"}}]
    mx.submit({"resources": {"gpus": 1}, "steps": steps}, base=str(tmp_path))
    steps[0]["output"] = "cpu.zarr"
    mx.submit({"backend": "local", "resources": {"workers": 1}, "steps": steps}, base=str(tmp_path))
    gpu, attrs = image.read(str(tmp_path / "gpu.zarr"))
    cpu, _ = image.read(str(tmp_path / "cpu.zarr"))
    assert rel_error(gpu, cpu) < 1e-3 and attrs["diffuse"]["precision"] == "fp32"


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_diffuse_modes_over_nccl(tmp_path):
    from mx.storage import image

    def step(mode):
        return {"id": mode, "op": "diffuse", "inputs": {"model": "builtin:dit-tiny"},
                "output": f"{mode}.zarr", "params": {"height": 44, "width": 32, "steps": 10,
                                                     "seed": 4, "precision": "fp32",
                                                     "parallel": {"mode": mode, "warmup": 2}}}

    mx.submit({"resources": {"gpus": 1}, "steps": [step("none")]}, base=str(tmp_path))
    mx.submit({"resources": {"gpus": 2}, "steps": [step(m) for m in
                                                             ("sync", "distrifusion", "pcpp", "naive")]},
                       base=str(tmp_path))
    ref = image.read(str(tmp_path / "none.zarr"))[0]
    out = {m: image.read(str(tmp_path / f"{m}.zarr"))[0] for m in ("sync", "distrifusion", "pcpp", "naive")}
    assert rel_error(out["sync"], ref) < 1e-4
    err = {m: float(np.abs(a - ref).mean()) for m, a in out.items()}
    assert err["distrifusion"] < err["naive"] and err["pcpp"] < err["naive"], err
    # the NCCL trace: every worker's steps in order, its exchanges, and the share hidden
    info = image.read(str(tmp_path / "pcpp.zarr"))[1]["diffuse"]
    assert len(info["timeline"]) == 2 and len(info["overlap"]) == 2
    for timeline, overlap in zip(info["timeline"], info["overlap"]):
        starts = [a for a, _ in timeline["steps"]]
        assert len(starts) == 10 and starts == sorted(starts)
        assert all(b >= a for a, b in timeline["exchanges"]) and len(timeline["exchanges"]) > 10
        assert overlap["exchange_s"] > 0 and overlap["hidden"] <= 1.0
    assert "overlap" not in image.read(str(tmp_path / "naive.zarr"))[1]["diffuse"]
