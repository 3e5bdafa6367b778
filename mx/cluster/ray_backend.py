"""The Ray backend: a pool of long-lived worker actors, one per worker (GPU or CPU slot).

The actors are placed with a placement group and live for the whole job. The driver walks the
step's schedule and submits each task to the actor that its placement names; results stay in
that actor's store. A result another actor needs is returned into the object store as well
and handed to the consumer as a top-level argument, so Ray moves it actor to actor (and
prefetches it while the consumer is busy). Gang members are submitted together and talk
through the object-store transport. Actors run one task at a time, in submission order, and
every actor's queue follows one topological order, so no actor waits on work queued behind it.

Each step gets its own pool of actors, named ``mx:<job>:<step>:worker(i,j)`` after their place
in the step's process grid, ended when the next step starts, when the step fails and when the
job ends: a step whose worker died (``WorkerLost``) is retried on fresh actors, and the
dashboard shows which step each actor served.

Without an address, the backend starts a local Ray for the job (token authentication on) and
shuts it down afterwards; in a process that already runs Ray it uses that and leaves it up. On
a cluster that others share, a step waits in Ray's queue until its placement group fits.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mx.cluster import devices, execute, metrics
from mx.cluster.comm import GangContext
from mx.cluster.objectstore import ObjectStoreComm, Rendezvous
from mx.errors import JobCancelled, JobFailed, UserError, WorkerLost, first_line
from mx.tasks import ops
from mx.tasks.graph import StepGraph, schedule, unit_keys

NAMESPACE = "mx"
# Ray warns on every start that token authentication is on; mx keeps it on on purpose.
logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
PLACEMENT_TIMEOUT_S = 60.0
POLL_S = 0.25
DRILL_PREFIX = "MX_FAULT"  # environment variables that plan faults for drills and tests


@ray.remote
class Worker:
    """One worker: runs the tasks placed on it and keeps their results."""

    def __init__(self, rank: int, gpu: bool, rendezvous, job: str = "", step: str = "",
                 drills: dict | None = None):
        # fault drills (MX_FAULT*) as the driver has them now: the process may have inherited
        # another set from whoever started Ray
        for name in [n for n in os.environ if n.startswith(DRILL_PREFIX)]:
            del os.environ[name]
        os.environ.update(drills or {})
        self.rank = rank
        self.tags = {"job": job, "step": step}
        self.gpu = gpu
        self.xp = devices.array_module(gpu)
        if gpu:
            devices.select_gpu(ray.get_gpu_ids())
            devices.warm_up()
        # the ops' modules (Zarr, the kernels), imported as the worker starts rather than in its
        # first task, where they cost a fresh GPU worker ~0.5 s
        ops.registry()
        self.rendezvous = rendezvous
        self.store: dict[Any, Any] = {}

    def _report(self, values: dict) -> None:
        metrics.publish(values, **self.tags)

    def describe(self) -> dict:
        info = execute.describe_process(self.rank, devices.device_name(self.gpu))
        ctx = ray.get_runtime_context()
        info.update(node=ctx.get_node_id()[:12], actor=ctx.get_actor_id()[:12],
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                    threads=os.environ.get("OMP_NUM_THREADS", "?"))
        return info

    def run(self, key, node, local: list, keep: bool, release: list, gang: tuple | None,
            output: bool, remote: list, *remote_values) -> dict:
        value, info = self._run(key, node, local, keep, release, gang, remote, remote_values)
        if output:
            info["value"] = value
        return info

    @ray.method(num_returns=2)
    def run_export(self, key, node, local: list, keep: bool, release: list, gang: tuple | None,
                   output: bool, remote: list, *remote_values):
        value, info = self._run(key, node, local, keep, release, gang, remote, remote_values)
        if output:
            info["value"] = value
        return info, value

    def _run(self, key, node, local, keep, release, gang, remote, remote_values):
        values = {dep: self.store[dep] for dep in local}
        values.update(zip(remote, remote_values))
        ctx = name = control = None
        if gang is not None:
            name, rank, size, members = gang
            control = ObjectStoreComm(self.rendezvous, name, rank, size)
            comm = control
            if self.gpu and size > 1:
                from mx.cluster.nccl import NcclComm

                # made on first use: gangs that never exchange need no communicator. A gang
                # of one has no peers to exchange with, and making its NCCL communicator
                # would cost a fresh worker ~0.5 s
                comm = lambda: NcclComm.for_gang(control, members)  # noqa: E731
            ctx = GangContext(comm_or_factory=comm, xp=self.xp, control_comm=control,
                              advance=lambda n: self.rendezvous.advance.remote(n),
                              report=self._report if rank == 0 else lambda values: None)
        try:
            value, info = execute.run(key, node, values, self.rank, None, ctx, name)
        finally:
            if control is not None:
                control.close()
            for dep in release:
                self.store.pop(dep, None)
        if keep:
            self.store[key] = value
        return value, info


class RayBackend:
    name = "ray"

    def __init__(self, workers: int, gpus: int = 0, address: str | None = None,
                 job_id: str = "job", dashboard: bool = False,
                 cpus_per_worker: float | None = None):
        self.workers = workers
        self.gpus = gpus
        self.address = address
        self.job_id = job_id
        self.dashboard = dashboard
        self.cpus_per_worker = cpus_per_worker
        self.cpus_each = 1.0
        self.started_ray = False
        self.log: Callable[[str], None] = lambda line: None
        self.pg = None
        self.actors: list = []
        self.described: list[dict] = []
        self.startup_s = 0.0
        self.names: list[str] = []
        self.pool_step: str | None = None  # the step whose workers are up
        self.rendezvous = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, log: Callable[[str], None]) -> None:
        """Connect to Ray (or start it) and check that the cluster can ever hold the job.
        Workers start with each step (``run``), so that a step can be retried on fresh ones."""
        self.log = log
        self.cpus_each = self._connect(log)
        need = {"CPU": self.cpus_each * self.workers, "GPU": float(self.gpus > 0) * self.workers}
        have = ray.cluster_resources()
        if self.gpus > 0:
            devices.require_gpus(self.workers, int(have.get("GPU", 0)), "", "the Ray cluster")
        if any(v > have.get(k, 0) + 1e-9 for k, v in need.items()):
            raise UserError(f"resources: the Ray cluster has {_resources(have)}, fewer than the "
                            f"{self.workers} workers of {self._bundle()} need; ask for fewer "
                            f"workers (or cpus_per_worker) or add nodes")

    def _bundle(self) -> dict:
        return {"CPU": self.cpus_each, **({"GPU": 1} if self.gpus > 0 else {})}

    def _connect(self, log) -> float:
        """Connect to (or start) Ray; returns the CPUs each worker asks for."""
        cores = os.cpu_count() or 1
        if ray.is_initialized():
            log("ray: using the Ray instance this process already runs")
        elif self.address is None:
            # Token authentication stays on: Ray's default for local clusters since 2.59.
            self.started_ray = True  # set first: a cancel during init must still shut it down
            # address="local": a new Ray for this job, even where another runs on the machine;
            # its CPUs are what plan.check_ray_capacity checked the job against
            ray.init(address="local", num_cpus=max(cores, self.workers), namespace=NAMESPACE,
                     include_dashboard=self.dashboard, log_to_driver=False,
                     logging_level="WARNING", configure_logging=True)
            log(f"ray: started a local Ray {ray.__version__} for this job at "
                f"{ray.get_runtime_context().gcs_address}, {max(cores, self.workers)} logical CPUs")
        else:
            if "://" in self.address and not self.address.startswith("ray://"):
                raise UserError(f"address {self.address}: a dashboard URL is where `mx submit` "
                                f"sends jobs (Jobs API); `mx run` joins a cluster as a driver "
                                f"and needs its GCS address host:port")
            from mx.cluster import head

            head.use_auth(self.address)
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level="WARNING")
            log(f"ray: connected to the cluster at {ray.get_runtime_context().gcs_address}")
        if self.cpus_per_worker is not None:
            return float(self.cpus_per_worker)
        total_cpus = ray.cluster_resources().get("CPU", 0)
        if self.gpus > 0 or not self.started_ray:
            # a cluster others share: one CPU per worker unless told more (a share where
            # the cluster has fewer CPUs than workers)
            return min(1.0, max(0.01, total_cpus / self.workers))
        return float(max(1, int(total_cpus // self.workers))) if total_cpus >= self.workers else \
            max(0.01, total_cpus / self.workers)

    def _open_pool(self, graph: StepGraph, cancelled: Callable[[], bool]) -> None:
        """Start the step's workers, named for what they do (``mx:<job>:<step>:worker(i,j)``,
        as the dashboard shows them), in a placement group. On a shared cluster the group
        waits, queued, until other jobs free what it needs; a Ray mx started waits a minute."""
        gpu = self.gpus > 0
        prefix = f"mx:{self.job_id}:{graph.step}"
        self.pg = placement_group([self._bundle() for _ in range(self.workers)], strategy="PACK",
                                  name=prefix)
        self.pool_step = graph.step
        waited, ready_ref = 0.0, self.pg.ready()
        while not ray.wait([ready_ref], timeout=POLL_S * 4)[0]:
            waited += POLL_S * 4
            if cancelled():
                raise JobCancelled("cancelled while waiting for workers")
            if self.started_ray and waited >= PLACEMENT_TIMEOUT_S:
                raise UserError(f"resources: Ray cannot place {self.workers} workers of "
                                f"{self._bundle()} within {PLACEMENT_TIMEOUT_S:.0f} s (it has "
                                f"{_resources(ray.cluster_resources())})")
            if waited % 30 < POLL_S * 4:
                self.log(f"step {graph.step}: queued for {waited:.0f} s: waiting for "
                         f"{self.workers} × {self._bundle()} (free now: "
                         f"{_resources(ray.available_resources())})")
        self.rendezvous = Rendezvous.options(name=f"{prefix}:rendezvous",
                                             namespace=NAMESPACE).remote()
        self.names = [f"{prefix}:{graph.worker_name(rank)}" for rank in range(self.workers)]
        drills = {name: value for name, value in os.environ.items() if name.startswith(DRILL_PREFIX)}
        # Ray sets OMP_NUM_THREADS to each actor's CPU count, which sizes its BLAS pool; a
        # runtime_env would cost a fresh worker process per actor.
        self.actors = [
            Worker.options(
                name=self.names[rank], namespace=NAMESPACE,
                num_cpus=self.cpus_each, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
            ).remote(rank, gpu, self.rendezvous, self.job_id, graph.step, drills)
            for rank in range(self.workers)
        ]
        try:
            self.described = ray.get([a.describe.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"a worker of step {graph.step} died as it started: "
                             f"{first_line(exc)}") from None
        self.log(f"workers: {self.workers} actors {prefix}:worker(..) in placement group "
                 f"{prefix}; gang transport " + ("nccl (GPU to GPU)" if gpu else "ray object store"))
        for d, name in zip(self.described, self.names):
            self.log(f"{name}: actor {d['actor']} pid {d['pid']} on {d['host']} (node {d['node']}), "
                     f"{d['device']}" + (f", GPU ids {','.join(d['gpu_ids'])}" if d["gpu_ids"]
                                         else f", {d['threads']} BLAS threads"))

    def _close_pool(self) -> None:
        """End the step's workers and give their resources back."""
        self.pool_step = None
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.rendezvous is not None:
            try:
                ray.kill(self.rendezvous)
            except Exception:
                pass
            self.rendezvous = None
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def stop(self) -> None:
        if ray.is_initialized():
            self._close_pool()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    # -- running a graph ------------------------------------------------------------------
    def run(self, graph: StepGraph, on_progress: Callable[[int], None] = lambda n: None,
            cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        """Run one step's graph on workers started for that step (kept for further graphs of
        the same step, ended when another step starts, on any failure, and by ``stop``)."""
        graph.check(self.workers)
        self.startup_s = 0.0  # seconds this run spent starting its workers
        if self.pool_step != graph.step:
            t0 = time.perf_counter()
            self._close_pool()
            self._open_pool(graph, cancelled)
            self.startup_s = time.perf_counter() - t0
        try:
            return self._run(graph, on_progress, cancelled)
        except BaseException:
            self._close_pool()  # a failed step's workers may hold half-done state or be dead
            raise

    def _run(self, graph: StepGraph, on_progress, cancelled) -> list[dict]:
        order = schedule(graph)
        owner = graph.placement
        outputs = set(graph.outputs)
        gang_of = graph.gang_of()
        flat = [key for unit in order for key in unit_keys(graph, unit)]
        users: dict = defaultdict(list)
        for key in flat:
            for dep in graph.dependencies(key):
                users[dep].append(key)
        last_local_use = {}
        for key in flat:
            for dep in graph.dependencies(key):
                if owner[dep] == owner[key]:
                    last_local_use[dep] = key
        releases: dict = defaultdict(list)
        for dep, key in last_local_use.items():
            releases[key].append(dep)

        exported: dict = {}
        remaining_remote = {k: sum(owner[u] != owner[k] for u in users[k]) for k in flat}
        pending: dict = {}  # info ref -> key
        for key in flat:
            rank = owner[key]
            deps = sorted(graph.dependencies(key), key=repr)
            local = [d for d in deps if owner[d] == rank]
            remote = [d for d in deps if owner[d] != rank]
            gang = None
            if key in gang_of:
                members = graph.gangs[gang_of[key]]
                gang = (gang_of[key], members.index(key), len(members),
                        tuple(owner[m] for m in members))
            keep = any(owner[u] == rank for u in users[key])
            args = (key, graph.dsk[key], local, keep, releases[key], gang, key in outputs, remote,
                    *[exported[d] for d in remote])
            actor = self.actors[rank]
            if remaining_remote[key]:
                info_ref, exported[key] = actor.run_export.remote(*args)
            else:
                info_ref = actor.run.remote(*args)
            pending[info_ref] = key
            for d in remote:
                remaining_remote[d] -= 1
                if remaining_remote[d] == 0:
                    del exported[d]  # the consumer's pending task keeps it alive
        return self._collect(graph, pending, gang_of, on_progress, cancelled)

    def _collect(self, graph, pending, gang_of, on_progress, cancelled) -> list[dict]:
        infos, done_tasks, ticks, last_poll = [], 0, 0, 0.0
        base = ray.get(self.rendezvous.count.remote())  # units reported by earlier graphs
        tick_ref = None
        while pending:
            if cancelled():
                raise JobCancelled("cancelled")
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if not isinstance(exc.cause, execute.TaskError):
                        raise JobFailed(f"task {key!r} failed: {first_line(exc)}") from None
                    if exc.cause.retryable:
                        raise WorkerLost(str(exc.cause)) from None
                    raise exc.cause from None
                except ray.exceptions.RayActorError as exc:
                    rank = graph.placement[key]
                    d = self.described[rank]
                    raise WorkerLost(f"worker {self.names[rank]} (pid {d['pid']} on {d['host']}) "
                                     f"died while running task {key!r}: {first_line(exc)}") from None
                info["label"] = graph.labels.get(key)
                infos.append(info)
                if key not in gang_of:
                    done_tasks += 1
            now = time.monotonic()
            if tick_ref is not None and ray.wait([tick_ref], timeout=0)[0]:
                ticks = ray.get(tick_ref) - base
                tick_ref = None
            if tick_ref is None and now - last_poll > POLL_S:
                tick_ref, last_poll = self.rendezvous.count.remote(), now
            on_progress(done_tasks + ticks)
        ticks = ray.get(self.rendezvous.count.remote()) - base
        on_progress(done_tasks + ticks)
        return infos


def _resources(res: dict) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))

