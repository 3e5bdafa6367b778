"""Checking a whole job before anything runs, and planning each step.

Every input is opened and checked, every step's op plans its work (algorithm, grid, blocks)
and says what its output will be, so a step that consumes ``step:<id>`` is checked against
the planned output of that earlier step. Any problem is a ``UserError`` naming the field.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from mx.errors import UserError
from mx.kernels import dit
from mx.storage import commit, dense, sparse
from mx.tasks import ops, spec


@dataclass
class StepPlan:
    index: int
    step: spec.Step
    op: ops.Op
    inputs: dict[str, str]  # input name -> resolved path
    output: str  # resolved output path
    plan: Any  # the op's plan

    @property
    def what(self) -> str:
        return step_where(self.index, self.step)


@dataclass
class JobPlan:
    job: spec.Job
    base: str
    workers: int
    steps: list[StepPlan]


INSPECT = {"dense": dense.inspect, "sparse": sparse.inspect}


def plan_job(job: spec.Job, base: str, job_name: str, job_id: str | None = None,
             address: str | None = None) -> JobPlan:
    """Check a job named ``job_name`` and plan its steps; ``job_id`` names the job itself once it
    runs (its own locks on its outputs are no conflict), ``address`` the Ray cluster it is sent
    to when that is not in the job (``mx submit --address``)."""
    if job.backend == "mpi" and job.resources.address is not None:
        raise UserError("resources.address: an MPI job runs as ranks started by mpiexec or srun, "
                        "not on a Ray cluster; drop address or use backend: ray")
    if job.backend == "local" and job.resources.address is not None:
        raise UserError("resources.address: a local job runs in this one process, not on a Ray "
                        "cluster (address is for backend: ray); drop address or use backend: ray")
    workers = job.resources.worker_count()
    check_resources(job.resources, workers, address)
    registry = ops.registry()
    planned: dict[str, tuple[str, Any]] = {}  # step id -> (output path, output info)
    first_use: dict[str, str] = {}  # resolved path -> where it is first read or written
    steps: list[StepPlan] = []
    for index, step in enumerate(job.steps):
        what = step_where(index, step)
        if step.id in planned:
            raise UserError(f"steps[{index}].id: '{step.id}' is already the id of an earlier "
                            f"step; step ids must be unique")
        op = registry.get(step.op)
        if op is None:
            raise UserError(f"{what}.op: unknown op '{step.op}'; use one of "
                            f"{', '.join(sorted(registry))}")
        params = spec.validate(op.params, step.params, f"{what}.params")
        missing = [n for n in op.inputs if n not in step.inputs]
        extra = [n for n in step.inputs if n not in op.inputs]
        if missing or extra:
            problem = (f"missing input '{missing[0]}'" if missing else f"unknown input '{extra[0]}'")
            raise UserError(f"{what}.inputs: {problem}; {step.op} takes inputs "
                            f"{', '.join(op.inputs)}")
        paths, infos = {}, {}
        for name, kind in op.inputs.items():
            value = step.inputs[name]
            where = f"{what}.inputs.{name}"
            ref = spec.step_ref(value)
            if kind == "model":
                if ref is not None:
                    raise UserError(f"{where}: a model is a builtin name or a file, not the "
                                    f"output of a step")
                builtin = value.startswith("builtin:")
                paths[name] = value if builtin else spec.resolve_path(value, base)
                infos[name] = dit.inspect(paths[name], where)
                continue
            if ref is not None:
                if ref not in planned:
                    raise UserError(f"{where}: {value} does not name an earlier step; steps "
                                    f"can use the outputs of steps listed before them")
                paths[name], infos[name] = planned[ref]
                if infos[name].kind != kind:
                    raise UserError(f"{where}: step '{ref}' produces a {infos[name].kind} "
                                    f"matrix but {step.op} needs a {kind} one here")
            else:
                paths[name] = spec.resolve_path(value, base)
                # (a later step that writes it is refused as it is planned: first_use has this read)
                if any(_same(paths[name], out) for out, _ in planned.values()):
                    raise UserError(f"{where}: {value} is written by a step of this job; refer "
                                    f"to it as step:<id> so the order is explicit")
                infos[name] = _inspect(kind, paths[name], where)
            first_use.setdefault(_key(paths[name]), where)
        output = spec.resolve_path(step.output, base)
        for name, p in paths.items():
            if _same(p, output):
                raise UserError(f"{what}.output: {step.output} is also input '{name}'; write the "
                                f"result to another path")
            if _inside(output, p):
                # it would become a node of the input's store (a member of a sparse group)
                raise UserError(f"{what}.output: {step.output} is inside input '{name}' "
                                f"({step.inputs[name]}); write the result outside it")
        for other_id, (other_path, _) in planned.items():
            if _same(other_path, output):
                raise UserError(f"{what}.output: {step.output} is already the output of step "
                                f"'{other_id}'; give each step its own output")
        if _key(output) in first_use:
            raise UserError(f"{what}.output: {step.output} is read by {first_use[_key(output)]}; "
                            f"write the result to another path")
        commit.check_writable(output, f"{what}.output", job_name, step.overwrite)
        commit.check_unlocked(output, f"{what}.output", job_id)
        if op.check_publish is not None:
            op.check_publish(output, f"{what}.output")
        op_plan = op.plan(infos, params, workers, what, gpus=job.resources.gpus)
        planned[step.id] = (output, op_plan.output)
        first_use.setdefault(_key(output), f"{what}.output")
        steps.append(StepPlan(index=index, step=step, op=op, inputs=paths, output=output,
                              plan=op_plan))
    return JobPlan(job=job, base=base, workers=workers, steps=steps)


def check_models(job_plan: JobPlan) -> None:
    """Refuse model weights that are not finite, when the job is submitted. This reads whole
    checkpoints, so it is kept out of ``plan_job``, which runs again in the job's runner and
    in each of its MPI ranks."""
    for sp in job_plan.steps:
        for name, kind in sp.op.inputs.items():
            if kind == "model":
                dit.check_weights(sp.inputs[name], f"{sp.what}.inputs.{name}")


def check_memory(job_plan: JobPlan, address: str | None) -> None:
    """Refuse, when the job is submitted, steps whose work cannot fit the memory of their
    workers (the ops that can tell: ``Op.check_memory``). Only at submit time: the runner of
    a job sent to a cluster plans it again on a machine that is not where its workers are."""
    job = job_plan.job
    here = runs_here(job, address)
    for sp in job_plan.steps:
        if sp.op.check_memory is not None:
            sp.op.check_memory(sp.plan, job.backend, job.resources.gpus, here, sp.what)


def runs_here(job: spec.Job, address: str | None) -> bool:
    """Whether the job's workers run on this machine: the local backend, a local Ray that mx
    starts for the job, or MPI ranks that `mx submit` starts with mpiexec. Not a Ray cluster
    (an address, or a Ray this process already joined, which may be one), nor ranks started
    by srun or mpiexec, which may be spread over nodes."""
    if job.backend == "local":
        return True
    if job.backend == "mpi":
        from mx.cluster import mpi

        return not mpi.launched()
    ray = sys.modules.get("ray")
    joined = ray is not None and ray.is_initialized()
    return (address or job.resources.cluster_address()) is None and not joined


def step_where(index: int, step: spec.Step) -> str:
    """A step as errors name it: its place in the job and its id."""
    return f"steps[{index}] (id: {step.id})"


def check_resources(res: spec.Resources, workers: int, address: str | None = None) -> None:
    """GPUs asked for must exist (checked here for a run on this machine; a cluster's, in
    ``check_ray_capacity``), and there is one worker per GPU."""
    if res.gpus > 0 and workers != res.gpus:
        raise UserError(f"resources: workers ({workers}) must equal gpus ({res.gpus}): mx runs one "
                        f"worker per GPU; drop 'workers' or make them equal")
    if res.gpus > 0 and (address or res.cluster_address()) is None:
        from mx.cluster import devices

        count, why = devices.gpu_count()
        devices.require_gpus(res.gpus, count, why, "this machine")


def check_ray_capacity(res: spec.Resources, workers: int, address: str | None) -> None:
    """A Ray job must fit the Ray it will run on (``address``; None: a local Ray started for
    the job): all its workers' CPUs, each worker's on one node, one GPU per worker. A cluster
    is asked through its dashboard; one that cannot be asked is checked when the job connects."""
    if address is None:
        nodes, where = _local_ray(workers)
    else:
        from mx.cluster import submission

        nodes, where = submission.nodes(address), f"the Ray cluster at {address}"
        if not nodes:
            return
        if res.gpus > 0:
            from mx.cluster import devices

            devices.require_gpus(res.gpus, int(sum(n.get("GPU", 0) for n in nodes)), "", where)
    cpus = res.cpus_per_worker  # unset, workers share what there is
    if cpus is None:
        return
    total = sum(n.get("CPU", 0) for n in nodes)
    largest = max(n.get("CPU", 0) for n in nodes)
    if cpus * workers > total + 1e-9:
        fits = math.floor(total / workers * 100) / 100
        raise UserError(f"resources.cpus_per_worker: {workers} worker{'s' if workers != 1 else ''} "
                        f"× {cpus:g} CPUs asked for, but {where} has {total:g} CPUs; ask for at "
                        f"most {fits:g} CPUs per worker, or fewer workers"
                        + (", or add nodes" if address else ", or run on a Ray cluster "
                                                          "(resources.address)"))
    if cpus > largest + 1e-9:  # a worker's CPUs must be on one node
        raise UserError(f"resources.cpus_per_worker: {cpus:g} CPUs per worker asked for, but the "
                        f"largest node of {where} has {largest:g} CPUs; ask for at most "
                        f"{largest:g}, or add larger nodes")


def _local_ray(workers: int) -> tuple[list[dict], str]:
    """The nodes of the Ray a job without an address runs on, and that Ray in words."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # the job uses the Ray this process runs
        return [n["Resources"] for n in ray.nodes() if n["Alive"]], "the Ray this process runs"
    # what RayBackend starts: a CPU per core, or per worker where there are more workers
    cpus = max(os.cpu_count() or 1, workers)
    return [{"CPU": cpus}], "the local Ray mx starts for this job"


def _inspect(kind: str, path: str, where: str):
    return INSPECT[kind](path, where)


def _key(path: str) -> str:
    return os.path.realpath(path)


def _same(a: str, b: str) -> bool:
    return _key(a) == _key(b)


def _inside(path: str, folder: str) -> bool:
    return _key(path).startswith(_key(folder).rstrip(os.sep) + os.sep)
