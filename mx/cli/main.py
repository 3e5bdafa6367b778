"""The ``mx`` command. Thin: parse, call the library, print.

Exit codes: 0 success, 1 the job failed or was cancelled, 2 bad input (nothing written).
Job ids go to stdout; progress, logs and errors to stderr.
"""

from __future__ import annotations

import os
import sys
import time

import click

from mx.errors import JobCancelled, JobFailed, UserError

# seeds as jobs take them (mx.tasks.spec.SEED_MAX, not imported: the CLI starts without pydantic)
SEED = click.IntRange(0, 2**32 - 1)


class Bar:
    """A one-line progress bar on a terminal; silent elsewhere (logs carry the progress)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.active = stream.isatty()
        self.drawn = False
        self.t0 = time.monotonic()

    def update(self, step: str, done: int, total: int) -> None:
        if not self.active:
            return
        width = 30
        filled = int(width * done / total) if total else width
        line = (f"\r[{step}] {'█' * filled}{'░' * (width - filled)} {done}/{total} "
                f"{time.monotonic() - self.t0:6.1f} s")
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def echo(self, text: str) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False
        click.echo(text, err=True)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False


def _fail(exc: Exception) -> None:
    code = 2 if isinstance(exc, UserError) else 1
    click.echo(f"mx: error: {exc}", err=True)
    sys.exit(code)


def _pair(text: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"{name} {text!r}: give two integers as M,N (e.g. 3000,2000)") from None
    return a, b


@click.group()
@click.version_option(package_name="mx")
def cli() -> None:
    """mx: distributed matrix jobs on Ray actors, Dask graphs and Zarr matrices."""


@cli.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--detach", is_flag=True, help="Return at once with the job id; the job runs on.")
@click.option("--quiet", "-q", is_flag=True, help="No log lines, only the progress bar.")
@click.option("--dashboard", is_flag=True, help="Start the Ray dashboard with the local Ray.")
@click.option("--address", default=None,
              help="Send the job to this Ray cluster through its Jobs API (dashboard URL "
                   "http://host:8265 or GCS host:port; default resources.address, "
                   "$MX_RAY_ADDRESS, $RAY_ADDRESS, else a local Ray for this job).")
@click.option("--resume", "resume_job", default=None, metavar="JOB",
              help="Run a failed, cancelled or lost job again from what it stored.")
def submit(job_file: str | None, detach: bool, quiet: bool, dashboard: bool,
           address: str | None, resume_job: str | None) -> None:
    """Run the job in JOB_FILE; waits and shows progress unless --detach."""
    from mx.tasks import jobs

    bar = Bar()
    try:
        if resume_job is not None:
            if job_file is not None:
                raise UserError("give a job file or --resume JOB, not both")
            job_id = jobs.resume(resume_job, detach=detach, echo=None if quiet else bar.echo,
                                 progress=bar.update, dashboard=dashboard)
        elif job_file is None:
            raise UserError("give a job file (mx submit job.yaml), or --resume JOB")
        else:
            job_id = jobs.submit(job_file, detach=detach, echo=None if quiet else bar.echo,
                                 progress=bar.update, dashboard=dashboard, address=address)
    except (UserError, JobFailed, JobCancelled) as exc:
        bar.close()
        _fail(exc)
    bar.close()
    click.echo(job_id)


@cli.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--job-id", default=None, help="Run a job already recorded (by submit).")
@click.option("--dashboard", is_flag=True)
def run(job_file: str | None, job_id: str | None, dashboard: bool) -> None:
    """Run JOB_FILE in this process: the entry point of every rank under an MPI launch
    (srun -n 4 mx run job.yaml; rank 0 records the job). Elsewhere it is `mx submit`."""
    from mx.tasks import jobs

    bar = Bar()
    try:
        if job_id is None:
            if job_file is None:
                raise UserError("give a job file, or --job-id of a recorded job")
            job_id = _record_on_rank0(job_file)
        state = jobs.run(job_id, echo=bar.echo, progress=bar.update, dashboard=dashboard)
    except (UserError, JobFailed, JobCancelled) as exc:
        bar.close()
        _fail(exc)
    bar.close()
    click.echo(job_id)
    sys.exit(0 if state == "succeeded" else 1)


def _record_on_rank0(job_file: str) -> str:
    """Check and record the job once (rank 0) and share its id with every rank."""
    from mx.cluster import mpi
    from mx.tasks import jobs

    if not mpi.launched():
        return jobs.prepare(job_file, jobs_api=False)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    job_id, error = None, None
    if world.Get_rank() == 0:
        try:
            job_id = jobs.prepare(job_file, jobs_api=False)
        except UserError as exc:
            error = str(exc)
    job_id, error = world.bcast((job_id, error), root=0)
    if error:
        raise UserError(error)
    return job_id


@cli.command()
@click.argument("job")
def status(job: str) -> None:
    """Show a job's state, steps, progress and timings."""
    from mx.tasks import record

    try:
        rec = record.load(record.find(job))
    except UserError as exc:
        _fail(exc)
    from mx.tasks import jobs

    rec = jobs.settled(rec)
    click.echo(f"job      {rec['id']}")
    click.echo(f"state    {rec['state']}")
    if rec.get("cluster"):
        click.echo(f"cluster  {rec['cluster']['address']} (Ray job {jobs.ray_job(rec)})")
    for field in ("name", "backend", "created", "started", "ended", "seconds", "error"):
        if rec.get(field) not in (None, ""):
            click.echo(f"{field:<8} {rec[field]}")
    for step in rec.get("steps", []):
        line = f"step {step['id']} ({step['op']}) {step['state']} -> {step['output']}"
        prog = step.get("progress")
        if prog and step["state"] == "running":
            line += f"  {prog['done']}/{prog['total']}"
        if "seconds" in step:
            line += f"  {step['seconds']} s"
        click.echo(line)
        for phase, seconds in step.get("phases", {}).items():
            click.echo(f"    {phase:<20} {seconds:.3f} s")


