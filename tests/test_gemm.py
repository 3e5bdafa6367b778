"""GEMM through the whole stack (spec -> plan -> graph -> backend -> Zarr), checked against
NumPy in float64 on fresh random inputs of awkward shapes."""

import numpy as np
import pytest

import mx
from conftest import read_dense, rel_error, write_dense, leftovers

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def gemm_job(backend, workers, steps):
    return {"backend": backend, "resources": {"workers": workers}, "steps": steps}


def gemm_step(sid, a, b, out, algorithm="auto"):
    return {"id": sid, "op": "gemm", "inputs": {"a": a, "b": b}, "output": out,
            "params": {"algorithm": algorithm}}


def make_pair(rng, tmp_path, m, k, n, dtype_a=np.float64, dtype_b=None, tag=""):
    a = rng.standard_normal((m, k)).astype(dtype_a)
    b = rng.standard_normal((k, n)).astype(dtype_b or dtype_a)
    ca = (int(rng.integers(1, m + 1)), int(rng.integers(1, k + 1)))
    cb = (int(rng.integers(1, k + 1)), int(rng.integers(1, n + 1)))
    write_dense(tmp_path / f"A{tag}.zarr", a, ca)
    write_dense(tmp_path / f"B{tag}.zarr", b, cb)
    return a, b


