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
from typing import Any

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

    def start(self, sends, recvs):
        # one object-store copy per distinct value, one reference per receiver
        def post():
            refs: dict[int, Any] = {}
            posted = []
            for value, dest, tag in sends:
                ref = refs.get(id(value))
                if ref is None:
                    ref = refs[id(value)] = ray.put(value)
                # boxed in a list so Ray passes the reference itself, not its value
                posted.append(self.rendezvous.post.remote((self.gang, self.rank, dest, tag), [ref]))
            ray.get(posted)

        sent = self.pool.submit(post) if sends else None
        pending = [self.rendezvous.take.remote((self.gang, source, self.rank, tag))
                   for source, tag, _, _ in recvs]

        def wait():
            boxes = ray.get(pending)
            values = ray.get([box[0] for box in boxes])
            if sent is not None:
                sent.result()
            return values

        return Request(wait)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
