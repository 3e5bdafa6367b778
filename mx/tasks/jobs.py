"""The job lifecycle: submit, run, cancel. ``mx submit`` and ``mx.submit`` both come here.

``submit`` checks the whole job first (a bad job is a ``UserError`` and writes nothing), then
records it and runs it in this process, or in a detached process with ``detach=True``.
``run`` starts the backend (workers), and for each step creates its output under a temporary
name, executes the step's graph, and commits the output only when every block is written.
A failure or a cancel removes the temporary output and the folders made for it, stops every
worker, and records why.
An MPI job run outside an MPI launch starts its ranks with mpiexec; inside one, rank 0 is
the driver described here and the other ranks follow (``_follow``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Callable

from mx.errors import JobCancelled, JobFailed, UserError, WorkerLost, first_line
from mx.cluster import metrics
from mx.storage import commit
from mx.tasks import plan as planning
from mx.tasks import record, spec
from mx.tasks.plan import JobPlan, StepPlan

Progress = Callable[[str, int, int], None]  # (step id, done, total)


def load(source: Any, base: str | None = None) -> tuple[spec.Job, str, str, str | None]:
    """(job, base folder, job text, job file path) from a path, YAML text, a dict or a ``Job``."""
    import yaml

    if base is not None:
        if not isinstance(base, (str, os.PathLike)):
            raise UserError(f"base {base!r}: give the folder that the job's relative paths "
                            f"resolve against, as a str or a path")
        # recorded absolute: a detached runner or a later --resume may start in another folder
        base = os.path.abspath(os.path.expanduser(os.fspath(base)))
        if not os.path.isdir(base):
            raise UserError(f"base {base}: no such folder; give the folder that the job's "
                            f"relative paths resolve against")
    if isinstance(source, spec.Job):
        return source, base or os.getcwd(), yaml.safe_dump(source.model_dump(), sort_keys=False), None
    if isinstance(source, Mapping):
        # the runner reads the job back from its YAML text: values YAML cannot hold (paths,
        # NumPy scalars, an OrderedDict) were a RepresenterError traceback; they become the
        # plain values they stand for, and anything else is named
        source = _plain(source, "job")
        text = yaml.safe_dump(source, sort_keys=False)
        return spec.validate(spec.Job, source, source="job"), base or os.getcwd(), text, None
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        job, folder = spec.load(str(source))
        with open(source, encoding="utf-8") as f:
            return job, base or folder, f.read(), os.path.abspath(source)
    if isinstance(source, str) and ("\n" in source or _one_line_mapping(source)):
        return spec.parse(source), base or os.getcwd(), source, None
    raise UserError(f"{source}: no such job file; give the path of a job YAML file")


def _one_line_mapping(text: str) -> bool:
    """True for YAML text on one line that holds a mapping ("{name: x, steps: [...]}"): a
    job, not a path (a missing job file's path is a plain YAML string)."""
    import yaml

    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def _plain(value: Any, where: str) -> Any:
    """A dict job's value as plain YAML data: mappings, lists, str, numbers, bools, None."""
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _plain(value.item(), where)  # a NumPy scalar (np.float64 is a float YAML refuses)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise UserError(f"{where}: {type(value).__name__} values cannot be part of a job; give a str, "
                    f"a number, a bool, a list or a dict")


def submit(source: Any, *, base: str | None = None, detach: bool = False,
           echo: Callable[[str], None] | None = None, progress: Progress | None = None,
           dashboard: bool = False, address: str | None = None) -> str:
    """Check and record a job, then run it: in this process, in a detached process with
    ``detach=True``, or on a Ray cluster through its Jobs API when the job has an address
    (``address`` here, ``resources.address``, $MX_RAY_ADDRESS or $RAY_ADDRESS). Returns the
    job id.

    Raises ``UserError`` for a bad job (nothing is written), ``JobFailed``/``JobCancelled``
    when a job this call waits for does not succeed.
    """
    job_id = prepare(source, base, address)
    return start(job_id, detach=detach, echo=echo, progress=progress, dashboard=dashboard)


