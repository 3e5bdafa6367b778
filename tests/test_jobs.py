"""Job lifecycle on real Ray and real Zarr: the CLI end to end, failures and cancels that
leave no committed output and never damage an existing one."""

import json
import os
import re

import numpy as np
import pytest

import mx
from conftest import leftovers, mx_cli, read_dense, rel_error, wait_for, write_dense
from mx.errors import JobFailed

JOB = """name: {name}
backend: {backend}
resources: {{workers: {workers}}}
steps:
  - id: c
    op: gemm
    inputs: {{a: A.zarr, b: B.zarr}}
    output: out/C.zarr
"""


def test_cli_end_to_end_starts_and_stops_its_own_ray(tmp_path):
    """The README's demo path, in subprocesses: data, submit (local Ray), list, status, logs."""
    mx_cli("data", "random", tmp_path / "A.zarr", "--shape", "301,203", "--chunks", "100,64",
           "--seed", "1", check=True)
    mx_cli("data", "random", tmp_path / "B.zarr", "--shape", "203,150", "--chunks", "64,64",
           "--seed", "2", "--dtype", "float64", check=True)
    (tmp_path / "job.yaml").write_text(JOB.format(name="e2e", backend="ray", workers=4))
    proc = mx_cli("submit", tmp_path / "job.yaml", check=True)
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("e2e-")
    a, b = read_dense(tmp_path / "A.zarr"), read_dense(tmp_path / "B.zarr")
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
    assert "started a local Ray" in proc.stderr and "algorithm cannon on a 2×2 grid" in proc.stderr

    listing = mx_cli("list", check=True).stdout
    assert job_id in listing and "succeeded" in listing
    status = mx_cli("status", job_id[:8], check=True).stdout
    assert "state    succeeded" in status and "compute" in status
    log = mx_cli("logs", job_id, check=True).stdout
    for needle in (":c:worker(1,1): actor", "grid", "read", "write", "commit", "succeeded"):
        assert needle in log
    assert not leftovers(tmp_path / "out")


def corrupt_a_chunk(path):
    chunk = os.path.join(path, "c", "1", "0")
    with open(chunk, "wb") as f:
        f.write(b"definitely not zstd")


