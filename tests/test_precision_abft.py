"""Precisions and ABFT on the NumPy path (the reference the GPU path is tested against)."""

import numpy as np
import pytest

import mx
from conftest import read_dense, rel_error, write_dense
from mx.errors import JobFailed
from mx.kernels import abft, precision as prec


def test_bf16_and_tf32_rounding_match_their_definitions(rng):
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-20, 20, 50_000)).astype(np.float32)
    bf = prec.bf16_to_float32(prec.round_bf16(x))
    assert np.max(np.abs(bf - x) / np.abs(x)) <= 2.0**-8
    tf = prec.round_tf32(x)
    assert np.max(np.abs(tf - x) / np.abs(x)) <= 2.0**-11
    # the last kept bit is even after a tie
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    np.testing.assert_array_equal(prec.bf16_to_float32(prec.round_bf16(ties)), [1.0, 1 + 2**-6])
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    out = prec.bf16_to_float32(prec.round_bf16(special))
    assert np.isnan(out[0]) and list(out[1:]) == [np.inf, -np.inf, 0.0, -0.0]


def job(precision, verify="none", workers=4, backend="local"):
    return {"backend": backend, "resources": {"workers": workers},
            "steps": [{"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                       "output": "C.zarr", "params": {"precision": precision, "verify": verify}}]}


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32", "fp64"])
def test_precisions_on_cpu_workers(tmp_path, rng, precision):
    m, k, n = 97, 301, 83
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b.astype(np.float32))
    mx.submit(job(precision), base=str(tmp_path))
    got = read_dense(tmp_path / "C.zarr")
    assert got.dtype == prec.output_dtype(precision)
    b32 = b.astype(np.float32)
    if precision == "fp64":
        assert rel_error(got, a @ b32.astype(np.float64)) < 1e-12
        return
    a32 = a.astype(np.float32)
    rounded = {"bf16": lambda x: prec.bf16_to_float32(prec.round_bf16(x)),
               "tf32": prec.round_tf32, "fp32": lambda x: x}[precision]
    exact_on_rounded = rounded(a32).astype(np.float64) @ rounded(b32).astype(np.float64)
    assert rel_error(got, exact_on_rounded) < 1e-5
    loss = rel_error(got, a @ b)  # what the precision costs against float64
    bound = {"bf16": 2e-2, "tf32": 2e-3, "fp32": 1e-5}[precision]
    assert loss < bound
    if precision != "fp32":
        assert loss > 1e-6  # the inputs really were rounded


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_abft_catches_a_corrupted_product_and_the_step_is_recomputed(tmp_path, rng, monkeypatch,
                                                                     request, backend):
    if backend == "ray":  # a Ray started before the drill was planned: workers still get it
        request.getfixturevalue("ray_session")
    a, b = rng.standard_normal((64, 90)), rng.standard_normal((90, 71))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    monkeypatch.setenv(abft.FAULT_ENV, "abft:3:1")  # worker 3, second round
    monkeypatch.setenv(abft.FAULT_ONCE_ENV, str(tmp_path / "fault-fired"))
    job_id = mx.submit(job("fp64", "abft", backend=backend), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    assert (tmp_path / "fault-fired").exists()  # the fault really happened
    counters = mx.status(job_id)["steps"][0]["counters"]
    assert counters["abft-checked"] == 4  # each worker's C block once
    assert counters["abft-products"] == 8  # 4 workers × 2 rounds
    log = mx.logs(job_id)
    assert "worker (1,1): 1 of" in log and "failed their ABFT checksums after 2 products" in log
    assert "retry 1 of 1" in log


def test_a_fault_on_every_attempt_fails_the_job_by_name(tmp_path, rng, monkeypatch):
    write_dense(tmp_path / "A.zarr", rng.standard_normal((40, 50)))
    write_dense(tmp_path / "B.zarr", rng.standard_normal((50, 30)))
    monkeypatch.setenv(abft.FAULT_ENV, "abft:0:1")
    with pytest.raises(JobFailed, match="ABFT checksums after 2 products"):
        mx.submit(job("fp64", "abft"), base=str(tmp_path))
    assert not (tmp_path / "C.zarr").exists()


def test_a_single_product_block_recomputes_its_failing_rows_in_place(tmp_path, rng, monkeypatch):
    a, b = rng.standard_normal((53, 47)), rng.standard_normal((47, 61))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    monkeypatch.setenv(abft.FAULT_ENV, "abft:0:0")
    job_id = mx.submit(job("fp64", "abft", workers=1), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    counters = mx.status(job_id)["steps"][0]["counters"]
    assert counters["abft-recomputed"] == 1 and counters["abft-checked"] == 1
    assert "retry" not in mx.logs(job_id)


def _products(rng, rows, cols, depths):
    return [(rng.standard_normal((rows, k)), rng.standard_normal((k, cols))) for k in depths]


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16"])
def test_running_checksums_pass_clean_sums_and_catch_a_corrupted_product(rng, precision):
    dtype = prec.output_dtype(precision)
    depths = rng.integers(5, 90, size=int(rng.integers(2, 6)))
    blocks = [(prec.to_device(np, a, precision), prec.to_device(np, b, precision))
              for a, b in _products(rng, 41, 37, depths)]
    for bad_round in (None, int(rng.integers(0, len(blocks)))):
        c, counters = np.zeros((41, 37), dtype), {}
        checks = abft.start(np, c, precision)
        for t, (a, b) in enumerate(blocks):
            abft.accumulate(np, c, a, b, precision, checks, counters, corrupt=t == bad_round)
        assert counters["abft-products"] == len(blocks)
        if bad_round is None:
            assert abft.verify(np, c, checks, precision, counters, "t") == 0
            want = sum(a.astype(np.float64) @ b.astype(np.float64) for a, b in blocks)
            assert rel_error(c, want) < (1e-13 if precision == "fp64" else 1e-5)
        else:
            with pytest.raises(abft.ChecksumError, match=f"after {len(blocks)} products"):
                abft.verify(np, c, checks, precision, counters, "t")


def test_without_abft_the_same_fault_goes_unnoticed(rng):
    """The injected fault is real: the unchecked product is wrong (so the tests above can fail)."""
    a, b = rng.standard_normal((20, 30)), rng.standard_normal((30, 10))
    c = np.zeros((20, 10))
    abft.accumulate(np, c, a, b, "fp64", None, corrupt=True)
    assert rel_error(c, a @ b) > 1e-3


def test_abft_fails_loudly_when_checksums_cannot_agree(rng):
    a = rng.standard_normal((8, 9))
    a[2, 3] = np.nan
    b = rng.standard_normal((9, 5))
    c = np.zeros((8, 5))
    checks = abft.start(np, c, "fp64")
    abft.accumulate(np, c, a, b, "fp64", checks)
    with pytest.raises(abft.ChecksumError, match="failed its checksums twice"):
        abft.verify(np, c, checks, "fp64", {}, "t")


def test_abft_recomputes_only_the_rows_that_fail(rng):
    a, b = rng.standard_normal((37, 53)), rng.standard_normal((53, 29))
    c, counters = np.zeros((37, 29)), {}
    checks = abft.start(np, c, "fp64")
    abft.accumulate(np, c, a, b, "fp64", checks, counters, corrupt=True)
    assert rel_error(c, a @ b) > 1e-3
    assert abft.verify(np, c, checks, "fp64", counters, "t") == 1
    assert counters == {"abft-products": 1, "abft-checked": 1, "abft-recomputed": 1}
    assert rel_error(c, a @ b) < 1e-13


def test_abft_weights_catch_errors_that_cancel_in_a_row_sum(rng):
    a, b = rng.standard_normal((23, 41)), rng.standard_normal((41, 19))
    bv, _ = abft.row_checks(np, b, None, "fp64")
    sums, _ = abft.row_checks(np, a, bv, "fp64")
    expect = np.column_stack([sums, np.ones(len(sums))])  # magnitude 1: tol is absolute
    p = a @ b
    tol = 1e-9
    assert abft.failing_rows(np, p, expect, tol).size == 0
    p[5, 3] += 1.0
    p[5, 11] -= 1.0  # the plain row sum is unchanged
    assert abs(p[5].sum() - (a @ b)[5].sum()) < tol
    assert list(abft.failing_rows(np, p, expect, tol)) == [5]


def test_a_small_row_is_checked_as_tightly_as_its_size_allows(rng):
    """Rows of A on scales 1e-6..1e6: a fault far larger than a small row's rounding, though
    far smaller than a large row's, is still caught in the small row."""
    a = rng.standard_normal((30, 40)) * 10.0 ** rng.integers(-6, 7, (30, 1))
    b = rng.standard_normal((40, 25))
    small = int(np.argmin(np.abs(a).sum(axis=1)))
    c = np.zeros((30, 25))
    checks = abft.start(np, c, "fp64")
    abft.accumulate(np, c, a, b, "fp64", checks)
    assert abft.failing_rows(np, c, checks.expect, *abft.tolerance(checks, 25, "fp64")).size == 0
    c[small, 7] += 1e-6 * np.abs(c[small]).max()
    assert list(abft.failing_rows(np, c, checks.expect, *abft.tolerance(checks, 25, "fp64"))) == [small]
