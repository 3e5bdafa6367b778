"""Shared fixtures: a private MX_HOME per test, one real local Ray for the session, and
random Zarr matrices of awkward shapes written with plain zarr (not by mx)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

RAY_CPUS = 9  # logical CPUs: enough for a 3×3 grid of one-CPU workers


@pytest.fixture(autouse=True)
def mx_home(tmp_path, monkeypatch):
    home = tmp_path / "mx-home"
    monkeypatch.setenv("MX_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray shared by the tests that run jobs in-process (mx uses it as is)."""
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", namespace="mx")
    yield
    ray.shutdown()


@pytest.fixture
def rng():
    # fresh inputs on every run; the seed is printed on failure by pytest's -l output
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def write_dense(path, values, chunks=None):
    """Write a matrix the way any Zarr user would, with chunks unrelated to mx's blocks."""
    values = np.asarray(values)
    if chunks is None:
        chunks = (max(1, values.shape[0] // 3 + 1), max(1, values.shape[1] // 2 + 1))
    arr = zarr.create_array(store=str(path), shape=values.shape, chunks=chunks,
                            dtype=values.dtype, zarr_format=3, overwrite=True)
    arr[...] = values
    return str(path)


def read_dense(path):
    return np.asarray(zarr.open_array(store=str(path), mode="r")[...])


def rel_error(got, ref):
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(np.asarray(got, dtype=np.float64) - ref) / (denom if denom else 1.0)


def random_rows(rng, degree, n):
    """A CSR pattern (indptr, cols, vals) of len(degree) rows over n columns: row i has
    degree[i] distinct columns, sorted, and standard normal values."""
    cols = np.concatenate([np.sort(rng.choice(n, d, replace=False)) for d in degree]).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(degree)]).astype(np.int64)
    return indptr, cols, rng.standard_normal(cols.size)


def leftovers(folder):
    """Dot-named temporaries mx may have left in a folder."""
    return [e for e in os.listdir(folder) if ".mx-tmp-" in e or ".mx-old-" in e]


def mx_cli(*args, env=None, timeout=600, check=False):
    """Run the installed `mx` command in a subprocess (as a user would)."""
    cmd = [sys.executable, "-m", "mx.cli.main", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(predicate, what: str, timeout: float = 180.0, poll: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def cg_progress(y, x0, indptr, cols, vals, reg, steps, precond=None):
    """Each row's residual norm (rᵀz's root, z = precond·r) after s = 0, …, ``steps`` CG
    steps from x0, over its start's: (steps + 1) × rows, from NumPy's reference steps."""
    from mx.kernels import lsq

    shape = (indptr.size - 1, y.shape[0])
    rows = lsq.row_ids(np, indptr)
    b = lsq.spmm(np, indptr, cols, vals, y, shape)
    out = []
    for s in range(steps + 1):
        x = lsq.solve_cg(np, x0, y, indptr, cols, vals, reg, iters=s, precond=precond)[0] \
            if s else x0
        r = b - lsq.normal_apply(np, x, y, rows, cols, indptr, shape, reg)
        z = r if precond is None else r @ precond.T
        out.append(np.sqrt(np.maximum((r * z).sum(axis=1), 0.0)))
    out = np.array(out)
    return out / np.where(out[0] > 0, out[0], 1.0)


def steps_taken(progress, firm, ratio):
    """The steps each row takes under ``lsq.solve_cg``'s stop (firm, ratio), from its
    ``cg_progress``: the first s ≥ firm where its residual has fallen below ratio, else all."""
    steps = progress.shape[0] - 1
    took = np.full(progress.shape[1], steps)
    for s in range(steps - 1, firm - 1, -1):
        took[progress[s] <= ratio] = s
    return took


def near_the_stop(progress, firm, ratio, margin):
    """Rows whose residual comes within ``margin`` (relative) of the stop's ratio at a step
    where it may stop: rounding may take them a step more or less."""
    checked = progress[firm:-1]
    return (np.abs(checked / ratio - 1.0) < margin).any(axis=0)


def hold_checkpoint_writes(monkeypatch, until: int = 6):
    """A `complete` checkpoint's write waits until the sweeps' history is ``until`` long (a
    write slower than several sweeps), and checkpoint folders outlive their job
    (shutil.rmtree passes them over). Returns a function that undoes both."""
    import shutil
    import threading

    from mx.kernels import altmin

    past, write, stop_reason = threading.Event(), altmin.Checkpoints._write, altmin._stop_reason

    def slow(self, slot, u, v):
        assert past.wait(60)
        write(self, slot, u, v)

    def counting(history, tol):
        if len(history) >= until:
            past.set()
        return stop_reason(history, tol)

    keep = shutil.rmtree
    monkeypatch.setattr(altmin.Checkpoints, "_write", slow)
    monkeypatch.setattr(altmin, "_stop_reason", counting)
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: None
                        if str(path).endswith(".mx-checkpoint") else keep(path, *a, **k))

    def release():
        monkeypatch.setattr(shutil, "rmtree", keep)
        monkeypatch.setattr(altmin.Checkpoints, "_write", write)

    return release
