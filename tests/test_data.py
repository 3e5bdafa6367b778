"""Input generators and importers: random dense matrices, Matrix Market files."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import mx_cli, read_dense
from mx.cli.main import cli
from mx.storage import sparse


def test_random_is_reproducible_and_shaped(tmp_path):
    runner = CliRunner()
    for name in ("X", "Y"):
        result = runner.invoke(cli, ["data", "random", str(tmp_path / f"{name}.zarr"), "--shape",
                                     "37,53", "--chunks", "10,20", "--seed", "5", "--dtype", "float32"])
        assert result.exit_code == 0, result.output
    x, y = read_dense(tmp_path / "X.zarr"), read_dense(tmp_path / "Y.zarr")
    assert x.shape == (37, 53) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y)
    assert 0 <= x.min() and x.max() < 1 and x.std() > 0.2
    result = runner.invoke(cli, ["data", "random", str(tmp_path / "X.zarr"), "--shape", "3,3"])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(cli, ["data", "random", str(tmp_path / "X.zarr"), "--shape", "3,4",
                                 "--overwrite", "--seed", "6"])
    assert result.exit_code == 0 and read_dense(tmp_path / "X.zarr").shape == (3, 4)
    info = runner.invoke(cli, ["data", "info", str(tmp_path / "X.zarr")])
    assert "dense 3×4 <f8" in info.output


def test_random_larger_than_the_free_disk_is_refused_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    m = 1 << 20
    n = free // (8 * m) + 1  # float64: just over the free space
    result = CliRunner().invoke(cli, ["data", "random", str(tmp_path / "X.zarr"), "--shape",
                                      f"{m},{n}"])
    assert result.exit_code == 2, result.output
    assert f"--shape {m},{n}: the matrix takes" in result.output and "free" in result.output
    assert result.output.count("\n") == 1
    assert os.listdir(tmp_path) == []  # nothing written, no lock or temporary left


def test_import_dense_array_file(tmp_path, rng):
    values = rng.standard_normal((23, 11))
    scipy.io.mmwrite(str(tmp_path / "m.mtx"), values)
    result = CliRunner().invoke(cli, ["data", "import", str(tmp_path / "m.mtx"), str(tmp_path / "M.zarr")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read_dense(tmp_path / "M.zarr"), values, rtol=1e-15)


@pytest.mark.parametrize("kind", ["general", "symmetric", "pattern", "integer"])
def test_import_coordinate_file(tmp_path, rng, kind):
    m = sp.random(41, 41 if kind == "symmetric" else 29, density=0.1, random_state=int(rng.integers(1 << 30)),
                  format="coo")
    if kind == "symmetric":
        m = (m + m.T).tocoo()
    if kind == "integer":
        m.data = np.ceil(m.data * 10)
    if kind == "pattern":
        m.data[:] = 1.0
    field = {"pattern": "pattern", "integer": "integer"}.get(kind)
    scipy.io.mmwrite(str(tmp_path / "s.mtx"), m, field=field,
                     symmetry="symmetric" if kind == "symmetric" else None)
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "import", str(tmp_path / "s.mtx"), str(tmp_path / "S.zarr")])
    assert result.exit_code == 0, result.output
    got = sparse.read_csr(str(tmp_path / "S.zarr"))
    np.testing.assert_allclose(got.toarray(), m.toarray())
    assert (np.diff(got.indptr) >= 0).all()
    for r in range(got.shape[0]):  # sorted, no duplicates within each row
        cols = got.indices[got.indptr[r]:got.indptr[r + 1]]
        assert (np.diff(cols) > 0).all()
    rows = sparse.read_csr(str(tmp_path / "S.zarr"), rows=(5, 17))
    np.testing.assert_allclose(rows.toarray(), m.toarray()[5:17])
    result = runner.invoke(cli, ["data", "import", "--dense", str(tmp_path / "s.mtx"), str(tmp_path / "D.zarr")])
    assert result.exit_code == 0
    np.testing.assert_allclose(read_dense(tmp_path / "D.zarr"), m.toarray())


@pytest.mark.parametrize("cols", [0, 3])
def test_import_an_array_file_without_rows(tmp_path, cols):
    # in a process of its own: SciPy's reader kills the process on such a file (SIGFPE)
    (tmp_path / "e.mtx").write_text(f"%%MatrixMarket matrix array real general\n0 {cols}\n")
    result = mx_cli("data", "import", tmp_path / "e.mtx", tmp_path / "E.zarr")
    assert result.returncode == 0, result.stderr
    assert read_dense(tmp_path / "E.zarr").shape == (0, cols)
    info = mx_cli("data", "info", tmp_path / "E.zarr")
    assert info.returncode == 0 and f"dense 0×{cols} <f8" in info.stdout, info.stderr


def test_import_rejects_complex_and_garbage(tmp_path):
    scipy.io.mmwrite(str(tmp_path / "c.mtx"), np.array([[1 + 2j, 3]]))
    (tmp_path / "g.mtx").write_text("hello\n")
    runner = CliRunner()
    for name in ("c.mtx", "g.mtx", "missing.mtx"):
        result = runner.invoke(cli, ["data", "import", str(tmp_path / name), str(tmp_path / "O.zarr")])
        assert result.exit_code == 2, result.output
        assert not (tmp_path / "O.zarr").exists()


def test_the_cli_takes_the_seeds_jobs_take():
    from mx.cli.main import SEED
    from mx.tasks.spec import SEED_MAX

    assert (SEED.min, SEED.max) == (0, SEED_MAX)


@pytest.mark.parametrize("command", [["random", "--shape", "3,3"], ["rmat", "--scale", "4"]])
def test_data_into_a_folder_that_cannot_be_written_is_one_line(tmp_path, command):
    (tmp_path / "file").write_text("not a folder")
    places = [tmp_path / "file" / "X.zarr"] + ([Path("/proc/mx-test/X.zarr")]
                                               if os.path.isdir("/proc/self") else [])
    for place in places:
        result = CliRunner().invoke(cli, ["data", command[0], str(place), *command[1:]])
        assert result.exit_code == 2, result.output
        assert "is not a writable folder" in result.output and "Traceback" not in result.output


def test_mx_data_and_a_job_never_write_one_output_at_once(tmp_path, rng):
    """`mx data --overwrite` is refused while a running job holds the output's lock; a job is
    refused while `mx data` writes it; neither loses the output already there."""
    import json
    import socket
    import subprocess
    import sys

    import mx
    from conftest import leftovers, write_dense
    from mx.errors import UserError
    from mx.storage import commit

    runner = CliRunner()
    out = tmp_path / "C.zarr"
    lock = tmp_path / ".C.zarr.mx-lock"
    m, n = rng.integers(5, 40, size=2)
    result = runner.invoke(cli, ["data", "random", str(out), "--shape", f"{m},{n}", "--seed", "3"])
    assert result.exit_code == 0, result.output
    before = read_dense(out)
    assert not lock.exists()

    job_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"job": "other-job", "host": socket.gethostname(),
                                    "pid": job_process.pid}))
        result = runner.invoke(cli, ["data", "random", str(out), "--shape", "4,4", "--overwrite"])
        assert result.exit_code == 2, result.output
        assert "is being written by job other-job" in result.output
    finally:
        job_process.kill()
        job_process.wait()
    np.testing.assert_array_equal(read_dense(out), before)

    write_dense(tmp_path / "A.zarr", rng.random((m, 7)))
    write_dense(tmp_path / "B.zarr", rng.random((7, n)))
    job = {"name": "lk", "backend": "local", "steps": [
        {"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"}, "output": "C.zarr",
         "overwrite": True}]}
    with pytest.raises(RuntimeError, match="the body failed"):
        with commit.publishing(str(out), overwrite=True) as tmp:
            assert json.loads(lock.read_text())["by"] == "`mx data`"
            with pytest.raises(UserError, match="C.zarr is being written by `mx data`"):
                mx.submit(job, base=str(tmp_path))
            result = runner.invoke(cli, ["data", "random", str(out), "--shape", "4,4",
                                         "--overwrite"])
            assert result.exit_code == 2 and "being written by `mx data`" in result.output
            write_dense(tmp, rng.random((3, 3)))  # half written when the body fails
            raise RuntimeError("the body failed")
    np.testing.assert_array_equal(read_dense(out), before)
    assert not lock.exists() and not leftovers(tmp_path)