@cli.command()
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def logs(job: str, follow: bool) -> None:
    """Print a job's log."""
    from mx.tasks import record

    try:
        job_id = record.find(job)
        rec = record.load(job_id)
    except UserError as exc:
        _fail(exc)
    from mx.tasks import jobs

    path = record.path(job_id, "log")
    if rec.get("cluster") and not os.path.exists(path):
        # the driver's log is not on this filesystem: ask the cluster for what the driver printed
        from mx.cluster import submission

        click.echo(submission.logs(rec["cluster"]["address"], jobs.ray_job(rec)), nl=False)
        return
    pos = 0
    while True:
        if os.path.exists(path):
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                click.echo(chunk, nl=False)
        if not follow:
            return
        if jobs.current_state(record.load(job_id)) in jobs.ENDED:
            follow = False
            continue
        time.sleep(0.5)


@cli.command()
@click.argument("job")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for the job to stop before killing its runner.")
def cancel(job: str, timeout: float) -> None:
    """Cancel a queued or running job: workers stop, no output is committed."""
    from mx.tasks import jobs, record

    try:
        job_id = record.find(job)
        rec = jobs.cancel(job_id, timeout)
    except UserError as exc:
        _fail(exc)
    click.echo(f"{job_id} {jobs.current_state(rec)}")


@cli.command(name="list")
@click.option("--address", default=None,
              help="Also list the mx jobs that this Ray cluster knows (through its Jobs API).")
def list_jobs(address: str | None) -> None:
    """List jobs, newest last."""
    from mx.tasks import jobs, record

    rows = {}
    for job_id in record.all_ids():
        try:
            rec = record.load(job_id)
        except (UserError, ValueError):
            continue
        rows[job_id] = (rec.get("created", ""), job_id, jobs.current_state(rec),
                        f"{rec['seconds']:.1f}s" if rec.get("seconds") is not None else "-",
                        ",".join(s["op"] for s in rec.get("steps", [])),
                        rec.get("cluster", {}).get("address", "local"))
    if address is not None:
        from mx.cluster import submission

        try:
            for job in submission.list_jobs(address):
                if job["id"] not in rows:  # submitted from a machine whose records are not here
                    rows[job["id"]] = ("", job["id"], f"ray:{job['ray_state'].lower()}", "-", "?",
                                       address)
        except UserError as exc:
            _fail(exc)
    if not rows:
        click.echo(f"no jobs under {record.jobs_dir()}", err=True)
        return
    ordered = sorted(rows.values())
    width = max(len(r[1]) for r in ordered)
    click.echo(f"{'JOB':<{width}}  {'STATE':<10} {'TIME':>8}  {'OPS':<16} WHERE")
    for _, job_id, state, seconds, op_names, where in ordered:
        click.echo(f"{job_id:<{width}}  {state:<10} {seconds:>8}  {op_names:<16} {where}")


