"""The Ray backend: a pool of long-lived worker actors, one per worker (GPU or CPU slot).

The actors are placed with a placement group and live for the whole job. The driver walks the
step's schedule and submits each task to the actor that its placement names; results stay in
that actor's store. A result another actor needs is returned into the object store as well
and handed to the consumer as a top-level argument, so Ray moves it actor to actor (and
prefetches it while the consumer is busy). Gang members are submitted together and talk
through the object-store transport. Actors run one task at a time, in submission order, and
every actor's queue follows one topological order, so no actor waits on work queued behind it.

Without an address, the backend starts a local Ray for the job (token authentication on) and
shuts it down afterwards; in a process that already runs Ray it uses that and leaves it up.
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

from mx.cluster import devices, execute
from mx.cluster.comm import GangContext
from mx.cluster.objectstore import ObjectStoreComm, Rendezvous
from mx.errors import JobCancelled, JobFailed, UserError
from mx.tasks.graph import StepGraph, schedule, unit_keys

NAMESPACE = "mx"
# Ray warns on every start that token authentication is on; mx keeps it on on purpose.
logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
PLACEMENT_TIMEOUT_S = 60.0
POLL_S = 0.25


@ray.remote
class Worker:
    """One worker: runs the tasks placed on it and keeps their results."""

    def __init__(self, rank: int, gpu: bool, rendezvous):
        self.rank = rank
        self.gpu = gpu
        self.xp = devices.array_module(gpu)
        if gpu:
            devices.select_gpu(ray.get_gpu_ids())
        self.rendezvous = rendezvous
        self.store: dict[Any, Any] = {}

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
            if self.gpu:
                from mx.cluster.nccl import NcclComm

                # made on first use: gangs that never exchange need no communicator
                comm = lambda: NcclComm.for_gang(control, members)  # noqa: E731
            ctx = GangContext(comm_or_factory=comm, xp=self.xp, control_comm=control,
                              advance=lambda n: self.rendezvous.advance.remote(n))
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
                 job_id: str = "job", dashboard: bool = False):
        self.workers = workers
        self.gpus = gpus
        self.address = address
        self.job_id = job_id
        self.dashboard = dashboard
        self.started_ray = False
        self.pg = None
        self.actors: list = []
        self.rendezvous = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, log: Callable[[str], None]) -> list[dict]:
        gpu = self.gpus > 0
        cpus_each = self._connect(log)
        if gpu:
            have = int(ray.cluster_resources().get("GPU", 0))
            devices.require_gpus(self.gpus, have, "", "the Ray cluster")
        bundle = {"CPU": cpus_each, **({"GPU": 1} if gpu else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.workers)], strategy="PACK",
                                  name=f"mx:{self.job_id}")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            total = ray.cluster_resources()
            raise UserError(f"resources: the Ray cluster cannot place {self.workers} workers of "
                            f"{bundle} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster has "
                            f"{ {k: v for k, v in total.items() if k in ('CPU', 'GPU')} }); "
                            f"ask for fewer workers or add nodes")
        self.rendezvous = Rendezvous.options(name=f"mx:{self.job_id}:rendezvous",
                                             namespace=NAMESPACE).remote()
        # Ray sets OMP_NUM_THREADS to each actor's CPU count, which sizes its BLAS pool; a
        # runtime_env would cost a fresh worker process per actor.
        self.actors = [
            Worker.options(
                name=f"mx:{self.job_id}:worker{rank}", namespace=NAMESPACE,
                num_cpus=cpus_each, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
            ).remote(rank, gpu, self.rendezvous)
            for rank in range(self.workers)
        ]
        described = ray.get([a.describe.remote() for a in self.actors])
        log(f"workers: {self.workers} actors in placement group mx:{self.job_id}; gang transport "
            + ("nccl (GPU to GPU)" if gpu else "ray object store"))
        for d in described:
            log(f"worker {d['worker']}: actor {d['actor']} pid {d['pid']} on {d['host']} "
                f"(node {d['node']}), {d['device']}"
                + (f", GPU ids {','.join(d['gpu_ids'])}" if d["gpu_ids"] else f", {d['threads']} BLAS threads"))
        return described

    def _connect(self, log) -> float:
        """Connect to (or start) Ray; returns the CPUs each worker asks for."""
        cores = os.cpu_count() or 1
        if ray.is_initialized():
            log("ray: using the Ray instance this process already runs")
        elif self.address is None:
            # Token authentication stays on: Ray's default for local clusters since 2.59.
            self.started_ray = True  # set first: a cancel during init must still shut it down
            # address="local": a new Ray for this job, even where another runs on the machine
            ray.init(address="local", num_cpus=max(cores, self.workers), namespace=NAMESPACE,
                     include_dashboard=self.dashboard, log_to_driver=False,
                     logging_level="WARNING", configure_logging=True)
            log(f"ray: started a local Ray {ray.__version__} for this job at "
                f"{ray.get_runtime_context().gcs_address}, {max(cores, self.workers)} logical CPUs")
        else:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level="WARNING")
            log(f"ray: connected to the cluster at {self.address}")
        total_cpus = ray.cluster_resources().get("CPU", 0)
        if self.gpus > 0:
            return 1.0
        return float(max(1, int(total_cpus // self.workers))) if total_cpus >= self.workers else \
            max(0.01, total_cpus / self.workers)

    def stop(self) -> None:
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
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    # -- running a graph ------------------------------------------------------------------
    def run(self, graph: StepGraph, on_progress: Callable[[int], None] = lambda n: None,
            cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        graph.check(self.workers)
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
        base = ray.get(self.rendezvous.count.remote())  # units reported by earlier steps
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
                    cause = exc.cause if isinstance(exc.cause, execute.TaskError) else exc
                    raise JobFailed(self._failure(key, cause)) from None
                except ray.exceptions.RayActorError as exc:
                    raise JobFailed(f"worker {graph.placement[key]} died while running task "
                                    f"{key!r}: {_first_line(exc)}") from None
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

    def _failure(self, key, cause) -> str:
        if isinstance(cause, execute.TaskError):
            return f"{cause}\n{cause.trace}".rstrip()
        return f"task {key!r} failed: {_first_line(cause)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

