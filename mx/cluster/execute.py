"""Running one task where its data lives: shared by every backend's workers.

A worker keeps the results it produced in a ``store`` (key -> value), runs a task from its
graph node and the values of its dependencies, and returns a small ``info`` record (where,
when, how long, per-phase timings of gang programs) that the driver logs and aggregates.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from mx.cluster.comm import GangContext
from mx.errors import JobCancelled, JobFailed, WorkerLost, first_line
from mx.tasks.graph import Key, comm_key


class TaskError(JobFailed):
    """A task raised: one line that says where and why; the short traceback (``trace``) is
    for the job's log."""

    def __init__(self, key: Key, worker: int, cause: BaseException):
        self.key, self.worker = key, worker
        self.cause = f"{type(cause).__name__}: {first_line(cause)}"
        self.trace = "".join(traceback.format_exception(cause)[-6:])
        # a fault the step may be retried for (a device's wrong result), not a bug or bad data
        self.retryable = isinstance(cause, WorkerLost)
        super().__init__(f"task {key!r} on worker {worker} failed: {self.cause}")

    def __reduce__(self):
        return _rebuild_task_error, (self.key, self.worker, self.cause, self.trace, self.retryable)


def _rebuild_task_error(key, worker, cause, trace, retryable=False):
    err = TaskError.__new__(TaskError)
    err.key, err.worker, err.cause, err.trace, err.retryable = key, worker, cause, trace, retryable
    JobFailed.__init__(err, f"task {key!r} on worker {worker} failed: {cause}")
    return err


def run(key: Key, node, values: dict, worker: int, label: str | None,
        gang: GangContext | None = None, gang_name: str | None = None) -> tuple[Any, dict]:
    """Run ``node`` on ``values`` (a gang member also gets its context); returns (value, info)."""
    if gang is not None:
        values = {**values, comm_key(gang_name): gang}
    start_wall, start = time.time(), time.perf_counter()
    try:
        value = node(values)
    except (JobCancelled, KeyboardInterrupt):
        raise  # a cancel (SIGTERM in an MPI rank, Ctrl-C) stops the task; it is no task failure
    except BaseException as exc:
        raise TaskError(key, worker, exc) from exc
    info = {"key": key, "worker": worker, "label": label, "start": start_wall,
            "seconds": time.perf_counter() - start,
            "stats": dict(gang.stats) if gang is not None else {},
            "counters": dict(gang.counters) if gang is not None else {}}
    return value, info


def describe_process(rank: int, device: str) -> dict:
    """Where a worker runs, for the job log."""
    return {"worker": rank, "pid": os.getpid(), "host": socket.gethostname(), "device": device}