def start(job_id: str, *, detach: bool = False, echo: Callable[[str], None] | None = None,
          progress: Progress | None = None, dashboard: bool = False) -> str:
    """Run a recorded job where its record says (here, detached, or on its cluster)."""
    rec = record.load(job_id)
    if rec.get("cluster"):
        _submit_to_cluster(job_id, rec)
        if detach:
            return job_id
        _relay(job_id, echo, progress, lambda: current_state(record.load(job_id)) in ENDED)
    elif detach:
        _spawn(job_id, dashboard)
        return job_id
    else:
        run(job_id, echo=echo, progress=progress, dashboard=dashboard)
    rec = record.load(job_id)
    state = current_state(rec)
    if state == "cancelled":
        raise JobCancelled(f"job {job_id} was cancelled")
    if state != "succeeded":
        raise JobFailed(f"job {job_id} {'failed' if state == 'failed' else 'was ' + state}: "
                        f"{rec.get('error') or 'see mx logs ' + job_id}")
    return job_id


ENDED = record.FINAL + ("lost",)


def prepare(source: Any, base: str | None = None, address: str | None = None,
            jobs_api: bool = True) -> str:
    """Check a whole job (a bad job is a ``UserError`` and writes nothing) and record it.
    A Ray job with a cluster address is recorded for the cluster's Jobs API, unless
    ``jobs_api`` is False (``mx run``: this process drives it, joined to the cluster)."""
    job, folder, text, job_file = load(source, base)
    if address is not None and job.backend != "ray":
        raise UserError(f"--address {address}: sends a job to a Ray cluster, but this job's "
                        f"backend is {job.backend}; drop --address or use backend: ray")
    name = spec.job_name(job, job_file, folder)
    job_plan = planning.plan_job(job, folder, name, address=address)
    planning.check_models(job_plan)
    planning.check_memory(job_plan, address)
    if job.backend == "ray":
        planning.check_ray_capacity(job.resources, job_plan.workers,
                                    address or job.resources.cluster_address())
    if job.backend == "mpi":
        from mx.cluster import mpi

        if mpi.launched():  # `mx run job.yaml` under mpiexec or srun: its ranks are the workers
            mpi.check_launch(job_plan.workers)
    cluster = (address or job.resources.cluster_address()) \
        if job.backend == "ray" and jobs_api else None
    job_id = record.new_id(name)
    record.create(job_id, {"name": name, "backend": job.backend, "base": folder,
                           "job_file": job_file,
                           **({"cluster": {"address": cluster}} if cluster else {}),
                           "steps": [{"id": s.id, "op": s.op, "output": s.output, "state": "queued"}
                                     for s in job.steps]},
                  text)
    return job_id


def _submit_to_cluster(job_id: str, rec: dict) -> None:
    from mx.cluster import submission

    address = rec["cluster"]["address"]
    # Ray keeps every submission id for good: a resumed job is a new Ray job
    ray_id = job_id + (f"-resume{rec['resumed']}" if rec.get("resumed") else "")
    try:
        submission.submit(address, job_id, rec.get("name", ""), ray_id)
    except Exception as exc:
        error = f"could not submit to the Ray cluster at {address}: {exc}"
        record.update(job_id, rec, state="failed", error=error, ended=record.now())
        raise UserError(error) from None
    rec["cluster"]["ray_job"] = ray_id
    record.write(job_id, rec)
    record.Log(job_id)(f"job {job_id}: submitted to the Ray cluster at {address} "
                       f"(Ray job {ray_id}; it shows on the dashboard's Jobs page)")


def ray_job(rec: dict) -> str:
    """The id of the Ray job that runs (or ran) a cluster job's driver last."""
    return rec["cluster"].get("ray_job", rec["id"])


def current_state(rec: dict) -> str:
    """The job's state as its record says, made good where the runner died without saying
    so: 'lost' when the runner process (or, on a cluster, Ray's job) has ended."""
    state = record.effective_state(rec)
    if state in ENDED or not rec.get("cluster"):
        return state
    from mx.cluster import submission

    ray_state = submission.status(rec["cluster"]["address"], ray_job(rec))
    if ray_state in submission.ENDED:
        state = record.effective_state(record.load(rec["id"]))  # it may have just finished
        return state if state in record.FINAL else "lost"
    return state


