"""Atomic outputs: write under a temporary name beside the target, rename when complete.

A job's output is first created as ``<dir>/.<name>.mx-tmp-<job>``; only when every block is
written does ``commit`` rename it to ``<dir>/<name>``. A failed or cancelled job removes its
temporary, and the folders it made for its outputs where they are empty (an output that was
not there before the job is not there after it); one killed outright leaves a dot-named
temporary that never looks like the output (``sweep_stale`` removes such leftovers). An
existing output is replaced only after the new one is complete, and only if mx wrote it: mx
never overwrites a file it did not create. A job replaces an mx output only if an earlier run
of a job of the same name wrote it, or if its step says ``overwrite: true``
(``check_writable``): a job never silently replaces another job's result or a dataset from
``mx data``.

While a job runs it holds ``<dir>/.<name>.mx-lock`` (its id, host and pid) for each output, so
a second job writing the same output is refused rather than racing it for the temporaries,
the checkpoint and the commit; ``mx data`` holds the same lock while it writes (``publishing``).
A lock whose process is gone is stale: the next writer takes it and removes the leftovers of
the writers before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import tempfile
from typing import Iterator

from mx.errors import UserError

TMP_TAG = ".mx-tmp-"
OLD_TAG = ".mx-old-"
LOCK_TAG = ".mx-lock"


def temp_path(output: str, job_id: str) -> str:
    head, name = os.path.split(os.path.abspath(output))
    return os.path.join(head, f".{name}{TMP_TAG}{job_id}")


def _stamp_of(path: str) -> dict | None:
    """The commit record (``stamp``) of the Zarr node at ``path``; None if mx did not write it."""
    meta = os.path.join(path, "zarr.json")
    try:
        with open(meta) as f:
            stamp = json.load(f).get("attributes", {}).get("mx")
    except (OSError, ValueError, AttributeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _mx_written(path: str) -> bool:
    """True if ``path`` is a Zarr node whose attributes carry mx's commit record."""
    return _stamp_of(path) is not None


def _job_name(stamp: dict) -> str | None:
    """The name of the job that wrote an output, None for one not written by a job."""
    if "job_name" in stamp:
        return stamp["job_name"]
    if isinstance(stamp.get("job"), str):
        # committed before outputs recorded the name: ids are <name>-<date>-<time>-<hex>
        return stamp["job"].rsplit("-", 3)[0]
    return None


def writer(stamp: dict) -> str:
    """What wrote an mx output, in words, from its commit record."""
    if "job" in stamp:
        return f"step '{stamp.get('step')}' of job {stamp['job']}"
    if "generator" in stamp:
        return f"`mx data` (its {stamp['generator']} generator)"
    if "imported" in stamp:
        return f"`mx data import` (from {stamp['imported']})"
    return "mx"


def check_writable(output: str, what: str, job_name: str, overwrite: bool = False) -> None:
    """Refuse, before a job runs, an output path that holds something mx did not write, or an
    mx output that job ``job_name`` may not replace: only earlier runs of a job of that name
    are replaced, unless the step says ``overwrite``."""
    if os.path.lexists(output):
        stamp = _stamp_of(output)
        if stamp is None:
            raise UserError(f"{what}: {output} already exists and was not written by mx; remove "
                            f"it or choose another output path (mx only replaces its own outputs)")
        if not overwrite and _job_name(stamp) != job_name:
            raise UserError(f"{what}: {output} was written by {writer(stamp)}, and job "
                            f"'{job_name}' replaces only outputs of its own earlier runs; add "
                            f"`overwrite: true` to the step to replace it, or choose another "
                            f"output path")
    check_folder(output, what)


def check_new_output(output: str, overwrite: bool) -> None:
    """Refuse, before ``mx data`` writes it, an output that exists (unless ``overwrite``), that
    a running job or ``mx data`` is writing, or whose folder cannot be written."""
    if os.path.lexists(output) and not overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it or choose "
                        f"another path")
    check_unlocked(output, output)
    check_folder(output, output)


