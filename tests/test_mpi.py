"""The MPI backend with real ranks (the mpich wheel's mpiexec): the same results as NumPy and
as the Ray backend, the srun-style entry point, and ranks that fail or are killed."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp

import mx
from conftest import leftovers, mx_cli, read_dense, rel_error, wait_for, write_dense
from mx.storage import sparse

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC) and not shutil.which("mpiexec"),
                                reason="no mpiexec")


def gemm_job(backend, workers, algorithm="auto", size=None):
    return {"backend": backend, "resources": {"workers": workers},
            "steps": [{"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                       "output": f"C-{backend}.zarr", "params": {"algorithm": algorithm}},
                      {"id": "s", "op": "spgemm", "inputs": {"a": "S.zarr", "b": "S.zarr"},
                       "output": f"T-{backend}.zarr", "params": {"permute": True}}]}


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_mpi_matches_numpy_scipy_and_ray(tmp_path, rng, ray_session, workers):
    a, b = rng.standard_normal((301, 177)), rng.standard_normal((177, 233))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    s = sp.random(400, 400, density=0.02, format="csr", random_state=int(rng.integers(1 << 30)))
    sparse.write_csr(str(tmp_path / "S.zarr"), s)
    job_id = mx.submit(gemm_job("mpi", workers), base=str(tmp_path))
    c_mpi = read_dense(tmp_path / "C-mpi.zarr")
    assert rel_error(c_mpi, a @ b) < 1e-12
    t_mpi = sparse.read_csr(str(tmp_path / "T-mpi.zarr"))
    assert rel_error(t_mpi.toarray(), (s @ s).toarray()) < 1e-12
    log = mx.logs(job_id)
    assert f"mpi: {workers} ranks" in log and all(f"rank {r}: pid" in log for r in range(workers))
    mx.submit(gemm_job("ray", workers), base=str(tmp_path))
    assert rel_error(c_mpi, read_dense(tmp_path / "C-ray.zarr")) < 1e-14
    t_ray = sparse.read_csr(str(tmp_path / "T-ray.zarr"))
    assert (t_ray != t_mpi).nnz == 0 and np.array_equal(t_ray.indices, t_mpi.indices)


def test_srun_style_entry_point(tmp_path, rng):
    """Ranks started by the launcher run `mx run job.yaml`; rank 0 records the job."""
    a, b = rng.standard_normal((90, 70)), rng.standard_normal((70, 50))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    (tmp_path / "job.yaml").write_text(
        "backend: mpi\nresources: {workers: 4}\nsteps:\n"
        "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr, params: {algorithm: cannon}}\n")
    proc = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-m", "mx.cli.main", "run",
                           str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job_ids = set(proc.stdout.split())
    assert len(job_ids) == 1  # every rank ran the one job rank 0 recorded
    assert mx.status(job_ids.pop())["state"] == "succeeded"
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    proc = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "mx.cli.main", "run",
                           str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "this MPI launch has 3 ranks" in proc.stderr


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_launch_with_the_wrong_number_of_ranks_is_bad_input(tmp_path, rng, ranks):
    """`mpiexec -n N mx run job.yaml` with N other than the job's workers was a job that ran
    and failed: exit 1, a failed job record, and the error among MPI_Abort's lines. It is bad
    input: exit 2, one line (said by every rank) that names both counts and the fix, and
    nothing written."""
    write_dense(tmp_path / "A.zarr", rng.standard_normal((30, 20)))
    write_dense(tmp_path / "B.zarr", rng.standard_normal((20, 10)))
    (tmp_path / "job.yaml").write_text(
        "backend: mpi\nresources: {workers: 4}\nsteps:\n"
        "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: out/C.zarr}\n")
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mx.cli.main", "run",
                           str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = set(proc.stderr.strip().splitlines())
    assert line.startswith("mx: error: resources.workers: the job has 4 workers but this MPI "
                           f"launch has {ranks} rank"), line
    assert "mpiexec -n 4" in line and f"set resources.workers to {ranks}" in line, line
    assert not (tmp_path / "out").exists()
    from mx.tasks import record

    assert record.all_ids() == []


def test_failing_rank_ends_the_job_with_no_output(tmp_path, rng):
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    with open(tmp_path / "A.zarr" / "c" / "2" / "0", "wb") as f:
        f.write(b"garbage")  # only the rank reading rows 80.. fails
    job = {"backend": "mpi", "resources": {"workers": 4},
           "steps": [{"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                      "output": "out/C.zarr"}]}
    echoed = []
    with pytest.raises(mx.errors.JobFailed if hasattr(mx, "errors") else Exception) as err:
        mx.submit(job, base=str(tmp_path), echo=echoed.append)
    assert "rank" in str(err.value) and "\n" not in str(err.value), str(err.value)
    # the ranks' tracebacks are in the log, not in what the relay echoes
    assert not [line for line in echoed if 'File "' in line], echoed
    # nor the folder made for the output (whichever of rank 0 and the launcher removes it)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_failing_rank_under_an_outside_launcher_settles_the_status(tmp_path, rng):
    """Ranks started by the launcher (as srun does): a rank that fails aborts the gang before
    rank 0 can record the end. The status still reads failed for the job and its step, with
    the rank's error, and no output is left."""
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    with open(tmp_path / "A.zarr" / "c" / "2" / "0", "wb") as f:
        f.write(b"garbage")  # only the rank reading rows 80.. fails
    (tmp_path / "job.yaml").write_text(
        "backend: mpi\nresources: {workers: 4}\nsteps:\n"
        "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n")
    proc = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-m", "mx.cli.main", "run",
                           str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    from mx.tasks import record

    (job_id,) = record.all_ids()  # this test's MX_HOME holds the one job rank 0 recorded
    rec = mx.status(job_id)
    assert rec["state"] == "failed" and rec["steps"][0]["state"] == "failed", rec
    assert "rank" in rec["error"]
    shown = mx_cli("status", job_id, check=True).stdout
    assert "state    failed" in shown and "step c (gemm) failed" in shown, shown
    assert not (tmp_path / "C.zarr").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("rank,sig", [(2, signal.SIGKILL), (0, signal.SIGSEGV)])
