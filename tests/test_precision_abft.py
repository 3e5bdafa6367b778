"""Precisions and ABFT on the NumPy path (the reference the GPU path is tested against)."""

import numpy as np
import pytest

import mx
from conftest import read_dense, rel_error, write_dense
from mx.kernels import abft, gemm, precision as prec


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


def test_abft_catches_a_corrupted_product_and_recomputes_it(tmp_path, rng, monkeypatch):
    a, b = rng.standard_normal((64, 90)), rng.standard_normal((90, 71))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    monkeypatch.setenv(abft.FAULT_ENV, "abft:3:1")  # worker 3, second round
    job_id = mx.submit(job("fp64", "abft"), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    counters = mx.status(job_id)["steps"][0]["counters"]
    assert counters["abft-recomputed"] == 1
    assert counters["abft-checked"] == 8  # 4 workers × 2 rounds
    assert "abft-recomputed 1" in mx.logs(job_id)


def test_without_abft_the_same_fault_goes_unnoticed(rng, monkeypatch):
    """The injected fault is real: the unchecked product is wrong (so the test above can fail)."""
    a, b = rng.standard_normal((20, 30)), rng.standard_normal((30, 10))
    c = np.zeros((20, 10))
    counters = {}
    abft.checked_accumulate(np, c, a, b, "fp64", counters, "t", corrupt=False)
    assert rel_error(c, a @ b) < 1e-13 and counters == {"abft-checked": 1}
    scratch = np.zeros((20, 10))
    gemm.accumulate(np, scratch, a, b, "fp64")
    scratch[0, 0] += 1e3
    assert rel_error(scratch, a @ b) > 1e-3


def test_abft_fails_loudly_when_checksums_cannot_agree(rng):
    a = rng.standard_normal((8, 9))
    a[2, 3] = np.nan
    b = rng.standard_normal((9, 5))
    with pytest.raises(abft.ChecksumError, match="failed its checksums twice"):
        abft.checked_accumulate(np, np.zeros((8, 5)), a, b, "fp64", {}, "t")


@pytest.mark.parametrize("fresh", [True, False])
def test_abft_recomputes_only_the_rows_that_fail(rng, fresh):
    a, b = rng.standard_normal((37, 53)), rng.standard_normal((53, 29))
    c0 = np.zeros((37, 29)) if fresh else rng.standard_normal((37, 29))
    c, counters = c0.copy(), {}
    redone = abft.checked_accumulate(np, c, a, b, "fp64", counters, "t", corrupt=True, fresh=fresh)
    assert redone == 1 and counters == {"abft-checked": 1, "abft-recomputed": 1}
    assert rel_error(c, c0 + a @ b) < 1e-13


def test_abft_weights_catch_errors_that_cancel_in_a_row_sum(rng):
    a, b = rng.standard_normal((23, 41)), rng.standard_normal((41, 19))
    bv, _ = abft.row_checks(np, b, None, "fp64")
    expect, _ = abft.row_checks(np, a, bv, "fp64")
    p = a @ b
    tol = 1e-9
    assert abft._check_add(np, p.copy(), None, expect, tol).size == 0
    p[5, 3] += 1.0
    p[5, 11] -= 1.0  # the plain row sum is unchanged
    assert abs(p[5].sum() - (a @ b)[5].sum()) < tol
    assert list(abft._check_add(np, p, None, expect, tol)) == [5]
    c = np.zeros_like(p)
    abft._check_add(np, p, c, expect, tol)  # rows that pass are added, row 5 is not
    assert not c[5].any() and rel_error(np.delete(c, 5, 0), np.delete(a @ b, 5, 0)) < 1e-14
