"""mx: a distributed task-graph service for large matrix workloads.

The Python API mirrors the command line: ``mx.submit(job)`` does what ``mx submit job.yaml``
does (``job`` is a path, YAML text, a dict or an ``mx.tasks.spec.Job``).
"""

__version__ = "0.1.0"


def submit(job, **options) -> str:
    """Check, record and run a job; returns its id (see ``mx.tasks.jobs.submit``)."""
    from mx.tasks.jobs import submit as _submit

    return _submit(job, **options)


def status(job_id: str) -> dict:
    """A job's record: state, steps, progress, timings."""
    from mx.tasks import jobs, record

    return jobs.settled(record.load(record.find(job_id)))


def cancel(job_id: str, timeout: float = 60.0) -> dict:
    """Stop a job and wait until it has stopped; returns its record."""
    from mx.tasks import jobs, record

    return jobs.cancel(record.find(job_id), timeout)


def wait(job_id: str, timeout: float | None = None) -> dict:
    from mx.tasks import jobs, record

    return jobs.wait(record.find(job_id), timeout)


def logs(job_id: str) -> str:
    from mx.tasks import record

    try:
        with open(record.path(record.find(job_id), "log")) as f:
            return f.read()
    except FileNotFoundError:  # recorded, not started yet
        return ""