def test_killed_rank_ends_the_job_with_no_output(tmp_path, rank, sig):
    """...and the job's error names the rank and how it died: it said "mpiexec exited with
    code 9", whose report names a PID that is not the dead rank's."""
    n = 2200
    for name, seed in (("A", 1), ("B", 2)):
        mx_cli("data", "random", tmp_path / f"{name}.zarr", "--shape", f"{n},{n}", "--seed", seed, check=True)
    steps = "".join(f"  - {{id: c{t}, op: gemm, inputs: {{a: A.zarr, b: B.zarr}}, output: C{t}.zarr}}\n"
                    for t in range(4))
    (tmp_path / "job.yaml").write_text(f"backend: mpi\nresources: {{workers: 4}}\nsteps:\n{steps}")
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", check=True).stdout.strip()
    pid = None
    deadline = time.monotonic() + 120
    while pid is None and time.monotonic() < deadline:
        for line in mx.logs(job_id).splitlines():
            if f"rank {rank}: pid" in line:
                pid = int(line.split("pid")[1].split()[0])
        time.sleep(0.05)
    assert pid is not None
    os.kill(pid, sig)
    rec = mx.wait(job_id, timeout=120)
    assert rec["state"] == "failed", rec
    hint = " (out of memory?)" if sig == signal.SIGKILL else ""
    assert rec["error"] == f"rank {rank} of 4 was killed by {sig.name}{hint}", rec["error"]
    assert f"failed: rank {rank} of 4 was killed by {sig.name}" in mx.logs(job_id)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("C")] or \
        all(mx.status(job_id)["steps"][int(p[1])]["state"] == "succeeded"
            for p in os.listdir(tmp_path) if p.startswith("C") and p.endswith(".zarr"))
    assert not leftovers(tmp_path)