def test_failed_job_commits_nothing_and_keeps_the_old_output(tmp_path, rng, ray_session):
    a = rng.random((120, 90))
    write_dense(tmp_path / "A.zarr", a, chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    job = JOB.format(name="fail", backend="ray", workers=4)
    mx.submit(job, base=str(tmp_path))
    before = read_dense(tmp_path / "out/C.zarr")
    stamp = json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"]

    write_dense(tmp_path / "B.zarr", rng.random((90, 70)) + 1, chunks=(30, 30))
    corrupt_a_chunk(tmp_path / "A.zarr")
    with pytest.raises(JobFailed) as err:
        mx.submit(job, base=str(tmp_path))
    message = str(err.value)
    assert "read" in message and "worker" in message
    np.testing.assert_array_equal(read_dense(tmp_path / "out/C.zarr"), before)
    assert json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"] == stamp
    assert not leftovers(tmp_path / "out")
    failed = [j for j in os.listdir(os.path.join(os.environ["MX_HOME"], "jobs")) if j.startswith("fail")]
    states = sorted(mx.status(j)["state"] for j in failed)
    assert states == ["failed", "succeeded"]


def test_failure_on_local_backend_too(tmp_path, rng):
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    corrupt_a_chunk(tmp_path / "A.zarr")
    with pytest.raises(JobFailed):
        mx.submit(JOB.format(name="lf", backend="local", workers=4), base=str(tmp_path))
    assert not (tmp_path / "out").exists()  # the folder the job made for its output included


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_failed_job_removes_the_folders_it_made_for_its_output(tmp_path, rng, request, backend):
    """A failed job left behind the empty folders it had made for its output: an output that
    was not there before the job is not there after it, and neither are its new folders. The
    folder that was there before stays, empty as it was."""
    if backend == "ray":
        request.getfixturevalue("ray_session")
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    corrupt_a_chunk(tmp_path / "A.zarr")
    (tmp_path / "kept").mkdir()
    job = JOB.format(name="made", backend=backend, workers=2).replace("out/C.zarr",
                                                                       "kept/new/deeper/C.zarr")
    with pytest.raises(JobFailed):
        mx.submit(job, base=str(tmp_path))
    assert os.listdir(tmp_path / "kept") == []


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_cancel_a_detached_job(tmp_path, backend):
    n = 2600
    mx_cli("data", "random", tmp_path / "A.zarr", "--shape", f"{n},{n}", check=True)
    mx_cli("data", "random", tmp_path / "B.zarr", "--shape", f"{n},{n}", "--seed", "3", check=True)
    (tmp_path / "job.yaml").write_text(JOB.format(name="cx", backend=backend, workers=4))
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", check=True).stdout.strip()
    wait_for(lambda: mx.status(job_id)["steps"][0]["state"] == "running", "the step to start", 120)
    proc = mx_cli("cancel", job_id, check=True)
    assert "cancelled" in proc.stdout
    rec = mx.status(job_id)
    assert rec["state"] == "cancelled", rec
    assert not (tmp_path / "out").exists()  # the folder the job made for its output included
    pid = rec["pid"]
    wait_for(lambda: not _alive(pid), "the runner to exit", 30)
    assert "cancelled" in mx.logs(job_id)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_rerun_replaces_an_mx_output_only_when_complete(tmp_path, rng):
    a = rng.random((50, 40))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", rng.random((40, 30)))
    job = JOB.format(name="rr", backend="local", workers=1)
    mx.submit(job, base=str(tmp_path))
    b2 = rng.random((40, 30))
    write_dense(tmp_path / "B.zarr", b2)
    mx.submit(job, base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b2) < 1e-12
    assert not leftovers(tmp_path / "out")


def test_an_output_being_written_by_a_live_job_is_refused(tmp_path, rng):
    """A second job writing the same output is refused while the first one's process lives;
    once it is gone, its lock is stale: the next job takes it and removes the leftovers."""
    import socket
    import subprocess
    import sys

    from mx.errors import UserError

    a, b = rng.random((31, 17)), rng.random((17, 23))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    (tmp_path / "out").mkdir()
    lock = tmp_path / "out" / ".C.zarr.mx-lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"job": "other-job", "host": socket.gethostname(),
                                    "pid": other.pid}))
        job = JOB.format(name="lk", backend="local", workers=1)
        with pytest.raises(UserError, match="out/C.zarr is being written by job other-job"):
            mx.submit(job, base=str(tmp_path))
    finally:
        other.kill()
        other.wait()
    (tmp_path / "out" / ".C.zarr.mx-tmp-other-job").mkdir()  # what the dead job left
    mx.submit(job, base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
    assert not leftovers(tmp_path / "out") and not lock.exists()


def test_a_damaged_record_is_skipped_by_list_and_named_by_status(tmp_path, rng):
    from mx.tasks import record

    write_dense(tmp_path / "A.zarr", rng.random((9, 7)))
    write_dense(tmp_path / "B.zarr", rng.random((7, 5)))
    good = mx.submit(JOB.format(name="good", backend="local", workers=1), base=str(tmp_path))
    for text in ("[]", '{"id":', "{}"):
        bad = "zz-damaged-1"
        os.makedirs(os.path.dirname(record.path(bad, "record.json")), exist_ok=True)
        with open(record.path(bad, "record.json"), "w") as f:
            f.write(text)
        with open(record.path(bad, "log"), "w") as f:
            f.write("12:00:00 job zz-damaged-1: running\n")
        listing = mx_cli("list")
        assert listing.returncode == 0 and good in listing.stdout, listing.stderr
        for command in (["status"], ["logs"], ["report"], ["cancel"], ["submit", "--resume"]):
            result = mx_cli(*command, bad)
            assert result.returncode == 2, (text, command, result.stderr)
            assert "record" in result.stderr and "damaged" in result.stderr, (text, command)
            assert "Traceback" not in result.stderr, (text, command, result.stderr)


def test_reading_an_earlier_steps_output_by_path_is_named_as_such(tmp_path, rng):
    from mx.errors import UserError

    write_dense(tmp_path / "A.zarr", rng.random((9, 7)))
    write_dense(tmp_path / "B.zarr", rng.random((7, 7)))
    job = (JOB.format(name="chain", backend="local", workers=1) +
           "  - id: d\n    op: gemm\n    inputs: {a: out/C.zarr, b: B.zarr}\n    output: D.zarr\n")
    with pytest.raises(UserError, match="out/C.zarr is written by a step of this job; refer"):
        mx.submit(job, base=str(tmp_path))


def test_an_output_is_replaced_by_a_rerun_of_its_job_or_when_the_step_says_so(tmp_path, rng):
    from mx.errors import UserError

    a, b = rng.random((11, 7)), rng.random((7, 5))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    mx.submit(JOB.format(name="first", backend="local", workers=1), base=str(tmp_path))
    mx.submit(JOB.format(name="first", backend="local", workers=1), base=str(tmp_path))
    with pytest.raises(UserError, match=r"steps\[0\] \(id: c\).output: .*out/C.zarr was written by step 'c' "
                                        r"of job first-.*overwrite: true"):
        mx.submit(JOB.format(name="second", backend="local", workers=1), base=str(tmp_path))
    attrs = json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"]
    assert attrs["job_name"] == "first"
    mx.submit(JOB.format(name="second", backend="local", workers=1) + "    overwrite: true\n",
              base=str(tmp_path))
    attrs = json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"]
    assert attrs["job_name"] == "second"
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_task_that_raises_is_one_line_with_its_traceback_in_the_log(tmp_path, rng, request, backend):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    corrupt_a_chunk(tmp_path / "A.zarr")
    echoed = []
    with pytest.raises(JobFailed) as err:
        mx.submit(JOB.format(name="tb", backend=backend, workers=1), base=str(tmp_path),
                  echo=echoed.append)
    message = str(err.value)
    assert "\n" not in message and "task" in message and "read" in message, message
    assert not [line for line in echoed if "Traceback" in line or 'File "' in line], echoed
    job_id = message.split()[1]
    assert 'File "' in mx.logs(job_id)


def test_the_cli_prints_one_line_for_a_task_that_raises(tmp_path, rng):
    write_dense(tmp_path / "A.zarr", rng.random((120, 90)), chunks=(40, 90))
    write_dense(tmp_path / "B.zarr", rng.random((90, 70)))
    corrupt_a_chunk(tmp_path / "A.zarr")
    (tmp_path / "job.yaml").write_text(JOB.format(name="tb", backend="local", workers=1))
    proc = mx_cli("submit", tmp_path / "job.yaml")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mx: error: job tb-"), proc.stderr


def test_a_relative_base_is_recorded_absolute_so_a_resume_elsewhere_finds_the_inputs(
        tmp_path, rng, monkeypatch):
    """mx.submit(job, base=".") recorded "." as the base: a resume started in another folder
    then resolved the inputs and outputs against that folder."""
    from mx.tasks import jobs, record

    a, b = rng.random((23, 17)), rng.random((17, 11))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    monkeypatch.chdir(tmp_path)
    job_id = jobs.prepare(JOB.format(name="relbase", backend="local", workers=1), base=".")
    assert record.load(job_id)["base"] == str(tmp_path)
    record.update(job_id, record.load(job_id), state="failed")  # as if its runner had failed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    jobs.resume(job_id)
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
    assert not os.path.exists(elsewhere / "out")


@pytest.mark.parametrize("base", [5, "missing-folder", "A.zarr/zarr.json"])
def test_a_base_that_is_not_a_folder_is_one_line(tmp_path, rng, monkeypatch, base):
    from mx.errors import UserError

    write_dense(tmp_path / "A.zarr", rng.random((5, 4)))
    write_dense(tmp_path / "B.zarr", rng.random((4, 3)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="base"):
        mx.submit(JOB.format(name="badbase", backend="local", workers=1), base=base)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_an_mx_home_that_cannot_hold_records_is_one_line(tmp_path, rng, monkeypatch, where):
    """MX_HOME naming a file (or a folder below one) was a NotADirectoryError traceback."""
    write_dense(tmp_path / "A.zarr", rng.random((6, 5)))
    write_dense(tmp_path / "B.zarr", rng.random((5, 4)))
    (tmp_path / "job.yaml").write_text(JOB.format(name="home", backend="local", workers=1))
    (tmp_path / "a-file").write_text("not a folder\n")
    proc = mx_cli("submit", tmp_path / "job.yaml", env={"MX_HOME": str(tmp_path / where)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mx: error: MX_HOME=") and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("MX_HOME", str(tmp_path / where))
    from mx.errors import UserError
    with pytest.raises(UserError, match="MX_HOME"):
        mx.submit(JOB.format(name="home", backend="local", workers=1), base=str(tmp_path))


@pytest.mark.parametrize("call", ["status", "logs", "cancel", "wait"])
@pytest.mark.parametrize("job_id", [5, None, ""])
def test_the_python_api_names_a_job_id_that_is_not_one(tmp_path, rng, call, job_id):
    """mx.status(5) was a TypeError about str.startswith; mx.status("") named 'matches N jobs'."""
    from mx.errors import UserError

    write_dense(tmp_path / "A.zarr", rng.random((6, 5)))
    write_dense(tmp_path / "B.zarr", rng.random((5, 4)))
    mx.submit(JOB.format(name="ids", backend="local", workers=1), base=str(tmp_path))
    mx.submit(JOB.format(name="ids", backend="local", workers=1), base=str(tmp_path))
    with pytest.raises(UserError, match="give a job id"):
        getattr(mx, call)(job_id)


def test_a_dict_job_may_hold_paths_numpy_scalars_and_any_mapping(tmp_path, rng):
    """A dict job is written to YAML for its runner: a pathlib.Path, a NumPy scalar or an
    OrderedDict in it was a RepresenterError traceback."""
    from collections import OrderedDict
    from pathlib import Path

    from mx.errors import UserError
    from mx.tasks import record

    a, b = rng.random((31, 19)), rng.random((19, 13))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    job = OrderedDict(name="plain", backend="local", resources={"workers": np.int64(2)},
                      max_retries=np.int32(0),
                      steps=({"id": "c", "op": "gemm",
                              "inputs": {"a": tmp_path / "A.zarr", "b": Path("B.zarr")},
                              "output": Path("out") / "C.zarr",
                              "params": {"algorithm": np.str_("summa")}},))
    job_id = mx.submit(job, base=tmp_path)
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
    assert "workers: 2" in open(record.path(job_id, "job.yaml")).read()
    job["steps"][0]["params"]["extra"] = object()
    with pytest.raises(UserError, match=r"job\.steps\[0\]\.params\.extra: object values"):
        mx.submit(job, base=tmp_path)


def test_yaml_text_on_one_line_is_a_job_not_a_missing_file(tmp_path, rng):
    """mx.submit("{name: ..., steps: [...]}") said "no such job file"."""
    from mx.errors import UserError

    a, b = rng.random((14, 9)), rng.random((9, 5))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    mx.submit("{name: flow, backend: local, resources: {workers: 1}, steps: [{id: c, op: gemm, "
              "inputs: {a: A.zarr, b: B.zarr}, output: out/C.zarr}]}", base=str(tmp_path))
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
    with pytest.raises(UserError, match="steps"):
        mx.submit("{name: flow, backend: local}", base=str(tmp_path))
    with pytest.raises(UserError, match="no such job file"):
        mx.submit(str(tmp_path / "missing.yaml"))


def test_wait_and_cancel_return_a_lost_or_rank_failed_job_as_status_does(tmp_path, rng):
    """mx.wait and mx.cancel returned the bare record: "running" for a job whose runner had
    died, and no error for one an MPI rank had marked failed."""
    import subprocess
    import sys

    from mx.tasks import jobs, record

    write_dense(tmp_path / "A.zarr", rng.random((8, 6)))
    write_dense(tmp_path / "B.zarr", rng.random((6, 4)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for mark in (None, "rank 1: task ('read-a', 'c', 0, 0) on worker 1 failed: boom"):
        job_id = jobs.prepare(JOB.format(name="died", backend="local", workers=1),
                              base=str(tmp_path))
        rec = record.load(job_id)
        rec["steps"][0]["state"] = "running"  # what a runner killed mid-step leaves
        record.update(job_id, rec, state="running", pid=dead.pid)
        if mark:
            record.mark_failed(job_id, mark)
        want = "failed" if mark else "lost"
        for got in (mx.wait(job_id, timeout=10), mx.status(job_id)):
            assert got["state"] == want and got["steps"][0]["state"] == want, got
            assert got["error"] == (mark or "its runner ended without recording an end")
        if not mark:  # a failed job is not cancelled (UserError); a lost one is, as it stands
            assert mx.cancel(job_id, timeout=5)["state"] == "lost"


def test_unnamed_jobs_replace_only_their_own_outputs(tmp_path, rng):
    """Every unnamed job (a dict, YAML text without name:) was named "job": two different ones
    replaced each other's outputs without a word. A rerun of one, with other params, still
    replaces its own."""
    from mx.errors import UserError

    a, b = rng.random((11, 7)), rng.random((7, 5))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)

    def job(step_id, **params):
        return {"backend": "local", "resources": {"workers": 1},
                "steps": [{"id": step_id, "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                           "output": "out/C.zarr", "params": params}]}

    first = mx.submit(job("c"), base=str(tmp_path))
    assert re.fullmatch(r"job-[0-9a-f]{8}", mx.status(first)["name"]), first
    again = mx.submit(job("c", algorithm="summa"), base=str(tmp_path))
    assert mx.status(again)["name"] == mx.status(first)["name"]
    with pytest.raises(UserError, match=r"out/C.zarr was written by step 'c' of job job-.*"
                                        r"overwrite: true"):
        mx.submit(job("other"), base=str(tmp_path))
    text = "{backend: local, steps: [{id: c2, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: out/C.zarr}]}"
    with pytest.raises(UserError, match="overwrite: true"):
        mx.submit(text, base=str(tmp_path))
    attrs = json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"]
    assert attrs["job"] == again
    overwrite = job("other")
    overwrite["steps"][0]["overwrite"] = True
    replaced = mx.submit(overwrite, base=str(tmp_path))
    attrs = json.load(open(tmp_path / "out/C.zarr/zarr.json"))["attributes"]["mx"]
    assert attrs["job"] == replaced and attrs["job_name"] != mx.status(first)["name"]
    assert rel_error(read_dense(tmp_path / "out/C.zarr"), a @ b) < 1e-12
