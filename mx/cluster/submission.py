"""Jobs sent to a running Ray cluster through Ray's Jobs API, so they show on its dashboard.

The cluster runs ``python -m mx.cli.main run --job-id <id>`` as the job's driver (Ray's
submission id is mx's job id, with ``-resume<n>`` for a resumed run). The driver keeps mx's record, log and outputs, so the cluster
must see the same files as the submitter: ``$MX_HOME`` and the job's data on a filesystem
both share (the same machine, or a shared filesystem on a real cluster). The Jobs API is
asked only what the record cannot say: whether the driver still lives, and to stop it.
"""

from __future__ import annotations

import functools
import time

from mx.cluster import head
from mx.errors import UserError, first_line
from mx.tasks import record

# Ray's job states that mean the driver is gone
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


@functools.lru_cache(maxsize=8)
def client(address: str):
    """A Jobs API client for ``address`` (a dashboard URL http://host:8265, or a GCS
    address host:port, which Ray maps to its dashboard); one per address, since making one
    asks the cluster for its version (the relay polls the job's state several times a second)."""
    from ray.job_submission import JobSubmissionClient

    head.use_auth(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {first_line(exc)}; "
                        f"is it up (`mx cluster up`, `ray status`)? is its token set "
                        f"(RAY_AUTH_TOKEN_PATH)?") from None


def nodes(address: str, timeout: float = 10.0) -> list[dict] | None:
    """The resources of each live node of the cluster (CPU, GPU, ...), asked through its
    dashboard; None when it cannot be asked. A head that has just started lists no nodes for
    a second or so; that is waited for up to ``timeout`` seconds."""
    head.use_auth(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            from ray.util.state import list_nodes

            found = list_nodes(address=address, timeout=30, raise_on_missing_output=False)
        except Exception:
            return None
        alive = [dict(n.resources_total) for n in found if n.state == "ALIVE"]
        if alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def submit(address: str, job_id: str, name: str, ray_id: str, timeout: float = 60.0) -> str:
    """Hand the job to the cluster. A head that has just started may not have its job agent
    yet; that is retried for ``timeout`` seconds."""
    entrypoint = f"python -m mx.cli.main run --job-id {job_id}"
    jobs_api = client(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return jobs_api.submit_job(
                entrypoint=entrypoint, submission_id=ray_id,
                runtime_env={"env_vars": {"MX_HOME": record.home()}},
                metadata={"mx_job": job_id, "mx_name": name})
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def status(address: str, job_id: str) -> str | None:
    """Ray's state of the job's driver (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), or
    None when the cluster cannot be asked."""
    try:
        return str(client(address).get_job_status(job_id).value)
    except Exception:
        return None


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def list_jobs(address: str) -> list[dict]:
    """The cluster's jobs that mx submitted: submission id, Ray state, start time."""
    jobs = []
    for info in client(address).list_jobs():
        if (info.metadata or {}).get("mx_job"):
            jobs.append({"id": info.metadata["mx_job"], "ray_job": info.submission_id,
                         "ray_state": str(info.status.value),
                         "name": info.metadata.get("mx_name", ""),
                         "message": info.message or ""})
    return jobs