def test_ctrl_c_on_a_foreground_mpi_submit_cancels_the_job(tmp_path):
    """Ctrl-C in the terminal of `mx submit` reaches its process group, and mpiexec passes the
    SIGINT on to the ranks: the rank that caught it inside a task marked the job failed
    ("KeyboardInterrupt"). It is a cancel, as on Ray: the job and its running step read
    cancelled, the exit code is 1, the ranks end, and no unfinished output is left."""
    from mx.storage.commit import alive
    from mx.tasks import record

    n = 2200
    for name, seed in (("A", 1), ("B", 2)):
        mx_cli("data", "random", tmp_path / f"{name}.zarr", "--shape", f"{n},{n}", "--seed", seed,
               check=True)
    steps = "".join(f"  - {{id: c{t}, op: gemm, inputs: {{a: A.zarr, b: B.zarr}}, "
                    f"output: out/C{t}.zarr}}\n" for t in range(8))
    (tmp_path / "job.yaml").write_text(f"backend: mpi\nresources: {{workers: 2}}\nsteps:\n{steps}")
    # a session of its own: its process group stands for the terminal's foreground group
    submit = subprocess.Popen([sys.executable, "-m", "mx.cli.main", "submit", "-q",
                               str(tmp_path / "job.yaml")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        job_id = wait_for(lambda: record.all_ids() and record.all_ids()[0], "the job's record", 60)
        wait_for(lambda: "running" in [s["state"] for s in mx.status(job_id)["steps"]],
                 "a step to run", 120, poll=0.02)
        os.killpg(submit.pid, signal.SIGINT)
        out, err = submit.communicate(timeout=120)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 1, err
    assert err.strip().splitlines()[-1] == f"mx: error: job {job_id} was cancelled", err
    rec = mx.status(job_id)
    states = [s["state"] for s in rec["steps"]]
    assert rec["state"] == "cancelled" and "cancelled" in states and "failed" not in states, rec
    assert "KeyboardInterrupt" not in rec["error"], rec
    ranks = [int(line.split("pid")[1].split()[0]) for line in mx.logs(job_id).splitlines()
             if line.split(" ", 1)[-1].startswith("rank ") and ": pid " in line]
    assert len(ranks) == 2
    wait_for(lambda: not [pid for pid in ranks if alive(pid)], "the ranks to end", 30)
    committed = [f"C{t}.zarr" for t, state in enumerate(states) if state == "succeeded"]
    if committed:
        assert sorted(os.listdir(tmp_path / "out")) == committed
    else:
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_completion_on_mpi_matches_ray(tmp_path, ray_session, workers):
    from mx.storage import generate
    import zarr

    generate.lowrank(str(tmp_path / "O.zarr"), (233, 197), 5, 0.4, seed=9)

    def job(backend):
        return {"backend": backend, "resources": {"workers": workers},
                "steps": [{"id": "f", "op": "complete", "inputs": {"observed": "O.zarr"},
                           "output": f"F-{backend}.zarr",
                           "params": {"rank": 5, "method": "altmin-sketch", "tol": 1e-9}}]}

    for backend in ("mpi", "ray"):
        mx.submit(job(backend), base=str(tmp_path))
    get = lambda b: zarr.open_group(str(tmp_path / f"F-{b}.zarr"))  # noqa: E731
    o = zarr.open_group(str(tmp_path / "O.zarr"))
    want = np.asarray(o["truth_u"][...]) @ np.asarray(o["truth_v"][...]).T
    results = {b: np.asarray(get(b)["u"][...]) @ np.asarray(get(b)["v"][...]).T for b in ("mpi", "ray")}
    assert rel_error(results["mpi"], want) < 1e-6
    assert rel_error(results["mpi"], results["ray"]) < 1e-9


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_diffusion_on_mpi_matches_ray(tmp_path, ray_session, workers):
    """Bands of 17 token rows (6/6/5 on three ranks, 5/4/4/4 on four): sync equals one band;
    pcpp gives the same image on MPI ranks as on Ray actors (the same exchange, another
    transport)."""
    from mx.storage import image

    def step(mode):
        return {"id": mode, "op": "diffuse", "inputs": {"model": "builtin:dit-tiny"},
                "output": f"{mode}-BACKEND.zarr",
                "params": {"height": 34, "width": 26, "steps": 6, "seed": 9,
                           "parallel": {"mode": mode, "warmup": 2}}}

    def run(backend):
        steps = [step(m) for m in ("none", "sync", "pcpp")]
        for s in steps:
            s["output"] = s["output"].replace("BACKEND", backend)
        mx.submit({"backend": backend, "resources": {"workers": workers}, "steps": steps},
                  base=str(tmp_path))
        return {m: image.read(str(tmp_path / f"{m}-{backend}.zarr"))[0] for m in ("none", "sync", "pcpp")}

    got, want = run("mpi"), run("ray")
    assert rel_error(got["sync"], got["none"]) < 1e-5
    assert rel_error(got["none"], want["none"]) < 1e-6
    assert rel_error(got["pcpp"], want["pcpp"]) < 1e-5


def test_open_mpi_refusing_root_is_named_with_its_fix():
    from mx.tasks import jobs, record

    job_id = "job-openmpi-root"
    os.makedirs(record.job_dir(job_id), exist_ok=True)
    with open(record.path(job_id, "mpi.out"), "w") as f:
        f.write("mpiexec has detected an attempt to run as root.\n"
                "You can override this protection by adding the --allow-run-as-root option\n")
    reason = jobs._mpiexec_failure(job_id, 1)
    assert "code 1" in reason and "OMPI_ALLOW_RUN_AS_ROOT=1" in reason
    with open(record.path(job_id, "mpi.out"), "w") as f:
        f.write("some other failure\n")
    assert "ROOT" not in jobs._mpiexec_failure(job_id, 1)


def test_cancel_of_a_detached_mpi_job_inside_one_gang_program(tmp_path):
    """A `complete` step is one gang program, and rank 0 looked for a cancel only between
    tasks: `mx cancel` waited out its timeout, then killed only the launcher, and mpiexec's
    ranks ran on to commit the output. Now the ranks end, nothing is committed, and a resume
    finishes the job from its checkpoint."""
    from mx.storage import commit, generate
    from mx.storage.commit import alive
    import zarr

    generate.lowrank(str(tmp_path / "O.zarr"), (20000, 15000), 8, 0.01,
                     seed=int.from_bytes(os.urandom(2), "little"))
    job = ("backend: mpi\nresources: {workers: 2}\nsteps:\n"
           "  - {id: f, op: complete, inputs: {observed: O.zarr}, output: F.zarr,\n"
           "     params: {rank: 8, method: als, tol: 1.0e-12, max_iters: 60}}\n")
    (tmp_path / "job.yaml").write_text(job)
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", check=True).stdout.strip()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # a checkpoint is committed: the gang program runs
        try:
            if zarr.open_group(str(tmp_path / ".F.zarr.mx-checkpoint"), mode="r").attrs.get("iteration"):
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert mx.status(job_id)["state"] == "running"
    t0 = time.monotonic()
    proc = mx_cli("cancel", job_id, check=True)
    assert time.monotonic() - t0 < 30 and proc.stdout.split() == [job_id, "cancelled"], proc
    rec = mx.status(job_id)
    assert rec["state"] == "cancelled" and rec["steps"][0]["state"] == "cancelled", rec
    ranks = [int(line.split("pid")[1].split()[0]) for line in mx.logs(job_id).splitlines()
             if line.split(" ", 1)[-1].startswith("rank ") and ": pid " in line]
    assert len(ranks) == 2
    time.sleep(1.0)
    assert not [pid for pid in ranks if alive(pid)]
    assert not (tmp_path / "F.zarr").exists() and not leftovers(tmp_path)
    assert not os.path.exists(commit.lock_path(str(tmp_path / "F.zarr")))

    proc = mx_cli("submit", "--resume", job_id, check=True)
    assert "resumed-at-sweep" in proc.stderr
    o, f = zarr.open_group(str(tmp_path / "O.zarr")), zarr.open_group(str(tmp_path / "F.zarr"))
    want = np.asarray(o["truth_u"][...]) @ np.asarray(o["truth_v"][...]).T
    assert rel_error(np.asarray(f["u"][...]) @ np.asarray(f["v"][...]).T, want) < 1e-6


def test_ranks_end_with_a_killed_launcher_and_a_resume_runs_alone(tmp_path):
    """`mx submit` of an MPI job killed outright (SIGKILL, a closed terminal): Hydra's ranks,
    in sessions of their own, ran on; the job read 'lost', and a --resume started a second
    set of ranks beside them on the same output and checkpoint (the first committed, the
    second failed on the checkpoint it removed). Now the ranks end with their launcher."""
    from mx.storage import generate
    from mx.storage.commit import alive
    import zarr

    generate.lowrank(str(tmp_path / "O.zarr"), (20000, 15000), 8, 0.01,
                     seed=int.from_bytes(os.urandom(2), "little"))
    (tmp_path / "job.yaml").write_text(
        "name: orphan\nbackend: mpi\nresources: {workers: 2}\nsteps:\n"
        "  - {id: f, op: complete, inputs: {observed: O.zarr}, output: F.zarr,\n"
        "     params: {rank: 8, method: als, tol: 1.0e-12, max_iters: 60}}\n")
    launcher = subprocess.Popen([sys.executable, "-m", "mx.cli.main", "submit", "-q",
                                 str(tmp_path / "job.yaml")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / ".F.zarr.mx-checkpoint").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # a sweep is done: the gang program runs
    from mx.tasks import record

    (job_id,) = record.all_ids()
    ranks = [int(line.split("pid")[1].split()[0]) for line in mx.logs(job_id).splitlines()
             if line.split(" ", 1)[-1].startswith("rank ") and ": pid " in line]
    assert len(ranks) == 2 and all(alive(pid) for pid in ranks)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if alive(pid)]
    assert mx.status(job_id)["state"] in ("lost", "cancelled", "failed")
    assert not (tmp_path / "F.zarr").exists()

    proc = mx_cli("submit", "--resume", job_id)
    assert proc.returncode == 0, proc.stderr
    assert mx.status(job_id)["state"] == "succeeded"
    o, f = zarr.open_group(str(tmp_path / "O.zarr")), zarr.open_group(str(tmp_path / "F.zarr"))
    want = np.asarray(o["truth_u"][...]) @ np.asarray(o["truth_v"][...]).T
    assert rel_error(np.asarray(f["u"][...]) @ np.asarray(f["v"][...]).T, want) < 1e-6
    assert not leftovers(tmp_path)
