"""The communicator a gang program sees, and the in-process transport.

One small interface, one module per transport (``objectstore`` for Ray actors on CPUs, later
NCCL and MPI), as in ``ray.util.collective``. Ranks are positions in the gang. Every operation
is nonblocking and returns a ``Request`` whose ``wait()`` gives the received value, so a
program can start a shift, compute, and wait only when it needs the data (double buffering).

Tags must be unique among the messages between one pair of ranks in a gang (programs use
``(what, round)``). A sent value must not be modified by its sender afterwards; a received
value may be read-only. An array is sent as a buffer and must be received with its shape and
dtype; any other object (box arrays in a list to send them this way) is received with shape
None. The MPI and NCCL transports depend on this; the others accept both.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class GangAborted(RuntimeError):
    """A peer of this gang failed; the gang stops."""


class Request:
    """A nonblocking operation; ``wait()`` returns its value (None for sends)."""

    def __init__(self, wait: Callable[[], Any]):
        self._wait = wait
        self._done = False
        self._value = None

    def wait(self) -> Any:
        if not self._done:
            self._value = self._wait()
            self._done = True
        return self._value


def done(value: Any = None) -> Request:
    request = Request(lambda: value)
    request.wait()
    return request


class Comm:
    """Point-to-point and broadcast among the ranks of one gang.

    ``start`` is the one primitive a transport implements: it posts a batch of sends and
    receives together (NCCL needs a whole exchange in one group to avoid deadlock) and returns
    a request whose ``wait()`` gives the received values in order. A receive names the shape
    and dtype it expects, so a GPU transport can allocate the buffer; the others ignore them.
    """

    rank: int
    size: int
    transport: str = "?"

    def start(self, sends: list[tuple], recvs: list[tuple]) -> Request:
        """sends: (value, dest, tag); recvs: (source, tag, shape, dtype)."""
        raise NotImplementedError

    def isend(self, value: Any, dest: int, tag: Hashable) -> Request:
        return self.start([(value, dest, tag)], [])

    def irecv(self, source: int, tag: Hashable, shape=None, dtype=None) -> Request:
        request = self.start([], [(source, tag, shape, dtype)])
        return Request(lambda: request.wait()[0])

    def ibcast(self, value: Any, root: int, group: list[int], tag: Hashable, shape=None,
               dtype=None) -> Request:
        """Broadcast ``value`` from ``root`` to every rank in ``group`` (which holds root and
        this rank); the request's value is the broadcast value on every member."""
        if self.rank == root:
            request = self.start([(value, dest, tag) for dest in group if dest != root], [])
            return Request(lambda: (request.wait(), value)[1])
        return self.irecv(root, tag, shape, dtype)

    def barrier(self, tag: Hashable = "barrier") -> None:
        """Wait until every rank has reached this barrier (host messages, no buffers)."""
        peers = [p for p in range(self.size) if p != self.rank]
        self.start([(None, p, ("barrier", tag)) for p in peers],
                   [(p, ("barrier", tag), None, None) for p in peers]).wait()

    def close(self) -> None:
        pass


@dataclass
class GangContext:
    """What a gang member's program receives: its communicator, array module, timers.

    On CuPy, ``timed`` records CUDA events on the current stream instead of reading the host
    clock (launches are asynchronous): a timed product measures the product's GPU time, a timed
    wait measures how long the compute stream stalled for a shift. ``finish`` turns the events
    into seconds once the device work is done.
    """

    comm_or_factory: Any  # a Comm, or a function making one on first use
    xp: Any
    stats: dict[str, float] = field(default_factory=dict)  # seconds per phase
    counters: dict[str, int] = field(default_factory=dict)  # events (summed over workers)
    advance: Callable[[int], None] = lambda n: None  # report progress units done
    report: Callable[[dict], None] = lambda values: None  # live figures (metrics), by name
    events: list = field(default_factory=list)
    control_comm: Comm | None = None  # host-side small messages (default: ``comm``)

    @property
    def comm(self) -> Comm:
        if not isinstance(self.comm_or_factory, Comm):
            self.comm_or_factory = self.comm_or_factory()
        return self.comm_or_factory

    @property
    def control(self) -> Comm:
        """A communicator for small host objects (counts, ids): the object store beside NCCL."""
        return self.control_comm if self.control_comm is not None else self.comm

    @property
    def gpu(self) -> bool:
        return self.xp.__name__ != "numpy"

    @contextmanager
    def timed(self, phase: str):
        if not self.gpu:
            with self.timed_host(phase):
                yield
            return
        stream = self.xp.cuda.get_current_stream()
        start = stream.record()
        try:
            yield
        finally:
            self.events.append((phase, start, stream.record()))

    @contextmanager
    def timed_host(self, phase: str):
        """Time host work (I/O, waits) with the host clock, on CPU and GPU alike."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(phase, time.perf_counter() - start)

    def add_time(self, phase: str, seconds: float) -> None:
        self.stats[phase] = self.stats.get(phase, 0.0) + seconds

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def wait(self, request: Request, phase: str = "wait") -> Any:
        with self.timed(phase):
            return request.wait()

    def finish(self) -> None:
        """Wait for queued device work and convert recorded events to seconds."""
        if not self.gpu:
            return
        self.xp.cuda.get_current_stream().synchronize()
        for phase, start, end in self.events:
            self.add_time(phase, self.xp.cuda.get_elapsed_time(start, end) / 1000.0)
        self.events.clear()

    def to_host(self, block):
        """A device block as a NumPy array in pinned memory (for writing to storage)."""
        if not self.gpu:
            return block
        from mx.storage.dense import empty_host

        start = time.perf_counter()
        host = empty_host(block.shape, block.dtype, pinned=True)
        block.get(out=host)
        self.add_time("to-host", time.perf_counter() - start)
        return host


class Mailroom:
    """The shared state of one in-process gang: message slots and an abort flag."""

    def __init__(self):
        self.slots: dict[tuple, Any] = {}
        self.cond = threading.Condition()
        self.aborted: BaseException | None = None

    def post(self, key: tuple, value: Any) -> None:
        with self.cond:
            self.slots[key] = value
            self.cond.notify_all()

    def take(self, key: tuple) -> Any:
        with self.cond:
            while key not in self.slots:
                if self.aborted is not None:
                    raise GangAborted(f"a peer failed: {self.aborted!r}")
                self.cond.wait(timeout=0.2)
            return self.slots.pop(key)

    def abort(self, cause: BaseException) -> None:
        with self.cond:
            self.aborted = cause
            self.cond.notify_all()


class LocalComm(Comm):
    """Ranks are threads of one process; messages are handed over by reference."""

    transport = "in-process"

    def __init__(self, mailroom: Mailroom, rank: int, size: int):
        self.mailroom = mailroom
        self.rank = rank
        self.size = size

    def start(self, sends, recvs):
        for value, dest, tag in sends:
            self.mailroom.post((self.rank, dest, tag), value)
        keys = [(source, self.rank, tag) for source, tag, _, _ in recvs]
        return Request(lambda: [self.mailroom.take(key) for key in keys])
