"""The object-store transport: gang messages between Ray actors on CPUs.

A sender puts the value into the Ray object store (one copy, owned by the sending actor) and
posts a reference to it in the job's ``Rendezvous`` actor under (gang, source, dest, tag); the
receiver takes the reference from there and reads the value, zero-copy when it is on the same
node and pulled by Ray from the sender's node otherwise. The rendezvous only ever holds
references: block data moves actor to actor, never through the driver. The same actor counts
the progress units gang programs report, which the driver polls.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Hashable

import ray

from mx.cluster.comm import Comm, Request


@ray.remote(num_cpus=0)
class Rendezvous:
    """Per-job meeting point: message slots (references only) and a progress counter."""

    def __init__(self):
        self.slots: dict[tuple, list] = {}
        self.arrived: dict[tuple, asyncio.Event] = {}
        self.progress = 0

    def _event(self, key: tuple) -> asyncio.Event:
        return self.arrived.setdefault(key, asyncio.Event())

    async def post(self, key: tuple, boxed: list) -> None:
        self.slots[key] = boxed
        self._event(key).set()

    async def take(self, key: tuple) -> list:
        await self._event(key).wait()
        self.arrived.pop(key, None)
        return self.slots.pop(key)

    async def advance(self, n: int) -> None:
        self.progress += n

    async def count(self) -> int:
        return self.progress


class ObjectStoreComm(Comm):
    """One gang member's view; sends run on a helper thread so they overlap compute."""

    transport = "ray object store"

    def __init__(self, rendezvous, gang: str, rank: int, size: int):
        self.rendezvous = rendezvous
        self.gang = gang
        self.rank = rank
        self.size = size
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"mx-send-{gang}")

    def isend(self, value: Any, dest: int, tag: Hashable) -> Request:
        key = (self.gang, self.rank, dest, tag)

        def send():
            # boxed in a list so Ray passes the reference itself, not its value
            ray.get(self.rendezvous.post.remote(key, [ray.put(value)]))

        future = self.pool.submit(send)
        return Request(future.result)

    def irecv(self, source: int, tag: Hashable) -> Request:
        pending = self.rendezvous.take.remote((self.gang, source, self.rank, tag))
        return Request(lambda: ray.get(ray.get(pending)[0]))

    def ibcast(self, value, root, group, tag):
        if self.rank != root:
            return self.irecv(root, tag)
        # one copy in the object store, one reference per receiver
        keys = [(self.gang, root, dest, tag) for dest in group if dest != root]

        def send():
            ref = ray.put(value)
            ray.get([self.rendezvous.post.remote(key, [ref]) for key in keys])

        future = self.pool.submit(send)
        request = Request(lambda: (future.result(), value)[1])
        return request

    def close(self) -> None:
        self.pool.shutdown(wait=True)
