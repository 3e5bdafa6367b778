"""The two kinds of failure mx reports.

A ``UserError`` is bad input (job file, data, command line): one line that names the problem
and the fix, exit code 2, nothing written. Anything else that goes wrong while a job runs is a
``JobFailed`` (exit code 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the field or file and what to do about it."""


class JobFailed(Exception):
    """A job ran and failed (a task raised, a worker died)."""


class JobCancelled(Exception):
    """A job was cancelled while it ran."""


class WorkerLost(JobFailed):
    """A worker's process died mid-step: the step may be retried from what is stored."""


class DeviceFault(WorkerLost):
    """A device computed a wrong result that could not be repaired where it was found (ABFT
    checksums disagree): like a lost worker, the step may be retried from what is stored."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