@cli.group()
def cluster() -> None:
    """A persistent local Ray head to submit jobs to and watch them on its dashboard."""


@cluster.command(name="up")
@click.option("--num-cpus", default=None, type=int, help="Logical CPUs (default: all cores).")
@click.option("--num-gpus", default=None, type=int, help="GPUs (default: what Ray detects).")
@click.option("--dashboard-port", default=8265, show_default=True, type=int)
def cluster_up(num_cpus: int | None, num_gpus: int | None, dashboard_port: int) -> None:
    """Start the head: dashboard on 127.0.0.1, token authentication on."""
    from mx.cluster import head

    try:
        info = head.up(num_cpus, num_gpus, dashboard_port)
    except UserError as exc:
        _fail(exc)
    click.echo(f"Ray head up: dashboard {info['dashboard']}, GCS {info['address']}, pid {info['pid']}",
               err=True)
    click.echo(f"token: {info['token']} (the dashboard asks for it; mx uses it by itself)",
               err=True)
    click.echo(f"submit to it: mx submit job.yaml --address {info['dashboard']}  "
               f"(or export RAY_ADDRESS={info['dashboard']})", err=True)
    click.echo(info["dashboard"])


@cluster.command(name="down")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before killing it.")
def cluster_down(timeout: float) -> None:
    """Stop the head and every Ray process it started."""
    from mx.cluster import head

    try:
        info = head.down(timeout)
    except UserError as exc:
        _fail(exc)
    click.echo(f"Ray head stopped (pid {info['pid']}, dashboard {info['dashboard']})", err=True)


@cluster.command(name="status")
def cluster_status() -> None:
    """Say whether the head is up, and where."""
    from mx.cluster import head

    info = head.info()
    if info is None:
        click.echo("no cluster is up; `mx cluster up` starts one", err=True)
        sys.exit(1)
    click.echo(f"up since {info['started']}: dashboard {info['dashboard']}, GCS {info['address']}, "
               f"pid {info['pid']}, token {info['token']}")


