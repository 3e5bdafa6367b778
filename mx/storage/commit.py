"""Atomic outputs: write under a temporary name beside the target, rename when complete.

A job's output is first created as ``<dir>/.<name>.mx-tmp-<job>``; only when every block is
written does ``commit`` rename it to ``<dir>/<name>``. A failed or cancelled job removes its
temporary; one killed outright leaves a dot-named temporary that never looks like the output
(``sweep_stale`` removes such leftovers). An existing output is replaced only after the new
one is complete, and only if mx wrote it: mx never overwrites a file it did not create.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil

from mx.errors import UserError

TMP_TAG = ".mx-tmp-"
OLD_TAG = ".mx-old-"


def temp_path(output: str, job_id: str) -> str:
    head, name = os.path.split(os.path.abspath(output))
    return os.path.join(head, f".{name}{TMP_TAG}{job_id}")


def _mx_written(path: str) -> bool:
    """True if ``path`` is a Zarr node whose attributes carry mx's commit record."""
    meta = os.path.join(path, "zarr.json")
    try:
        with open(meta) as f:
            return "mx" in json.load(f).get("attributes", {})
    except (OSError, ValueError):
        return False


def check_writable(output: str, what: str) -> None:
    """Refuse an output path that holds something mx did not write (checked before a job runs)."""
    if os.path.lexists(output) and not _mx_written(output):
        raise UserError(f"{what}: {output} already exists and was not written by mx; remove "
                        f"it or choose another output path (mx only replaces its own outputs)")
    parent = os.path.dirname(os.path.abspath(output))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UserError(f"{what}: cannot create {output}: {probe} is not a writable folder")


def begin(output: str, job_id: str) -> str:
    """Make room for a new temporary output and return its path."""
    tmp = temp_path(output, job_id)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    return tmp


def stamp(record: dict) -> dict:
    """The ``mx`` attribute stored in every committed output."""
    return {**record, "committed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def commit(tmp: str, output: str, job_id: str, force: bool = False) -> None:
    """Move a complete temporary output into place, replacing an older mx output.

    ``force`` replaces whatever is at ``output`` (the user asked for it, e.g. ``--overwrite``).
    """
    output = os.path.abspath(output)
    old = None
    if os.path.lexists(output):
        if not force and not _mx_written(output):
            raise UserError(f"{output} appeared while the job ran and was not written by mx; "
                            f"the result is kept at {tmp}")
        head, name = os.path.split(output)
        old = os.path.join(head, f".{name}{OLD_TAG}{job_id}")
        os.rename(output, old)
    os.rename(tmp, output)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def abort(tmp: str) -> None:
    """Remove a temporary output after a failure or a cancel."""
    if os.path.lexists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_stale(output: str, live_jobs: set[str]) -> list[str]:
    """Remove temporaries of ``output`` left by jobs that are no longer running."""
    head, name = os.path.split(os.path.abspath(output))
    removed = []
    if not os.path.isdir(head):
        return removed
    for entry in os.listdir(head):
        for tag in (TMP_TAG, OLD_TAG):
            prefix = f".{name}{tag}"
            if entry.startswith(prefix) and entry[len(prefix):] not in live_jobs:
                shutil.rmtree(os.path.join(head, entry), ignore_errors=True)
                removed.append(entry)
    return removed
