"""The service on a real local Ray head (`mx cluster up`): jobs through Ray's Jobs API, named
actors and metrics, worker deaths (retry or clean failure), cancel, many jobs at once, and
resuming a job whose driver died.

Everything that talks to the cluster runs in subprocesses, as users' commands do: the test
process keeps its own Ray (``ray_session``) for other tests, and a process joins one Ray only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import zarr

from conftest import mx_cli, read_dense, rel_error, wait_for, write_dense
from mx.cluster.head import free_port
from mx.storage import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A persistent head with 4 logical CPUs, its own MX_HOME; stopped (and checked gone)."""
    home = tmp_path_factory.mktemp("cluster-home")
    # metrics reach the node's endpoint every second instead of every ten
    env = {"MX_HOME": str(home), "RAY_ADDRESS": "", "RAY_metrics_report_interval_ms": "1000"}
    port = free_port()
    up = mx_cli("cluster", "up", "--num-cpus", 4, "--dashboard-port", port, env=env, check=True)
    info = json.loads((home / "cluster" / "head.json").read_text())
    assert up.stdout.strip() == info["dashboard"] == f"http://127.0.0.1:{port}"
    assert oct(os.stat(info["token"]).st_mode & 0o777) == "0o600"
    yield {**info, "env": env, "home": home}
    mx_cli("cluster", "down", env=env, check=True)
    deadline = time.monotonic() + 30
    while _processes(f"--gcs-address={info['address']}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes(f"--gcs-address={info['address']}"), "the head's processes outlived down"
    assert mx_cli("cluster", "status", env=env).returncode == 1


def _processes(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


def query(head, code: str):
    """Run ``code`` (which sets ``result``) in a process joined to the head; its JSON result."""
    script = ("import json, ray\n"
              f"ray.init(address={head['address']!r}, logging_level='ERROR', log_to_driver=False)\n"
              "from ray.util.state import list_actors, list_placement_groups\n"
              f"{code}\nprint('RESULT', json.dumps(result))\n")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head["token"]}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def live_actors(head, job_id: str) -> list[str]:
    return query(head, "result = [a.name for a in list_actors(filters=[('state', '=', 'ALIVE')]) "
                       f"if (a.name or '').startswith('mx:{job_id}')]")


def gemm_job(folder, rng, m, k, n, name="gemm", workers=4, **extra):
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    write_dense(folder / "A.zarr", a)
    write_dense(folder / "B.zarr", b)
    job = {"name": name, "resources": {"workers": workers},
           "steps": [{"id": "c", "op": "gemm", "inputs": {"a": "A.zarr", "b": "B.zarr"},
                      "output": "C.zarr"}], **extra}
    import yaml

    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return a @ b


def complete_job(folder, name="fit", max_iters=40, method="als", shape=(1500, 1200),
                 condition=30.0, **extra):
    generate.lowrank(str(folder / "O.zarr"), shape, 12, 0.05, condition=condition, seed=4)
    (folder / "job.yaml").write_text(
        f"name: {name}\nresources: {{workers: 2}}\n" +
        "".join(f"{k}: {v}\n" for k, v in extra.items()) +
        "steps:\n  - id: f\n    op: complete\n    inputs: {observed: O.zarr}\n"
        f"    output: F.zarr\n    params: {{rank: 12, method: {method}, tol: 1.0e-14, "
        f"max_iters: {max_iters}}}\n")


def record(head, job_id: str) -> dict:
    return json.loads((head["home"] / "jobs" / job_id / "record.json").read_text())


def checkpoint_sweeps(folder) -> int:
    try:
        return int(zarr.open_group(str(folder / ".F.zarr.mx-checkpoint"), mode="r")
                   .attrs.get("iteration", 0))
    except Exception:
        return 0


def metric(port: int, name: str, job_id: str) -> float | None:
    """A gauge's value for a job on a node's Prometheus endpoint (None while not exported)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'job="{job_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_job_submitted_to_the_head_runs_there_and_shows_in_its_job_list(head, tmp_path, rng):
    want = gemm_job(tmp_path, rng, 2401, 1999, 2203)
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    # progress as Ray metrics on the node's Prometheus endpoint, while the job runs
    port = query(head, "result = ray.nodes()[0]['MetricsExportPort']")

    def exported():
        values = {name: metric(port, name, job_id) for name in
                  ("ray_mx_blocks_done", "ray_mx_blocks_total", "ray_mx_flops_per_second")}
        return values if None not in values.values() else None

    values = wait_for(exported, "mx metrics on the Prometheus endpoint", 120)
    assert 0 <= values["ray_mx_blocks_done"] <= values["ray_mx_blocks_total"] > 0
    assert values["ray_mx_flops_per_second"] >= 0
    followed = mx_cli("logs", "-f", job_id, env=head["env"], check=True).stdout
    assert "dashboard's Jobs page" in followed and "succeeded" in followed
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    # Ray's own job list has it, under mx's id, finished (its driver may still be exiting)
    ray_state = lambda: query(head, "from ray.job_submission import JobSubmissionClient\n"  # noqa: E731
                                    f"c = JobSubmissionClient({head['dashboard']!r})\n"
                                    f"result = str(c.get_job_status({job_id!r}).value)")
    assert ray_state() in ("RUNNING", "SUCCEEDED")
    wait_for(lambda: ray_state() == "SUCCEEDED", "Ray to see the job succeed", 60)
    listing = mx_cli("list", "--address", head["dashboard"], env=head["env"], check=True).stdout
    assert job_id in listing and "succeeded" in listing and head["dashboard"] in listing
    status = mx_cli("status", job_id, env=head["env"], check=True).stdout
    assert "state    succeeded" in status and f"cluster  {head['dashboard']}" in status
    # actors named for what they do, all gone after the job
    for name in ("worker(0,0)", "worker(0,1)", "worker(1,0)", "worker(1,1)"):
        assert f"mx:{job_id}:c:{name}: actor" in followed
    names = query(head, f"result = [a.name for a in list_actors() if (a.name or '').startswith('mx:{job_id}')]")
    assert sorted(n.rsplit(":", 1)[1] for n in names if "worker" in n) == \
        ["worker(0,0)", "worker(0,1)", "worker(1,0)", "worker(1,1)"]
    assert live_actors(head, job_id) == []


def test_a_killed_worker_is_replaced_and_the_step_resumes_from_its_checkpoint(head, tmp_path):
    complete_job(tmp_path, max_retries=2)
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    wait_for(lambda: checkpoint_sweeps(tmp_path) >= 2, "two sweeps checkpointed")

    def kill_worker_1():
        # Ray's state API can lag behind the processes on a loaded machine: a listed pid may
        # already be gone, so look again until one is killed
        found = query(head, "result = [(a.name, a.pid) for a in list_actors(filters=[('state', "
                            f"'=', 'ALIVE')]) if (a.name or '').startswith('mx:{job_id}:f:worker(1)')]")
        assert len(found) <= 1, found
        try:
            os.kill(found[0][1], signal.SIGKILL)
        except (IndexError, ProcessLookupError):
            return None
        return found

    victim = wait_for(kill_worker_1, "worker(1) to be killed", 30)
    rec = wait_for(lambda: (r := record(head, job_id))["state"] in ("succeeded", "failed") and r,
                   "the job to end")
    log = mx_cli("logs", job_id, env=head["env"], check=True).stdout
    assert rec["state"] == "succeeded", log
    assert f"worker mx:{job_id}:f:worker(1) (pid {victim[0][1]}" in log and "retry 1 of 2" in log
    assert f"mx:{job_id}:f.retry1:worker(1): actor" in log and "resumed-at-sweep" in log
    history = zarr.open_group(str(tmp_path / "F.zarr"), mode="r").attrs["history"]
    assert history[-1]["holdout_rel_error"] < 1e-6
    assert live_actors(head, job_id) == []


@pytest.mark.parametrize("retries", [0, 1])
def test_a_killed_gemm_worker_is_retried_or_fails_cleanly(head, tmp_path, rng, retries):
    want = gemm_job(tmp_path, rng, 2000, 1900, 2100, name=f"kill{retries}", max_retries=retries)
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    log = head["home"] / "jobs" / job_id / "log"
    pattern = re.compile(rf"mx:{re.escape(job_id)}:c:worker\(1,0\): actor \w+ pid (\d+)")
    victim = wait_for(lambda: log.exists() and pattern.search(log.read_text()), "the worker to start")
    os.kill(int(victim.group(1)), signal.SIGKILL)
    rec = wait_for(lambda: (r := record(head, job_id))["state"] in ("succeeded", "failed") and r,
                   "the job to end")
    if retries:
        assert rec["state"] == "succeeded", log.read_text()
        assert "retry 1 of 1" in log.read_text()
        assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    else:
        assert rec["state"] == "failed"
        assert f"mx:{job_id}:c:worker(1,0) (pid {victim.group(1)}" in rec["error"]
        assert "max_retries 0" in rec["error"]
        assert not (tmp_path / "C.zarr").exists()
    assert [e for e in os.listdir(tmp_path) if ".mx-tmp-" in e] == []
    assert live_actors(head, job_id) == []


def test_cancel_stops_every_actor_and_gives_the_resources_back(head, tmp_path):
    # a slow one: ill-conditioned, with a few CG steps per row
    complete_job(tmp_path, name="cancelme", max_iters=400, method="als-cg", shape=(3000, 2500),
                 condition=1000.0)
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    wait_for(lambda: checkpoint_sweeps(tmp_path) >= 1, "a sweep")
    assert len(live_actors(head, job_id)) == 3  # two workers and the rendezvous
    # the sweep and held-out error as Ray metrics, while it runs
    port = query(head, "result = ray.nodes()[0]['MetricsExportPort']")
    wait_for(lambda: metric(port, "ray_mx_iteration", job_id), "the iteration metric", 90)
    assert 0 < metric(port, "ray_mx_holdout_error", job_id) < 10
    out = mx_cli("cancel", job_id, env=head["env"], check=True).stdout
    assert "cancelled" in out
    assert not (tmp_path / "F.zarr").exists()
    assert live_actors(head, job_id) == []
    groups = query(head, "result = [g.state for g in list_placement_groups() "
                         f"if g.name.startswith('mx:{job_id}')]")
    assert groups and set(groups) == {"REMOVED"}
    free = query(head, "import time; time.sleep(1); result = ray.available_resources().get('CPU', 0)")
    assert free == 4


def test_five_jobs_at_once_share_the_head_and_all_finish(head, tmp_path, rng):
    wants, ids = [], []
    for i in range(5):
        folder = tmp_path / f"j{i}"
        folder.mkdir()
        wants.append(gemm_job(folder, rng, 200 + 37 * i, 150 + 11 * i, 180 - 13 * i,
                              name=f"many{i}", workers=2 + i % 2))
        ids.append(mx_cli("submit", "--detach", folder / "job.yaml", "--address",
                          head["dashboard"], env=head["env"], check=True).stdout.strip())
    for job_id in ids:
        wait_for(lambda: record(head, job_id)["state"] in ("succeeded", "failed", "cancelled"),
                 f"job {job_id}", 400)
    for i, job_id in enumerate(ids):
        assert record(head, job_id)["state"] == "succeeded", \
            mx_cli("logs", job_id, env=head["env"]).stdout
        assert rel_error(read_dense(tmp_path / f"j{i}" / "C.zarr"), wants[i]) < 1e-12
        assert live_actors(head, job_id) == []


def test_a_job_whose_driver_died_resumes_where_it_was(tmp_path, rng):
    a, b = rng.standard_normal((97, 61)), rng.standard_normal((61, 83))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    generate.lowrank(str(tmp_path / "O.zarr"), (1500, 1200), 12, 0.05, condition=30.0, seed=4)
    (tmp_path / "job.yaml").write_text(
        "name: two\nbackend: local\nresources: {workers: 2}\nsteps:\n"
        "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n"
        "  - id: f\n    op: complete\n    inputs: {observed: O.zarr}\n    output: F.zarr\n"
        "    params: {rank: 12, method: als, tol: 1.0e-14, max_iters: 30}\n")
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", check=True).stdout.strip()
    wait_for(lambda: checkpoint_sweeps(tmp_path) >= 2, "two sweeps checkpointed")
    home = os.environ["MX_HOME"]
    rec = json.loads(open(os.path.join(home, "jobs", job_id, "record.json")).read())
    os.kill(rec["pid"], signal.SIGKILL)
    wait_for(lambda: "lost" in mx_cli("status", job_id).stdout, "the job to read lost", 30)
    c_stamp = zarr.open_array(str(tmp_path / "C.zarr"), mode="r").attrs["mx"]

    bad = mx_cli("submit", "--resume", "no-such-job")
    assert bad.returncode == 2 and "no job matches" in bad.stderr
    resumed = mx_cli("submit", "--resume", job_id[:12], check=True)
    assert resumed.stdout.strip() == job_id
    log = mx_cli("logs", job_id, check=True).stdout
    assert "step c: kept" in log and "resumed-at-sweep" in log and "resumed (was lost)" in log
    assert zarr.open_array(str(tmp_path / "C.zarr"), mode="r").attrs["mx"] == c_stamp
    assert rel_error(read_dense(tmp_path / "C.zarr"), a @ b) < 1e-12
    history = zarr.open_group(str(tmp_path / "F.zarr"), mode="r").attrs["history"]
    assert len(history) >= 3 and history[-1]["holdout_rel_error"] < 1e-6
    again = mx_cli("submit", "--resume", job_id)
    assert again.returncode == 2 and "only a failed, cancelled or lost job" in again.stderr


def test_a_cluster_job_whose_driver_died_resumes_as_a_new_ray_job(head, tmp_path):
    complete_job(tmp_path, name="driverdies", max_iters=30)
    env = {**head["env"], "RAY_ADDRESS": head["dashboard"]}  # the address as Ray users give it
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", env=env, check=True).stdout.strip()
    wait_for(lambda: checkpoint_sweeps(tmp_path) >= 2, "two sweeps checkpointed")
    os.kill(record(head, job_id)["pid"], signal.SIGKILL)
    wait_for(lambda: "state    lost" in mx_cli("status", job_id, env=head["env"]).stdout,
             "the job to read lost", 60)
    resumed = mx_cli("submit", "--resume", job_id, env=head["env"], check=True)
    assert resumed.stdout.strip() == job_id
    rec = record(head, job_id)
    assert rec["state"] == "succeeded" and rec["cluster"]["ray_job"] == f"{job_id}-resume1"
    log = mx_cli("logs", job_id, env=head["env"], check=True).stdout
    assert "resumed (was lost)" in log and "resumed-at-sweep" in log
    ray_jobs = query(head, "from ray.job_submission import JobSubmissionClient\n"
                           f"c = JobSubmissionClient({head['dashboard']!r})\n"
                           "result = {j.submission_id: str(j.status.value) for j in c.list_jobs()}")
    assert ray_jobs[f"{job_id}-resume1"] == "SUCCEEDED" and ray_jobs[job_id] in ("FAILED", "STOPPED")
    history = zarr.open_group(str(tmp_path / "F.zarr"), mode="r").attrs["history"]
    assert history[-1]["holdout_rel_error"] < 1e-6
    assert live_actors(head, job_id) == []


def test_a_diffuse_job_on_the_head_reports_its_step_and_its_picture(head, tmp_path):
    steps = 150
    (tmp_path / "job.yaml").write_text(
        "name: picture\nresources: {workers: 2}\nsteps:\n"
        "  - id: img\n    op: diffuse\n    inputs: {model: builtin:dit-tiny}\n"
        f"    output: img.zarr\n    params: {{height: 48, width: 40, steps: {steps}, seed: 3,\n"
        "             parallel: {mode: distrifusion, patches: 2, warmup: 2}}\n")
    job_id = mx_cli("submit", "--detach", tmp_path / "job.yaml", "--address", head["dashboard"],
                    env=head["env"], check=True).stdout.strip()
    # the denoising step as a Ray metric on the node's endpoint, while the job runs
    port = query(head, "result = ray.nodes()[0]['MetricsExportPort']")
    seen = wait_for(lambda: metric(port, "ray_mx_denoising_step", job_id),
                    "the denoising-step metric", 120)
    assert 1 <= seen <= steps
    wait_for(lambda: record(head, job_id)["state"] in ("succeeded", "failed", "cancelled"),
             f"job {job_id}", 300)
    assert record(head, job_id)["state"] == "succeeded", \
        mx_cli("logs", job_id, env=head["env"]).stdout
    assert sorted(n.rsplit(":", 1)[1] for n in query(
        head, f"result = [a.name for a in list_actors() if (a.name or '').startswith('mx:{job_id}:img:worker')]")) \
        == ["worker(0)", "worker(1)"]
    assert live_actors(head, job_id) == []
    # the image (Zarr + PNG beside it) and the report's picture of it
    picture = zarr.open_array(str(tmp_path / "img.zarr"), mode="r")
    assert picture.shape == (3, 48, 40) and float(picture[:].std()) > 0.01
    assert (tmp_path / "img.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = mx_cli("report", job_id, "--out", tmp_path / "report", env=head["env"],
                   check=True).stdout.split()
    assert [os.path.basename(p) for p in paths] == \
        ["img-timeline.png", "img-image.png", "img-steps.png", "index.html"]


@pytest.mark.parametrize("resources,needles", [
    ("{workers: 1, cpus_per_worker: 5}", ["cpus_per_worker", "5 CPUs", "has 4", "at most 4"]),
    ("{workers: 2, cpus_per_worker: 3}", ["2 workers", "3 CPUs", "4 CPUs", "at most 2"]),
    ("{gpus: 1}", ["resources.gpus", "1 asked for", "0 GPUs", "gpus: 0"]),
])
def test_a_job_larger_than_the_cluster_is_refused_before_it_is_sent(head, tmp_path, rng,
                                                                    resources, needles):
    write_dense(tmp_path / "A.zarr", rng.random((9, 9)))
    (tmp_path / "job.yaml").write_text(
        f"resources: {resources}\nsteps:\n"
        "  - {id: c, op: gemm, inputs: {a: A.zarr, b: A.zarr}, output: C.zarr}\n")
    proc = mx_cli("submit", tmp_path / "job.yaml", "--address", head["dashboard"], env=head["env"])
    message = proc.stderr.strip()
    assert proc.returncode == 2 and message.startswith("mx: error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    jobs = head["home"] / "jobs"
    recorded = [j for j in (os.listdir(jobs) if jobs.exists() else [])
                if json.loads((jobs / j / "record.json").read_text()).get("job_file") ==
                str(tmp_path / "job.yaml")]
    assert recorded == []