@cli.command()
@click.argument("job")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the files (default: the job's report/ folder).")
def report(job: str, out: str | None) -> None:
    """Write a job's pictures (PNG) and an HTML page that holds them."""
    from mx.tasks import record
    from mx.tasks import report as reporting

    try:
        paths = reporting.write(record.find(job), out)
    except UserError as exc:
        _fail(exc)
    for path in paths:
        click.echo(path)


@cli.group()
def data() -> None:
    """Create and inspect input matrices."""


@data.command(name="random")
@click.argument("output", type=click.Path())
@click.option("--shape", required=True, help="M,N")
@click.option("--chunks", default=None, help="R,C (default: up to 1024,1024)")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--distribution", default="uniform", show_default=True, type=click.Choice(["uniform", "normal"]))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_random(output, shape, chunks, seed, dtype, distribution, overwrite) -> None:
    """Write a random dense matrix to the Zarr array OUTPUT."""
    from mx.storage import generate

    try:
        m, n = _pair(shape, "--shape")
        ch = _pair(chunks, "--chunks") if chunks else (min(m, 1024), min(n, 1024))
        generate.random_dense(output, (m, n), ch, seed=seed, dtype=dtype,
                              distribution=distribution, overwrite=overwrite)
    except UserError as exc:
        _fail(exc)
    click.echo(f"{output}: {m}×{n} {dtype}, chunks {ch[0]}×{ch[1]}, seed {seed}", err=True)


def _sparse_summary(info, what: str) -> str:
    m, n = info.shape
    return (f"{info.path}: sparse CSR {m}×{n} {info.dtype}, nnz {info.nnz} "
            f"({info.nnz / max(m, 1):.2f} per row), {what}")


@data.command(name="rmat")
@click.argument("output", type=click.Path())
@click.option("--scale", required=True, type=int, help="2**SCALE vertices (1..31)")
@click.option("--edge-factor", default=16, show_default=True, type=int, help="Edges per vertex.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_rmat(output, scale, edge_factor, seed, dtype, overwrite) -> None:
    """Write a Graph500 R-MAT sparse matrix to the binsparse CSR group OUTPUT."""
    from mx.storage import generate

    try:
        info = generate.rmat(output, scale, edge_factor=edge_factor, seed=seed, dtype=dtype,
                             overwrite=overwrite)
    except UserError as exc:
        _fail(exc)
    click.echo(_sparse_summary(info, f"R-MAT scale {scale} edge factor {edge_factor}, "
                                     f"seed {seed}"), err=True)


@data.command(name="sparse")
@click.argument("output", type=click.Path())
@click.option("--kind", required=True, type=click.Choice(["banded", "web", "road"]))
@click.option("--n", "n", required=True, type=int,
              help="Rows (vertices); road uses a round(sqrt(N))² grid.")
@click.option("--bandwidth", default=16, show_default=True, type=int, help="banded: half-width.")
@click.option("--density", default=1.0, show_default=True, type=float,
              help="banded: fraction of the band kept.")
@click.option("--avg-degree", default=8.0, show_default=True, type=float,
              help="web: mean out-links per page.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_sparse(output, kind, n, bandwidth, density, avg_degree, seed, dtype, overwrite) -> None:
    """Write a sparse look-alike of a real matrix (FEM band, web graph, road network) to the
    binsparse CSR group OUTPUT."""
    from mx.storage import generate

    common = dict(seed=seed, dtype=dtype, overwrite=overwrite)
    try:
        if n < 1:
            raise UserError(f"--n {n}: must be at least 1")
        if kind == "banded":
            info = generate.banded(output, n, bandwidth, density=density, **common)
            what = f"banded, bandwidth {bandwidth}, density {density}"
        elif kind == "web":
            info = generate.web(output, n, avg_degree=avg_degree, **common)
            what = f"web graph, average degree {avg_degree}"
        else:
            side = max(1, round(n ** 0.5))
            info = generate.road(output, side, **common)
            what = f"road network on a {side}×{side} grid"
    except UserError as exc:
        _fail(exc)
    click.echo(_sparse_summary(info, f"{what}, seed {seed}"), err=True)


@data.command(name="lowrank")
@click.argument("output", type=click.Path())
@click.option("--shape", required=True, help="M,N")
@click.option("--rank", "rank", required=True, type=int)
@click.option("--fraction", required=True, type=float, help="probability that an entry is observed")
@click.option("--noise", default=0.0, show_default=True, type=float)
@click.option("--condition", default=1.0, show_default=True, type=float,
              help="ratio of the largest to the smallest singular value")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--overwrite", is_flag=True)
def data_lowrank(output, shape, rank, fraction, noise, condition, seed, dtype, overwrite) -> None:
    """Observed entries of a planted incoherent rank-K matrix (binsparse CSR), with the true
    factors kept in the group as truth_u and truth_v."""
    from mx.storage import generate

    try:
        m, n = _pair(shape, "--shape")
        info = generate.lowrank(output, (m, n), rank, fraction, noise=noise, condition=condition,
                                seed=seed, dtype=dtype, overwrite=overwrite)
    except UserError as exc:
        _fail(exc)
    click.echo(f"{output}: {m}×{n} rank {rank}, {info.nnz} observed entries "
               f"({info.nnz / (m * n):.3g}), noise {noise:g}, condition {condition:g}", err=True)


@data.command(name="import")
@click.argument("source", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--dense", "as_dense", is_flag=True, help="Store a coordinate file as a dense array.")
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def data_import(source, output, as_dense, dtype, overwrite) -> None:
    """Import a Matrix Market file: arrays become dense Zarr arrays, coordinate files binsparse
    CSR groups (or dense arrays with --dense)."""
    from mx.storage import mtx

    try:
        kind = mtx.import_mtx(source, output, as_dense=as_dense, dtype=dtype, overwrite=overwrite)
    except UserError as exc:
        _fail(exc)
    click.echo(f"{output}: {kind} matrix imported from {source}", err=True)


@data.command(name="info")
@click.argument("path", type=click.Path())
def data_info(path) -> None:
    """Describe the matrix at PATH."""
    from mx.storage import dense, sparse

    try:
        try:
            info = dense.inspect(path, path)
            click.echo(f"dense {info.shape[0]}×{info.shape[1]} {info.dtype} chunks "
                       f"{info.chunks[0]}×{info.chunks[1]}")
        except UserError as exc:
            if "Zarr group" not in str(exc):
                raise
            sinfo = sparse.inspect(path, path)
            click.echo(f"sparse CSR {sinfo.shape[0]}×{sinfo.shape[1]} {sinfo.dtype} nnz {sinfo.nnz}")
    except UserError as exc:
        _fail(exc)


def main() -> None:
    cli(prog_name="mx")


if __name__ == "__main__":
    main()
