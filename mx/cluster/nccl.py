"""The NCCL transport: gang messages GPU to GPU, on a stream of their own.

Each exchange (``start``) is one NCCL group of sends and receives on the communicator's
stream. Before it, that stream waits for an event recorded on the caller's (compute) stream,
so the data sent is ready and the memory received into is free; ``wait()`` makes the compute
stream wait for the exchange's event. Neither blocks the host: a program starts the next
shift, launches its product, and the two overlap on the GPU. Blocks never pass through the
host or the Ray object store.

Communicators are made once per set of workers (the unique id travels through the gang's
control transport), warmed up with a small exchange so the first timed shift is not the one
that sets NCCL up, and cached for the rest of the job.
"""

from __future__ import annotations

import numpy as np

from mx.cluster.comm import Comm, Request

_CACHE: dict[tuple, "NcclComm"] = {}


class NcclComm(Comm):
    transport = "nccl"

    def __init__(self, unique_id, rank: int, size: int):
        import cupy
        from cupy.cuda import nccl

        self.rank, self.size = rank, size
        self._nccl = nccl
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.bytes_sent = 0
        self.spans: list | None = None  # while traced: (began, finished) events per exchange

    @classmethod
    def for_gang(cls, control: Comm, members: tuple) -> "NcclComm":
        """The communicator of this set of workers, made on first use (collectively)."""
        key = tuple(members)
        comm = _CACHE.get(key)
        if comm is None:
            from cupy.cuda import nccl

            uid = nccl.get_unique_id() if control.rank == 0 else None
            uid = control.ibcast(uid, 0, list(range(control.size)), ("nccl-uid", key)).wait()
            comm = cls(uid, control.rank, control.size)
            comm.warm_up()
            _CACHE[key] = comm
        return comm

    def warm_up(self) -> None:
        import cupy

        if self.size > 1:
            right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
            self.start([(cupy.ones(1024, np.float32), right, "warm")],
                       [(left, "warm", (1024,), np.float32)]).wait()
        cupy.cuda.get_current_stream().synchronize()

    def start(self, sends, recvs):
        import cupy

        compute = cupy.cuda.get_current_stream()
        outs = [cupy.empty(shape, dtype=dtype) for _, _, shape, dtype in recvs]
        self.stream.wait_event(compute.record())
        began = self.stream.record() if self.spans is not None else None
        nccl = self._nccl
        nccl.groupStart()
        try:
            for value, dest, _ in sends:
                value = _contiguous(value)
                if value.nbytes:
                    self.comm.send(value.data.ptr, value.nbytes, nccl.NCCL_UINT8, dest, self.stream.ptr)
                    self.bytes_sent += value.nbytes
            for (source, _, _, _), out in zip(recvs, outs):
                if out.nbytes:
                    self.comm.recv(out.data.ptr, out.nbytes, nccl.NCCL_UINT8, source, self.stream.ptr)
        finally:
            nccl.groupEnd()
        finished = self.stream.record()
        if self.spans is not None:
            self.spans.append((began, finished))

        def wait():
            cupy.cuda.get_current_stream().wait_event(finished)
            return outs

        return Request(wait)

    def trace(self) -> None:
        """From now on, record when each exchange runs on the NCCL stream."""
        self.spans = []

    def take_spans(self) -> list:
        """The (began, finished) CUDA events of the exchanges since ``trace``; stops tracing."""
        spans, self.spans = self.spans or [], None
        return spans

    def close(self) -> None:
        pass  # cached for the job; freed with the worker


def _contiguous(value):
    import cupy

    value = cupy.asarray(value)
    return value if value.flags.c_contiguous else cupy.ascontiguousarray(value)
