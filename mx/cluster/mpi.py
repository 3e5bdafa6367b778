"""The MPI backend: the same graphs, run as SPMD ranks with mpi4py (Slurm and HPC clusters).

Every rank plans the job the same way and walks the same schedule, running the tasks placed
on it. A result another rank needs is sent to it when it is made (nonblocking) and received
when needed. Each task has a unique tag: its position in the schedule. As in the Ray backend,
whatever a rank waits for comes earlier in the one order every rank follows, so nothing
deadlocks. A gang runs on a communicator of its members' ranks; a square gang gets a periodic
Cartesian communicator, whose Shift neighbours are the ones Cannon's program uses. Rank 0 is
the driver: it keeps the job record and commits outputs after the others are done.

With GPUs each rank takes the GPU of its node-local rank. Blocks go through MPI straight from
device memory when the MPI library is CUDA-aware (asked with MPIX_Query_cuda_support), and
are otherwise staged through pinned host buffers. Which one is detected and logged, never
assumed.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from mx.cluster import devices, execute
from mx.cluster.comm import Comm, GangContext, Request
from mx.errors import JobCancelled, UserError
from mx.tasks.graph import StepGraph, schedule, unit_keys

# variables that launchers set in every rank (MPICH/Hydra, Open MPI, Slurm's srun)
LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


def launched() -> bool:
    """True inside a process started by mpiexec/srun (as one of several or of one rank).

    srun sets the PMI variables only with an MPI plugin (``srun --mpi=pmi2``, or the site's
    ``MpiDefault``). Without one, each of its tasks would be a rank of its own and start a
    whole MPI job of its own: that is refused here, naming the fix."""
    if any(v in os.environ for v in LAUNCH_VARS):
        return True
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")  # set in srun's tasks, not in sbatch's script
    if "SLURM_STEP_ID" in os.environ and tasks.isdigit() and int(tasks) > 1:
        raise UserError(f"srun started this process as one of {tasks} tasks without an MPI plugin "
                        f"(no PMI_RANK or PMIX_RANK is set), so the tasks cannot form one MPI job: "
                        f"launch with `srun --mpi=pmi2 mx run job.yaml` (mx's MPICH speaks PMI-2), "
                        f"as deploy/slurm/mx-mpi.sbatch does")
    return False


def check_launch(workers: int) -> None:
    """Refuse an MPI launch whose number of ranks is not the job's number of workers (each
    rank runs one worker): bad input, in the launch command or the job file."""
    from mpi4py import MPI

    size = MPI.COMM_WORLD.Get_size()
    if size != workers:
        raise UserError(f"resources.workers: the job has {_count(workers, 'worker')} but this "
                        f"MPI launch has {_count(size, 'rank')}, and each rank runs one worker; "
                        f"launch {_count(workers, 'rank')} (mpiexec -n {workers}, srun -n "
                        f"{workers}) or set resources.workers to {size}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cuda_aware() -> tuple[bool, str]:
    """Whether the loaded MPI library takes device pointers, and how that was found out."""
    import ctypes

    from mpi4py import MPI  # noqa: F401  (loads libmpi)

    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libmpi" in line and ".so" in line:
                    paths.add(line.split()[-1])
    except OSError:
        pass
    for path in sorted(paths):
        try:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support")
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query()), f"MPIX_Query_cuda_support() in {os.path.basename(path)}"
    return False, "the MPI library offers no MPIX_Query_cuda_support"


def _tag(value: Any, upper: int) -> int:
    return zlib.crc32(repr(value).encode()) % upper


class MpiComm(Comm):
    """A gang's view over an MPI communicator: NumPy (or device) buffers go as typed
    messages, anything else pickled."""

    def __init__(self, comm, tag_upper: int, gpu: bool = False, device_buffers: bool = False):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.tag_upper = tag_upper
        self.gpu = gpu
        self.device_buffers = device_buffers
        self.transport = "mpi" + ((" (CUDA-aware)" if device_buffers else " (staged through pinned host memory)")
                                  if gpu else "")

    def start(self, sends, recvs):
        from mpi4py import MPI

        requests, keep = [], []
        for value, dest, tag in sends:
            t = _tag(tag, self.tag_upper)
            buffer = self._send_buffer(value)
            if buffer is None:
                requests.append(self.comm.isend(value, dest=dest, tag=t))
            else:
                keep.append(buffer)
                requests.append(self.comm.Isend(buffer, dest=dest, tag=t))
        received = []
        for source, tag, shape, dtype in recvs:
            t = _tag(tag, self.tag_upper)
            if shape is None:
                # pickled: received in wait() with recv, which sizes its buffer by probing
                # (irecv's default buffer would truncate larger objects)
                received.append((None, (source, t)))
            else:
                buffer = self._recv_buffer(shape, dtype)
                received.append((buffer, self.comm.Irecv(buffer, source=source, tag=t)))

        def wait():
            out = []
            for buffer, request in received:
                if buffer is None:
                    out.append(self.comm.recv(source=request[0], tag=request[1]))
                else:
                    request.Wait()
                    out.append(self._from_buffer(buffer))
            MPI.Request.Waitall(requests)
            keep.clear()
            return out

        return Request(wait)

    def _send_buffer(self, value):
        if isinstance(value, np.ndarray):
            return np.ascontiguousarray(value)
        if self.gpu and hasattr(value, "__cuda_array_interface__"):
            import cupy

            if self.device_buffers:
                cupy.cuda.get_current_stream().synchronize()  # MPI reads the memory now
                return cupy.ascontiguousarray(value)
            from mx.storage.dense import pooled_pinned

            host = pooled_pinned(value.shape, value.dtype)
            value.get(out=host)
            return host
        return None

    def _recv_buffer(self, shape, dtype):
        if self.gpu and self.device_buffers:
            import cupy

            return cupy.empty(shape, dtype)
        if self.gpu:
            from mx.storage.dense import pooled_pinned

            return pooled_pinned(shape, dtype)
        return np.empty(shape, dtype)

    def _from_buffer(self, buffer):
        if self.gpu and not self.device_buffers:
            import cupy

            return cupy.asarray(buffer)
        return buffer


class MpiBackend:
    name = "mpi"

    def __init__(self, workers: int, gpus: int = 0, job_id: str = "job"):
        from mpi4py import MPI

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        check_launch(workers)
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.is_driver = self.rank == 0
        self.gpu = gpus > 0
        self.job_id = job_id
        self.tag_upper = int(self.world.Get_attr(MPI.TAG_UB) or 32767)
        self.comms: dict[tuple, Any] = {}
        self.xp = np
        self.device_buffers = False

    def start(self, log: Callable[[str], None]) -> list[dict]:
        device = "cpu"
        why = ""
        if self.gpu:
            local = self.world.Split_type(self.MPI.COMM_TYPE_SHARED)
            count, reason = devices.gpu_count()
            if count == 0:
                raise UserError(f"resources.gpus: rank {self.rank} sees no GPU ({reason}); set gpus: 0")
            import cupy

            cupy.cuda.Device(local.Get_rank() % count).use()
            self.xp = cupy
            device = devices.device_name(True)
            self.device_buffers, why = cuda_aware()
        info = execute.describe_process(self.rank, device)
        described = self.world.gather(info, root=0)
        if self.is_driver:
            log(f"mpi: {self.size} ranks, {self.MPI.Get_library_version().splitlines()[0].strip()}")
            for d in described:
                log(f"rank {d['worker']}: pid {d['pid']} on {d['host']}, {d['device']}")
            if self.gpu:
                log("gang transport: " + ("CUDA-aware MPI, device buffers passed directly"
                                          if self.device_buffers else
                                          "MPI through pinned host buffers (not CUDA-aware)")
                    + f" [{why}]")
            else:
                log("gang transport: MPI point to point (Cartesian communicator for square grids)")
        return described or []

    def stop(self) -> None:
        for comm in self.comms.values():
            if comm is not self.world:
                comm.Free()
        self.comms.clear()

    def _gang_comm(self, ranks: tuple):
        comm = self.comms.get(ranks)
        if comm is None:
            if list(ranks) == list(range(self.size)):
                base = self.world.Dup()
            else:
                base = self.world.Create_group(self.world.Get_group().Incl(list(ranks)))
            q = math.isqrt(len(ranks))
            if q >= 2 and q * q == len(ranks):
                cart = base.Create_cart([q, q], periods=[True, True], reorder=False)
                i, j = divmod(cart.Get_rank(), q)
                # Cannon's program addresses neighbours by rank; the Cartesian shifts agree
                assert cart.Shift(1, -1) == (i * q + (j + 1) % q, i * q + (j - 1) % q)
                base.Free()
                base = cart
            comm = self.comms[ranks] = base
        return comm

    def run(self, graph: StepGraph, on_progress: Callable[[int], None] = lambda n: None,
            cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        graph.check(self.size)
        order = schedule(graph)
        owner = graph.placement
        flat = [key for unit in order for key in unit_keys(graph, unit)]
        tag_of = {key: i % self.tag_upper for i, key in enumerate(flat)}
        users: dict = defaultdict(set)
        remaining: dict = defaultdict(int)
        for key in flat:
            for dep in graph.dependencies(key):
                users[dep].add(owner[key])
                if owner[key] == self.rank:
                    remaining[dep] += 1
        outputs = set(graph.outputs)
        gang_of = graph.gang_of()
        store: dict = {}
        infos: list[dict] = []
        sends: list = []
        done = 0  # progress units of this rank; the driver reports them × ranks (an estimate)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if self.is_driver:
                on_progress(min(graph.progress, done * self.size))

        self.world.Barrier()  # the driver has created the step's output
        for unit in order:
            if self.is_driver and cancelled():
                raise JobCancelled("cancelled")
            for key in unit_keys(graph, unit):
                if owner[key] != self.rank:
                    continue
                values = {}
                for dep in graph.dependencies(key):
                    if owner[dep] == self.rank:
                        values[dep] = store[dep]
                    else:
                        values[dep] = self.world.recv(source=owner[dep], tag=tag_of[dep])
                ctx = name = None
                if key in gang_of:
                    name = gang_of[key]
                    ranks = tuple(owner[m] for m in graph.gangs[name])
                    comm = MpiComm(self._gang_comm(ranks), self.tag_upper, self.gpu, self.device_buffers)
                    ctx = GangContext(comm_or_factory=comm, xp=self.xp, advance=advance)
                value, info = execute.run(key, graph.dsk[key], values, self.rank,
                                          graph.labels.get(key), ctx, name)
                info["label"] = graph.labels.get(key)
                if key in outputs:
                    info["value"] = value
                infos.append(info)
                for rank in users.get(key, ()):
                    if rank != self.rank:
                        sends.append(self.world.isend(value, dest=rank, tag=tag_of[key]))
                if remaining.get(key):
                    store[key] = value
                for dep in graph.dependencies(key):
                    if owner[dep] == self.rank:
                        remaining[dep] -= 1
                        if remaining[dep] == 0:
                            store.pop(dep, None)
                if key not in gang_of:
                    advance(1)
        self.MPI.Request.Waitall(sends)
        gathered = self.world.gather(infos, root=0)
        return [i for part in gathered for i in part] if self.is_driver else infos