def settled(rec: dict) -> dict:
    """The record as it stands: the job's state made good (``current_state``) and, where the
    job ended without its runner saying so (a rank aborted the gang, the runner died), its
    unfinished steps marked as the runner would have marked them."""
    state = current_state(rec)
    if state == rec.get("state") or state not in ENDED:
        return {**rec, "state": state}
    steps = [{**step, "state": state if step["state"] == "running" else "not run"}
             if step["state"] in ("queued", "running") else step for step in rec.get("steps", [])]
    error = rec.get("error") or record.failure(rec["id"]) or \
        ("its runner ended without recording an end" if state == "lost" else None)
    return {**rec, "state": state, "steps": steps, "error": error}


def resume(prefix: str, **kwargs) -> str:
    """Run a job that failed, was cancelled or lost its driver again, from what is stored:
    steps whose outputs it committed are kept, a ``complete`` step restarts from its last
    checkpoint, every other step runs again."""
    job_id = record.find(prefix)
    rec = record.load(job_id)
    state = current_state(rec)
    if state not in ("failed", "cancelled", "lost"):
        raise UserError(f"job {job_id} is {state}; only a failed, cancelled or lost job can be "
                        f"resumed")
    for name in ("cancel", "failed"):
        if os.path.exists(record.path(job_id, name)):
            os.remove(record.path(job_id, name))
    for step in rec["steps"]:
        if step["state"] != "succeeded":
            step["state"] = "queued"
    record.update(job_id, rec, state="queued", error=None, ended=None, pid=None, launcher=None,
                  resumed=rec.get("resumed", 0) + 1)
    record.Log(job_id)(f"job {job_id}: resumed (was {state})")
    return start(job_id, **kwargs)


def _spawn(job_id: str, dashboard: bool) -> None:
    out = open(record.path(job_id, "runner.out"), "ab")
    cmd = [sys.executable, "-m", "mx.cli.main", "run", "--job-id", job_id] + (["--dashboard"] if dashboard else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True, env={**os.environ, "MX_HOME": record.home()})
    rec = record.load(job_id)
    record.update(job_id, rec, pid=proc.pid)


def run(job_id: str, *, echo: Callable[[str], None] | None = None,
        progress: Progress | None = None, dashboard: bool = False) -> str:
    """Run a recorded job; returns its final state. An MPI job started outside an MPI launch
    launches its ranks (mpiexec); inside one, rank 0 drives and the other ranks follow."""
    rec = record.load(job_id)
    if rec.get("backend") == "mpi":
        from mx.cluster import mpi

        if not mpi.launched():
            return _launch_mpi(job_id, echo, progress)
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() != 0:
            return _follow(job_id)
    return _drive(job_id, echo, progress, dashboard)