def expected(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


def tolerance(*arrays):
    return TOL[np.float32] if any(x.dtype == np.float32 for x in arrays) and \
        all(x.dtype == np.float32 for x in arrays) else TOL[np.float64]


@pytest.mark.parametrize("workers,algorithm", [
    (1, "auto"), (4, "cannon"), (9, "cannon"), (4, "summa"), (2, "auto"), (3, "auto"),
    (5, "summa"), (6, "auto"), (8, "summa"),
])
def test_local_backend_matches_numpy(tmp_path, rng, workers, algorithm):
    m, k, n = (int(x) for x in rng.integers(1, 160, size=3))
    m, k, n = max(m, 3), max(k, 3), max(n, 3)
    a, b = make_pair(rng, tmp_path, m, k, n)
    mx.submit(gemm_job("local", workers, [gemm_step("c", "A.zarr", "B.zarr", "C.zarr", algorithm)]),
              base=str(tmp_path))
    got = read_dense(tmp_path / "C.zarr")
    assert got.shape == (m, n) and got.dtype == np.float64
    assert rel_error(got, expected(a, b)) < TOL[np.float64]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("shape", [(1, 57, 203), (203, 57, 1), (64, 1, 70), (1, 1, 1)])
def test_local_backend_degenerate_shapes(tmp_path, rng, shape):
    a, b = make_pair(rng, tmp_path, *shape)
    mx.submit(gemm_job("local", 4, [gemm_step("c", "A.zarr", "B.zarr", "C.zarr")]),
              base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]


def test_local_backend_float32_and_mixed(tmp_path, rng):
    a, b = make_pair(rng, tmp_path, 131, 97, 77, np.float32, tag="32")
    a2, b2 = make_pair(rng, tmp_path, 50, 61, 45, np.float32, np.float64, tag="mix")
    mx.submit(gemm_job("local", 4, [gemm_step("c", "A32.zarr", "B32.zarr", "C32.zarr"),
                                    gemm_step("d", "Amix.zarr", "Bmix.zarr", "Cmix.zarr")]),
              base=str(tmp_path))
    c32 = read_dense(tmp_path / "C32.zarr")
    assert c32.dtype == np.float32
    assert rel_error(c32, expected(a, b)) < TOL[np.float32]
    cmix = read_dense(tmp_path / "Cmix.zarr")
    assert cmix.dtype == np.float64  # float32·float64 computes in float64, as NumPy does
    assert rel_error(cmix, expected(a2, b2)) < TOL[np.float64]


def test_steps_chain_through_step_refs(tmp_path, rng):
    a, b = make_pair(rng, tmp_path, 40, 33, 29)
    d = rng.standard_normal((29, 17))
    write_dense(tmp_path / "D.zarr", d)
    mx.submit(gemm_job("local", 4, [gemm_step("c", "A.zarr", "B.zarr", "C.zarr"),
                                    gemm_step("e", "step:c", "D.zarr", "E.zarr", "summa")]),
              base=str(tmp_path))
    ref = expected(a, b) @ d
    assert rel_error(read_dense(tmp_path / "E.zarr"), ref) < TOL[np.float64]


@pytest.mark.parametrize("workers", [1, 4, 9])
def test_ray_square_grids_match_numpy(tmp_path, rng, ray_session, workers):
    """One job per grid, several steps per job: Cannon (and SUMMA) over real Ray actors."""
    cases = [(int(rng.integers(20, 200)), int(rng.integers(20, 200)), int(rng.integers(20, 200)))
             for _ in range(2)]
    pairs, steps = [], []
    for t, (m, k, n) in enumerate(cases):
        pairs.append(make_pair(rng, tmp_path, m, k, n, tag=str(t)))
        steps.append(gemm_step(f"c{t}", f"A{t}.zarr", f"B{t}.zarr", f"C{t}.zarr",
                               "cannon" if t == 0 else "summa"))
    a32, b32 = make_pair(rng, tmp_path, 77, 130, 51, np.float32, tag="f")
    steps.append(gemm_step("f", "Af.zarr", "Bf.zarr", "Cf.zarr", "auto"))
    job_id = mx.submit(gemm_job("ray", workers, steps), base=str(tmp_path))
    for t, (a, b) in enumerate(pairs):
        assert rel_error(read_dense(tmp_path / f"C{t}.zarr"), expected(a, b)) < TOL[np.float64]
    assert rel_error(read_dense(tmp_path / "Cf.zarr"), expected(a32, b32)) < TOL[np.float32]
    log = mx.logs(job_id)
    q = int(workers ** 0.5)
    assert f"algorithm cannon on a {q}×{q} grid" in log
    assert all(f":worker({r // q},{r % q}): actor" in log for r in range(workers))
    assert "compute" in log and "read" in log and "write" in log
    status = mx.status(job_id)
    assert status["state"] == "succeeded"
    # every step starts its own workers, and says how long that took apart from its work
    for step in status["steps"]:
        assert 0 < step["phases"]["start-workers"] < step["seconds"]


def test_ray_non_square_worker_count_uses_summa(tmp_path, rng, ray_session):
    a, b = make_pair(rng, tmp_path, 1, 300, 257)  # a 1×N row: SUMMA on a 1×6 grid
    a2, b2 = make_pair(rng, tmp_path, 211, 97, 150, tag="2")
    job_id = mx.submit(gemm_job("ray", 6, [gemm_step("row", "A.zarr", "B.zarr", "C.zarr"),
                                            gemm_step("sq", "A2.zarr", "B2.zarr", "C2.zarr")]),
                       base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]
    assert rel_error(read_dense(tmp_path / "C2.zarr"), expected(a2, b2)) < TOL[np.float64]
    log = mx.logs(job_id)
    assert "algorithm summa on a 1×6 grid" in log
    assert "6 workers do not form a square grid" in log


def test_auto_prefers_summa_for_very_rectangular_shapes():
    from mx.tasks import gemm

    algorithm, grid, reason = gemm.choose(100_000, 64, 128, 4, "auto", "steps[0]")
    assert algorithm == "summa" and grid == (4, 1) and "fewer bytes" in reason
    algorithm, grid, _ = gemm.choose(4096, 4096, 4096, 4, "auto", "steps[0]")
    assert algorithm == "cannon" and grid == (2, 2)


@pytest.mark.parametrize("backend,workers", [("local", 3), ("ray", 4)])
def test_out_of_core_streaming_matches_numpy(tmp_path, rng, request, backend, workers):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    m, k, n = 700, 1500, 650
    a, b = make_pair(rng, tmp_path, m, k, n)
    step = gemm_step("c", "A.zarr", "B.zarr", "C.zarr")
    step["params"]["memory"] = "1536KiB"  # far less than A, B and C need: must stream
    job_id = mx.submit(gemm_job(backend, workers, [step]), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]
    log = mx.logs(job_id)
    assert "algorithm stream (out of core): A, B and C do not fit" in log
    from mx.tasks import gemm
    plan = gemm.plan({"a": dense_info(tmp_path / "A.zarr"), "b": dense_info(tmp_path / "B.zarr")},
                     gemm.GemmParams(memory="1536KiB"), workers, "t")
    assert len(plan.rows) * len(plan.cols) > workers and len(plan.inner) > 1  # really tiled


def test_out_of_core_abft_checks_each_tile_and_retries_a_corrupted_one(tmp_path, rng, monkeypatch):
    from mx.kernels import abft

    a, b = make_pair(rng, tmp_path, 530, 1100, 470)
    step = gemm_step("c", "A.zarr", "B.zarr", "C.zarr")
    step["params"].update(memory="1536KiB", verify="abft")
    monkeypatch.setenv(abft.FAULT_ENV, "abft:1:3")  # worker 1's fourth product (a later slab)
    monkeypatch.setenv(abft.FAULT_ONCE_ENV, str(tmp_path / "fired"))
    job_id = mx.submit(gemm_job("local", 2, [step]), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]
    assert (tmp_path / "fired").exists()
    log = mx.logs(job_id)
    assert "algorithm stream (out of core)" in log and "failed their ABFT checksums" in log
    counters = mx.status(job_id)["steps"][0]["counters"]
    from mx.tasks import gemm
    plan = gemm.plan({"a": dense_info(tmp_path / "A.zarr"), "b": dense_info(tmp_path / "B.zarr")},
                     gemm.GemmParams(memory="1536KiB", verify="abft"), 2, "t")
    tiles = len(plan.rows) * len(plan.cols)
    assert len(plan.inner) > 3 and counters["abft-checked"] == tiles
    assert counters["abft-products"] == tiles * len(plan.inner)


def test_forced_stream_and_too_little_memory(tmp_path, rng):
    a, b = make_pair(rng, tmp_path, 300, 200, 100)
    step = gemm_step("c", "A.zarr", "B.zarr", "C.zarr", "stream")
    mx.submit(gemm_job("local", 2, [step]), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]
    from mx.errors import UserError
    step["params"]["memory"] = "10KB"
    step["output"] = "D.zarr"
    with pytest.raises(UserError, match="too little to stream"):
        mx.submit(gemm_job("local", 2, [step]), base=str(tmp_path))
    step["params"].update(algorithm="cannon", memory="100KB")
    with pytest.raises(UserError, match="needs .* per worker"):
        mx.submit(gemm_job("local", 4, [step]), base=str(tmp_path))
    step["params"].update(algorithm="auto", memory="lots")
    with pytest.raises(UserError, match="not an amount of memory"):
        mx.submit(gemm_job("local", 4, [step]), base=str(tmp_path))


def test_stream_takes_a_matrix_smaller_than_one_aligned_tile(tmp_path, rng):
    """A budget too small for a 128×128 tile still streams a C that fits it whole."""
    m, k, n = (int(x) for x in rng.integers(20, 60, size=3))
    a, b = make_pair(rng, tmp_path, m, k, n)
    step = gemm_step("c", "A.zarr", "B.zarr", "C.zarr", "stream")
    step["params"]["memory"] = "100KiB"  # C fits; a 128×128 float64 tile and its slabs do not
    mx.submit(gemm_job("local", 2, [step]), base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "C.zarr"), expected(a, b)) < TOL[np.float64]


def dense_info(path):
    from mx.storage import dense
    return dense.inspect(str(path))
