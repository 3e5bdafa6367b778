"""Job records: one folder per job under ``$MX_HOME/jobs`` (default ``~/.mx/jobs``).

``<id>/record.json`` holds the job's state, timings and progress (plain JSON, rewritten
atomically by the process that runs the job and by nobody else); ``<id>/log`` is the job's log;
``<id>/job.yaml`` the job file as submitted; ``<id>/cancel`` appears when someone asks to cancel.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import socket
import time

from mx.errors import UserError
from mx.storage.commit import alive

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


def home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("MX_HOME") or "~/.mx"))


def jobs_dir() -> str:
    return os.path.join(home(), "jobs")


def job_dir(job_id: str) -> str:
    return os.path.join(jobs_dir(), job_id)


def path(job_id: str, name: str) -> str:
    return os.path.join(job_dir(job_id), name)


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def new_id(name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def create(job_id: str, record: dict, job_text: str) -> dict:
    try:
        os.makedirs(job_dir(job_id), exist_ok=False)
    except FileExistsError:
        raise  # a job id is never reused: a bug, not the user's MX_HOME
    except OSError as exc:  # MX_HOME names a file, or a place this user cannot write
        raise UserError(f"MX_HOME={home()}: cannot keep job records there ({exc.strerror}); "
                        f"set MX_HOME to a folder you can write, or unset it for ~/.mx") from None
    with open(path(job_id, "job.yaml"), "w") as f:
        f.write(job_text)
    record = {"id": job_id, "state": "queued", "created": now(), "host": socket.gethostname(),
              **record}
    write(job_id, record)
    return record


def write(job_id: str, record: dict) -> None:
    tmp = path(job_id, f".record.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path(job_id, "record.json"))


def load(job_id: str) -> dict:
    file = path(job_id, "record.json")
    try:
        with open(file) as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no job {job_id!r} under {jobs_dir()}; `mx list` shows the jobs") from None
    except ValueError as exc:
        raise UserError(f"job {job_id}: its record {file} is damaged ({exc}); remove that "
                        f"job's folder") from None
    if not isinstance(rec, dict):
        raise UserError(f"job {job_id}: its record {file} is damaged (not a JSON object); "
                        f"remove that job's folder")
    missing = [key for key in ("id", "state", "steps") if key not in rec]
    if missing:  # every record is written whole with these (``create``)
        raise UserError(f"job {job_id}: its record {file} is damaged (no '{missing[0]}'); "
                        f"remove that job's folder")
    return rec


def update(job_id: str, record: dict, **fields) -> dict:
    record.update(fields)
    write(job_id, record)
    return record


def find(prefix: str) -> str:
    """The job id that ``prefix`` names (a full id or a unique prefix)."""
    if not isinstance(prefix, str) or not prefix:
        # mx.status(None), mx.logs(5): a TypeError from str.startswith named nothing useful,
        # and "" was a prefix of every job
        raise UserError(f"job {prefix!r}: give a job id (or a unique prefix of one) as a "
                        f"non-empty str; `mx list` shows the jobs")
    ids = all_ids()
    if prefix in ids:
        return prefix
    matches = [i for i in ids if i.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no job matches {prefix!r}; `mx list` shows the jobs (MX_HOME={home()})")
    raise UserError(f"{prefix!r} matches {len(matches)} jobs ({', '.join(matches[:3])}, ...); "
                    f"give more of the id")


def all_ids() -> list[str]:
    if not os.path.isdir(jobs_dir()):
        return []
    return sorted(d for d in os.listdir(jobs_dir())
                  if os.path.isfile(os.path.join(jobs_dir(), d, "record.json")))


def effective_state(record: dict) -> str:
    """The recorded state; 'failed' when a rank left a failure mark; 'lost' for a live state
    whose runner process is gone."""
    state = record.get("state", "?")
    if state in FINAL:
        return state
    if record.get("id") and os.path.exists(path(record["id"], "failed")):
        return "failed"
    if record.get("host") != socket.gethostname():
        return state
    pid = record.get("pid")
    if pid and not alive(pid):
        return "lost"
    return state


DETAIL = "| "  # begins the log lines that only the log shows (tracebacks), never echoed


class Log:
    """Appends timestamped lines to a job's log; optionally echoes them."""

    def __init__(self, job_id: str, echo=None):
        self.file = path(job_id, "log")
        self.echo = echo

    def __call__(self, line: str) -> None:
        self._write(str(line).splitlines() or [""])
        if self.echo is not None:
            self.echo(line)

    def detail(self, text: str) -> None:
        """Lines for the log only (a traceback): the one-line error is what users see."""
        self._write([DETAIL + part for part in str(text).rstrip().splitlines()])

    def _write(self, lines: list[str]) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(self.file, "a") as f:
            for part in lines:
                f.write(f"{stamp} {part}\n")


def mark_failed(job_id: str, message: str) -> None:
    """Leave a failure mark (a rank that cannot reach the driver ends the job this way)."""
    with open(path(job_id, "failed"), "a") as f:
        f.write(message.rstrip() + "\n")


def failure(job_id: str) -> str | None:
    """The first failure a rank marked, on one line (the other ranks' are often its echoes)."""
    try:
        with open(path(job_id, "failed")) as f:
            lines = f.read().strip().splitlines()
    except FileNotFoundError:
        return None
    if not lines:
        return None
    more = len(lines) - 1
    return lines[0] + (f" (and {more} more rank{'s' if more > 1 else ''}; see the log)" if more else "")


def request_cancel(job_id: str) -> None:
    with open(path(job_id, "cancel"), "w") as f:
        f.write(now() + "\n")


def cancel_requested(job_id: str) -> bool:
    return os.path.exists(path(job_id, "cancel"))