def _drive(job_id: str, echo, progress, dashboard: bool) -> str:
    """Run a recorded job as its driver: the record, the log, the outputs' commits."""
    rec = record.load(job_id)
    log = record.Log(job_id, echo)
    # the pid that answers for the job: mx's mpiexec launcher when there is one, else this one
    pid = rec["pid"] if rec.get("launcher") else os.getpid()
    rec = record.update(job_id, rec, state="running", pid=pid, host=socket.gethostname(),
                        started=record.now())
    log(f"job {job_id}: running in pid {os.getpid()} on {rec['host']}")
    t0 = time.perf_counter()
    previous = _catch_terminate()
    cancelled = lambda: record.cancel_requested(job_id)  # noqa: E731
    backend = None
    tmp = None
    locked = []
    made: list[str] = []  # folders this job creates for its outputs
    state, error = "failed", None
    try:
        job, folder = spec.parse(open(record.path(job_id, "job.yaml")).read(), "job.yaml"), rec["base"]
        job_plan = planning.plan_job(job, folder, rec["name"], job_id)
        made = [f for sp in job_plan.steps for f in commit.missing_folders(sp.output)]
        for sp in job_plan.steps:
            commit.lock(sp.output, job_id, pid)
            locked.append(sp.output)
        # a driver that a cluster's Jobs API started connects to that cluster (RAY_ADDRESS)
        backend = make_backend(job_plan, job_id, dashboard,
                               address="auto" if rec.get("cluster") else None)
        with _phase(log, "start workers"):
            backend.start(log)
        for sp in job_plan.steps:
            if cancelled():
                raise JobCancelled("cancelled")
            if _committed(rec, sp, job_id):
                log(f"step {sp.step.id}: kept; this job committed {sp.output} before")
                continue
            retries = sp.step.max_retries if sp.step.max_retries is not None else job.max_retries
            for attempt in range(retries + 1):
                tmp = commit.begin(sp.output, job_id)
                try:
                    _run_step(job_id, rec, sp, backend, tmp, log, progress, cancelled, attempt)
                    tmp = None
                    break
                except WorkerLost as exc:
                    commit.abort(tmp)
                    tmp = None
                    if attempt == retries:
                        raise JobFailed(f"{exc} (step {sp.step.id} tried {attempt + 1} time"
                                        f"{'s' if attempt else ''}; max_retries {retries})") from None
                    log(f"step {sp.step.id}: {exc}; retry {attempt + 1} of {retries} from what "
                        f"is stored (inputs, checkpoints) on new workers")
        state = "succeeded"
        log(f"job {job_id}: succeeded in {time.perf_counter() - t0:.2f} s")
    except (JobCancelled, SystemExit) as exc:
        # Ray's driver turns SIGTERM into SystemExit; either way the job stops here
        state, error = "cancelled", "cancelled by request" if cancelled() else f"stopped: {exc!r}"
        log(f"job {job_id}: cancelled; no output of the unfinished step was committed")
    except KeyboardInterrupt:  # Ctrl-C: the user stopped the job, as a cancel does
        state, error = "cancelled", "interrupted"
        log(f"job {job_id}: interrupted; no output of the unfinished step was committed")
    except (JobFailed, UserError) as exc:
        error = str(exc)
        log(f"job {job_id}: failed: {error}")
        if getattr(exc, "trace", None):  # a task raised: where, for the log
            log.detail(exc.trace)
    except BaseException as exc:  # a bug or an unexpected library error: keep the trace
        error = f"{type(exc).__name__}: {first_line(exc)} (`mx logs {job_id}` has the traceback)"
        log(f"job {job_id}: failed: {error}")
        log.detail(traceback.format_exc())
    finally:
        _restore_terminate(previous)
        if tmp is not None:
            commit.abort(tmp)
        for output in locked:
            commit.unlock(output, job_id)
        if state != "succeeded":
            commit.remove_empty(made)
        for step in rec["steps"]:
            if step["state"] == "running":
                step["state"] = state
            elif step["state"] == "queued":
                step["state"] = "not run"
        record.update(job_id, rec, state=state, error=error, ended=record.now(),
                      seconds=round(time.perf_counter() - t0, 3))
        if state != "succeeded" and rec.get("backend") == "mpi":
            _abort_ranks()  # the other ranks may be blocked waiting for this one; end them
        if backend is not None:
            try:
                backend.stop()
            except Exception as exc:
                log(f"stopping the workers failed: {exc}")
    return state


def _abort_ranks() -> None:
    from mx.cluster import mpi

    if mpi.launched():
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(1)


def _follow(job_id: str) -> str:
    """An MPI rank other than 0: plan as the driver does, run its share of every step. A
    failure here marks the job failed (an interrupt asks for a cancel instead), removes the
    step's temporary output and ends all ranks (the driver may be blocked waiting for this
    one)."""
    from mx.cluster.mpi import MpiBackend

    rec = record.load(job_id)
    backend, tmp = None, None
    try:
        job = spec.parse(open(record.path(job_id, "job.yaml")).read(), "job.yaml")
        job_plan = planning.plan_job(job, rec["base"], rec["name"], job_id)
        backend = MpiBackend(job_plan.workers, job_plan.job.resources.gpus, job_id)
        backend.start(lambda line: None)
        for sp in job_plan.steps:
            if _committed(rec, sp, job_id):  # rank 0 keeps it too (a resumed job)
                continue
            tmp = commit.temp_path(sp.output, job_id)
            backend.run(sp.op.build(sp.plan, sp.inputs, tmp, sp.step.id, sp.output))
        backend.stop()
        return "succeeded"
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank (mpiexec passes the SIGINT on): a cancel, as on Ray, not a
        # failure, whichever rank ends the gang first
        record.request_cancel(job_id)
        if tmp is not None:
            commit.abort(tmp)
        _abort_ranks()
        raise
    except BaseException as exc:
        rank = backend.rank if backend is not None else "?"
        reason = str(exc) if isinstance(exc, (JobFailed, UserError)) else \
            f"{type(exc).__name__}: {first_line(exc)}"
        record.mark_failed(job_id, f"rank {rank}: {reason}")
        log = record.Log(job_id)
        log(f"rank {rank} failed: {reason}")
        log.detail(getattr(exc, "trace", None) or traceback.format_exc())
        if tmp is not None:
            commit.abort(tmp)
        _abort_ranks()
        raise


