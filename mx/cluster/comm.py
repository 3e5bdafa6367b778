"""The communicator a gang program sees, and the in-process transport.

One small interface, one module per transport (``objectstore`` for Ray actors on CPUs, later
NCCL and MPI), as in ``ray.util.collective``. Ranks are positions in the gang. Every operation
is nonblocking and returns a ``Request`` whose ``wait()`` gives the received value, so a
program can start a shift, compute, and wait only when it needs the data (double buffering).

Tags must be unique among the messages between one pair of ranks in a gang (programs use
``(what, round)``). A sent value must not be modified by its sender afterwards; a received
value may be read-only.
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
    """Point-to-point and broadcast among the ranks of one gang."""

    rank: int
    size: int
    transport: str = "?"

    def isend(self, value: Any, dest: int, tag: Hashable) -> Request:
        raise NotImplementedError

    def irecv(self, source: int, tag: Hashable) -> Request:
        raise NotImplementedError

    def ibcast(self, value: Any, root: int, group: list[int], tag: Hashable) -> Request:
        """Broadcast ``value`` from ``root`` to every rank in ``group`` (which holds root and
        this rank); the request's value is the broadcast value on every member."""
        if self.rank == root:
            for dest in group:
                if dest != root:
                    self.isend(value, dest, tag)
            return done(value)
        return self.irecv(root, tag)

    def sendrecv(self, value: Any, dest: int, source: int, tag: Hashable) -> Any:
        send = self.isend(value, dest, tag)
        received = self.irecv(source, tag).wait()
        send.wait()
        return received

    def barrier(self, tag: Hashable = "barrier") -> None:
        for peer in range(self.size):
            if peer != self.rank:
                self.isend(None, peer, ("barrier", tag))
        for peer in range(self.size):
            if peer != self.rank:
                self.irecv(peer, ("barrier", tag)).wait()


@dataclass
class GangContext:
    """What a gang member's program receives: its communicator, array module, timers."""

    comm: Comm
    xp: Any
    stats: dict[str, float] = field(default_factory=dict)
    advance: Callable[[int], None] = lambda n: None  # report progress units done

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[phase] = self.stats.get(phase, 0.0) + time.perf_counter() - start

    def wait(self, request: Request, phase: str = "wait") -> Any:
        with self.timed(phase):
            return request.wait()


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

    def isend(self, value, dest, tag):
        self.mailroom.post((self.rank, dest, tag), value)
        return done()

    def irecv(self, source, tag):
        key = (source, self.rank, tag)
        return Request(lambda: self.mailroom.take(key))