@contextlib.contextmanager
def publishing(output: str, overwrite: bool) -> Iterator[str]:
    """Write ``output`` for ``mx data``: hold its lock, yield the temporary to write, commit
    it when the body returns and remove it when the body raises. ``overwrite`` lets the
    commit replace whatever is at ``output`` by then."""
    writer_id = f"data{os.getpid()}"
    lock(output, writer_id, os.getpid(), by="`mx data`")
    try:
        tmp = begin(output, writer_id)
        try:
            yield tmp
        except BaseException:
            abort(tmp)
            raise
        commit(tmp, output, writer_id, force=overwrite)
    finally:
        unlock(output, writer_id)


def nearest_existing(path: str) -> str:
    """The nearest existing path above ``path``: where a new ``path`` would be made."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_folder(output: str, what: str) -> None:
    """The nearest existing folder of ``output`` must be one a file can be created in."""
    probe = nearest_existing(output)
    if not os.path.isdir(probe) or not _can_create_in(probe):
        raise UserError(f"{what}: cannot create {output}: {probe} is not a writable folder; "
                        f"choose an output path in a folder you can write")


def _can_create_in(folder: str) -> bool:
    """Whether a file can be created in ``folder``, found by creating one: os.access trusts
    the permission bits, which say yes to root on read-only mounts and in /proc or /sys."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mx-probe-")
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


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


def missing_folders(output: str) -> list[str]:
    """The folders above ``output`` that do not exist yet, deepest first: the ones that writing
    it creates, which a job that ends without committing it removes again (``remove_empty``)."""
    folders = []
    probe = os.path.dirname(os.path.abspath(output))
    while not os.path.lexists(probe):
        folders.append(probe)
        probe = os.path.dirname(probe)
    return folders


def remove_empty(folders: list[str]) -> None:
    """Remove those of ``folders`` that are empty, children before their parents. Only rmdir:
    a folder that holds anything (a committed output, a checkpoint, a user's file) stays."""
    for folder in sorted(set(folders), key=len, reverse=True):
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty, or already gone


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


def lock_path(output: str) -> str:
    head, name = os.path.split(os.path.abspath(output))
    return os.path.join(head, f".{name}{LOCK_TAG}")


def runs(host: str | None, pid: int | None) -> bool:
    """Whether process ``pid`` of ``host`` still runs (one on another host is assumed to)."""
    if host != socket.gethostname():
        return True
    return bool(pid) and alive(pid)


def alive(pid: int) -> bool:
    """True while process ``pid`` runs on this machine (a zombie no longer does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder(output: str) -> dict | None:
    """The lock of the writer of ``output`` ({"job", "host", "pid"}, and "by" for a writer
    that is not a job), or None when there is none or its process is gone."""
    try:
        with open(lock_path(output)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if runs(info.get("host"), info.get("pid")) else None


def check_unlocked(output: str, what: str, job_id: str | None = None) -> None:
    """Refuse an output another running writer holds (``job_id``'s own lock is fine)."""
    info = holder(output)
    if info is None or info.get("job") == job_id:
        return
    if info.get("by"):
        raise UserError(f"{what}: {output} is being written by {info['by']} (pid "
                        f"{info.get('pid')} on {info.get('host')}); wait for it to finish or "
                        f"write to another path. If nothing writes it, remove {lock_path(output)}")
    raise UserError(f"{what}: {output} is being written by job {info.get('job')} (pid "
                    f"{info.get('pid')} on {info.get('host')}); wait for it or cancel it "
                    f"(`mx cancel {info.get('job')}`), or write to another path. If no such "
                    f"job runs, remove {lock_path(output)}")


def lock(output: str, job_id: str, pid: int, by: str | None = None) -> None:
    """Take ``output`` for writer ``job_id`` (refused while another live writer holds it), then
    remove the temporaries earlier writers left beside it. ``by`` names a writer that is not a
    job."""
    check_unlocked(output, "output", job_id)
    path = lock_path(output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{job_id}"
    info = {"job": job_id, "host": socket.gethostname(), "pid": pid}
    with open(tmp, "w") as f:
        json.dump({**info, "by": by} if by else info, f)
    os.replace(tmp, path)
    sweep_stale(output, {job_id})


def unlock(output: str, job_id: str) -> None:
    """Give ``output`` back, if ``job_id`` still holds it."""
    path = lock_path(output)
    try:
        with open(path) as f:
            mine = json.load(f).get("job") == job_id
    except (OSError, ValueError):
        return
    if mine:
        os.remove(path)