def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel puts it there), else on the PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if not found:
        raise UserError("backend: mpi needs mpiexec; install mx with its mpich dependency, or run "
                        "the ranks yourself: srun -n <workers> mx run job.yaml")
    return found


RANK_ENDS = "rank-ends"  # the rank guards' lines, in the job's record folder


def _rank_failure(job_id: str, code) -> str:
    """Why the ranks of a job that recorded no end failed: a rank killed by a signal (it could
    not say why; what the others marked then is their echo of it), else what a rank marked,
    else how a rank exited, else what mpiexec said."""
    ends = _rank_ends(job_id)
    killed = [line for line in ends if " was killed by " in line]
    return (killed[0] if killed else None) or record.failure(job_id) or \
        (ends[0] if ends else None) or _mpiexec_failure(job_id, code)


def _rank_ends(job_id: str) -> list[str]:
    """The guards' lines (``mx.cluster.rankguard``) on ranks that ended badly, the first
    to end first."""
    try:
        with open(record.path(job_id, RANK_ENDS)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _mpiexec_failure(job_id: str, code) -> str:
    """Why mpiexec failed before any rank could say: its output's known refusals named."""
    out = record.path(job_id, "mpi.out")
    try:
        with open(out, errors="replace") as f:
            text = f.read()[-20000:]
    except OSError:
        text = ""
    reason = f"mpiexec exited with code {code}; see {out}"
    if "allow-run-as-root" in text:
        reason += (" (Open MPI's mpiexec refuses to run as root: run as another user, or, in a "
                   "container, set OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)")
    return reason


def _end_with_parent() -> None:
    """In mpiexec, before it starts: SIGTERM when the launcher dies. Hydra starts the ranks in
    sessions of their own, so a launcher killed outright (SIGKILL, a closed terminal) left them
    running on beside a --resume's new ranks, both writing the same output; mpiexec passes the
    SIGTERM on to every rank. Linux only (prctl); elsewhere nothing changes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# seconds a cancelled MPI job's rank 0 has to stop by itself before mpiexec is told to end it
MPI_CANCEL_GRACE_S = 3.0


def _launch_mpi(job_id: str, echo, progress) -> str:
    """Start the ranks with mpiexec, relay the log and progress, and clean up if they die."""
    rec = record.update(job_id, record.load(job_id), pid=os.getpid(), launcher=True)
    resumed = rec.get("resumed", 0)
    job = spec.parse(open(record.path(job_id, "job.yaml")).read(), "job.yaml")
    outputs = [spec.resolve_path(step.output, rec["base"]) for step in job.steps]
    made = [f for output in outputs for f in commit.missing_folders(output)]
    workers = job.resources.worker_count()
    launcher = mpiexec()
    cmd = [launcher, "-n", str(workers)]
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        # Open MPI pins each rank to one core by default; a rank decodes chunks on many threads
        cmd += ["--bind-to", "none"]
    # each rank under a guard that records how it ended, if badly (``_rank_failure``)
    ends = record.path(job_id, RANK_ENDS)
    if os.path.exists(ends):
        os.remove(ends)  # a resumed job's: its ranks are not this run's
    cmd += [sys.executable, "-m", "mx.cluster.rankguard", ends, "--",
            sys.executable, "-m", "mx.cli.main", "run", "--job-id", job_id]
    with open(record.path(job_id, "mpi.out"), "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, "MX_HOME": record.home()},
                                preexec_fn=_end_with_parent)
    code = None
    asked = None  # when a cancel was first seen

    def ended() -> bool:
        # rank 0 sees a cancel only between tasks, and one gang program (a whole `complete`
        # step) is one task: after a grace, end the ranks through mpiexec (Hydra passes SIGTERM
        # on to every rank), so a cancelled job never runs on to commit its output
        nonlocal code, asked
        code = proc.poll()
        if code is None and (asked is not None or record.cancel_requested(job_id)):
            asked = asked if asked is not None else time.monotonic()
            waited = time.monotonic() - asked
            if waited > MPI_CANCEL_GRACE_S + 10:
                proc.kill()
            elif waited > MPI_CANCEL_GRACE_S:
                proc.terminate()
        return code is not None

    interrupted = False
    previous = _catch_terminate()  # `mx cancel` past its timeout: SIGTERM this launcher
    try:
        interrupted = _relay_through_interrupts(job_id, echo, progress, ended)
    except JobCancelled:
        record.request_cancel(job_id)
        proc.terminate()
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    finally:
        _restore_terminate(previous)
    rec = record.load(job_id)
    if rec.get("resumed", 0) != resumed:
        return rec["state"]  # resumed since: the record and the temporaries are the new run's
    state = rec.get("state")
    if state != "succeeded":
        # every rank has ended, so nothing writes any more: what they left goes now, also where
        # rank 0 recorded the end (an interrupted rank's zarr I/O thread, or another rank, may
        # have written into the temporary after rank 0 removed it)
        for output in outputs:
            commit.abort(commit.temp_path(output, job_id))
            commit.unlock(output, job_id)
        commit.remove_empty(made)
    if state in record.FINAL:
        return state
    # the driver never recorded an end: the ranks were ended for a cancel, or one died or failed
    if record.cancel_requested(job_id):
        state, error = "cancelled", "interrupted" if interrupted else "cancelled by request"
        line = "cancelled; no output of the unfinished step was committed"
    else:
        state, error = "failed", _rank_failure(job_id, code)
        line = f"failed: {error}"
    for step in rec["steps"]:
        if step["state"] in ("queued", "running"):
            step["state"] = state if step["state"] == "running" else "not run"
    record.update(job_id, rec, state=state, error=error, ended=record.now())
    record.Log(job_id, echo)(f"job {job_id}: {line}")
    return state


def _relay_through_interrupts(job_id: str, echo, progress, ended: Callable[[], bool]) -> bool:
    """``_relay`` until ``ended()``, where Ctrl-C asks for a cancel and goes on waiting; returns
    whether it did. mpiexec passes the SIGINT on to the ranks, which stop as for a cancel
    (``ended`` ends them after a grace): a SIGTERM on top of it would land in rank 0 while it
    records the cancel."""
    interrupted = False
    while True:
        try:
            _relay(job_id, echo, progress, ended)
            return interrupted
        except KeyboardInterrupt:
            interrupted = True
            record.request_cancel(job_id)
            echo = progress = None  # what ran is shown; a new _relay would show it again


def _relay(job_id: str, echo, progress, ended: Callable[[], bool], poll: float = 0.3) -> str:
    """Show a job that runs elsewhere (mpiexec's ranks, a cluster's driver) as if it ran
    here: its new log lines and its progress, until ``ended()``; returns the state then."""
    log_path, seen = record.path(job_id, "log"), 0
    while True:
        over = ended()
        if echo is not None and os.path.exists(log_path):
            with open(log_path) as f:
                f.seek(seen)
                for line in f.read().splitlines():
                    text = line.split(" ", 1)[-1]
                    if not text.startswith(record.DETAIL):
                        echo(text)
                seen = f.tell()
        if progress is not None:
            for step in record.load(job_id).get("steps", []):
                if step.get("state") == "running" and step.get("progress"):
                    progress(step["id"], step["progress"]["done"], step["progress"]["total"])
        if over:
            return record.effective_state(record.load(job_id))
        time.sleep(poll)


def make_backend(job_plan: JobPlan, job_id: str, dashboard: bool = False,
                 address: str | None = None):
    res = job_plan.job.resources
    if job_plan.job.backend == "mpi":
        from mx.cluster.mpi import MpiBackend

        return MpiBackend(job_plan.workers, res.gpus, job_id)
    if job_plan.job.backend == "local":
        from mx.cluster.local import LocalBackend

        return LocalBackend(job_plan.workers, res.gpus)
    from mx.cluster.ray_backend import RayBackend

    return RayBackend(job_plan.workers, res.gpus, address or res.cluster_address(), job_id,
                      dashboard, res.cpus_per_worker)


def _committed(rec: dict, sp: StepPlan, job_id: str) -> bool:
    """True when this job already committed the step's output (a resumed job keeps it)."""
    if rec["steps"][sp.index]["state"] != "succeeded" or not os.path.isdir(sp.output):
        return False
    import zarr

    try:
        stamp = zarr.open(store=sp.output, mode="r").attrs.get("mx", {})
    except Exception:
        return False
    return stamp.get("job") == job_id and stamp.get("complete") is True


def _run_step(job_id: str, rec: dict, sp: StepPlan, backend, tmp: str, log, progress,
              cancelled, attempt: int = 0) -> None:
    step_rec = rec["steps"][sp.index]
    step_rec.update(state="running", started=record.now())
    record.write(job_id, rec)
    log(f"step {sp.step.id} ({sp.step.op}): {', '.join(f'{k}={v}' for k, v in sp.inputs.items())} "
        f"-> {sp.output}")
    for line in sp.plan.describe():
        log(f"  {line}")
    t0 = time.perf_counter()
    sp.op.create_output(sp.plan, tmp, {"mx": {"job": job_id, "step": sp.step.id, "complete": False}})
    # a retry's workers get fresh names: the dead pool's names may not be free yet
    graph = dataclasses.replace(sp.op.build(sp.plan, sp.inputs, tmp, sp.step.id, sp.output),
                                step=sp.step.id + (f".retry{attempt}" if attempt else ""))
    total = graph.progress
    last = [0.0]

    flops = getattr(sp.plan, "flops", None)

    def on_progress(done: int) -> None:
        if progress is not None:
            progress(sp.step.id, done, total)
        now = time.monotonic()
        if now - last[0] > 1.0 or done >= total:
            last[0] = now
            step_rec["progress"] = {"done": done, "total": total}
            record.write(job_id, rec)
            rate = flops * done / max(total, 1) / (time.perf_counter() - t0) if flops else None
            metrics.publish({"blocks_done": done, "blocks_total": total,
                             "flops_per_second": rate}, job_id, sp.step.id)

    infos = backend.run(graph, on_progress, cancelled)
    run_s = time.perf_counter() - t0
    with _phase(log, "commit") as timing:
        import zarr

        zarr.open(store=tmp, mode="r+").attrs["mx"] = commit.stamp(
            {"job": job_id, "job_name": rec["name"], "step": sp.step.id, "op": sp.step.op,
             "inputs": sp.inputs, "complete": True})
        commit.commit(tmp, sp.output, job_id)
    if sp.op.publish is not None:
        try:
            sp.op.publish(sp.output)
        except OSError as exc:  # the output is committed and complete; only its extra is not
            log(f"step {sp.step.id}: warning: the output is committed, but what is derived from "
                f"it could not be written: {exc}")
    save_timeline(job_id, sp.step.id, sp.step.op, graph, infos)
    phases = summarize(infos)
    phases["commit"] = round(timing["seconds"], 4)
    if getattr(backend, "startup_s", 0.0):  # Ray starts each step's own workers
        phases["start-workers"] = round(backend.startup_s, 4)
    counters = count(infos)
    metrics.publish({"bytes_moved": sum(n for name, n in counters.items() if "bytes" in name),
                     "flops_per_second": flops / run_s if flops else None}, job_id, sp.step.id)
    step_rec.update(state="succeeded", ended=record.now(), seconds=round(run_s, 3), phases=phases,
                    counters=counters)
    rate = f", {flops / run_s / 1e9:.3g} GFLOP/s" if flops else ""
    log(f"step {sp.step.id}: done in {run_s:.2f} s{rate}; " +
        ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    if counters:
        log(f"step {sp.step.id}: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    record.write(job_id, rec)


def save_timeline(job_id: str, step: str, op: str, graph, infos: list[dict]) -> None:
    """Keep every task's worker, phase, start and duration (``timeline.json``, by step) for
    ``mx report``; gang programs add the seconds they spent in each inner phase."""
    file = record.path(job_id, "timeline.json")
    try:
        with open(file) as f:
            timeline = json.load(f)
    except FileNotFoundError:
        timeline = {"steps": {}}
    timeline["steps"][step] = {"op": op, "tasks": [
        {"worker": info["worker"], "name": graph.worker_name(info["worker"]),
         "label": info.get("label") or "other", "start": info["start"],
         "seconds": info["seconds"], "stats": info.get("stats", {})} for info in infos]}
    tmp = file + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(timeline, f, default=str)
    os.replace(tmp, file)


def summarize(infos: list[dict]) -> dict[str, float]:
    """Time per phase: the wall span of each kind of task, and inside gang programs the
    slowest worker's time in each phase (e.g. compute vs waiting for shifts)."""
    spans: dict[str, list[float]] = {}
    inner: dict[str, float] = {}
    for info in infos:
        label = info.get("label") or "other"
        lo, hi = spans.get(label, [info["start"], info["start"] + info["seconds"]])
        spans[label] = [min(lo, info["start"]), max(hi, info["start"] + info["seconds"])]
        for phase, seconds in info.get("stats", {}).items():
            inner[phase] = max(inner.get(phase, 0.0), seconds)
    out = {label: round(hi - lo, 4) for label, (lo, hi) in spans.items()}
    out.update({f"gang:{phase}": round(seconds, 4) for phase, seconds in inner.items()})
    return out


def count(infos: list[dict]) -> dict[str, int]:
    """Events counted by gang programs, summed over workers (bytes shifted, ABFT retries)."""
    totals: dict[str, int] = {}
    for info in infos:
        for name, n in info.get("counters", {}).items():
            totals[name] = totals.get(name, 0) + n
    return totals


class _phase:
    """Times a block and logs it."""

    def __init__(self, log, name: str):
        self.log, self.name, self.timing = log, name, {}

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self.timing

    def __exit__(self, *exc):
        self.timing["seconds"] = time.perf_counter() - self.t0
        if exc[0] is None:
            self.log(f"{self.name}: {self.timing['seconds']:.2f} s")
        return False


def _raise_cancel(signum, frame):
    raise JobCancelled(f"signal {signum}")


def _catch_terminate():
    """Turn SIGTERM into JobCancelled until a backend installs its own handler (Ray's driver
    does); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None  # signals reach the main thread only; the cancel file still works
    return signal.signal(signal.SIGTERM, _raise_cancel)


def _restore_terminate(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def cancel(job_id: str, timeout: float = 60.0) -> dict:
    """Ask a job to stop and wait until it has: its workers stop, its temporary outputs are
    removed. A runner that does not stop within ``timeout`` is terminated (its record then
    reads 'lost'; the temporaries it leaves are dot-named and never look complete); on a
    cluster, Ray's Jobs API stops it."""
    rec = record.load(job_id)
    state = current_state(rec)
    if state in record.FINAL:
        raise UserError(f"job {job_id} already {state}; nothing to cancel")
    record.request_cancel(job_id)  # the runner polls for this between and inside steps
    if state == "lost":
        return settled(rec)
    try:
        return wait(job_id, timeout)
    except TimeoutError:
        if rec.get("cluster"):
            from mx.cluster import submission

            submission.stop(rec["cluster"]["address"], ray_job(rec))
            try:
                return wait(job_id, 30.0)
            except TimeoutError:
                return settled(record.load(job_id))
        pid = rec.get("pid")
        if pid and rec.get("launcher"):
            # mx's mpiexec launcher: SIGKILL would leave mpiexec and its ranks running on (in
            # sessions of their own) to commit the output; SIGTERM makes it end them first
            try:
                os.kill(pid, signal.SIGTERM)
                return wait(job_id, 30.0)
            except (ProcessLookupError, TimeoutError):
                pass
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return settled(record.load(job_id))


def wait(job_id: str, timeout: float | None = None, poll: float = 0.2) -> dict:
    """Block until a job reaches a final state (or is lost); returns its record as it
    stands (``settled``: a lost job's record still says "running")."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rec = record.load(job_id)
        state = current_state(rec)
        if state in ENDED:
            return settled(rec)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
        time.sleep(poll)
