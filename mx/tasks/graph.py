"""A step's task graph: Dask task-spec nodes plus where each runs and which run as a gang.

``dsk`` maps keys to ``dask.task_spec`` nodes (Task, DataNode, Alias), exactly as Dask
builds them. Two plain tables add what Dask's graphs do not say:

- ``placement``: key -> worker rank that runs the task and keeps its result. Tasks whose
  inputs live on one worker run there, so blocks move only where the graph says they must.
- ``gangs``: gang name -> member keys. The members of a gang start together, one per worker,
  and run as one SPMD program: each receives a communicator (``comm_key(gang)``, supplied by
  the backend, not by the graph) with the others as peers, in member order. Cannon's rounds
  and a completion sweep are gangs.

``outputs`` are the keys whose (small) results the driver collects; ``progress`` is how many
progress units the step reports in all (one per task, plus whatever gang programs add).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Hashable

from dask.task_spec import GraphNode, TaskRef

Key = Hashable


def comm_key(gang: str) -> tuple:
    """The key under which a gang member finds its communicator (a ``GangContext``)."""
    return ("mx-gang", gang)


@dataclass
class StepGraph:
    dsk: dict[Key, GraphNode]
    placement: dict[Key, int]
    gangs: dict[str, list[Key]] = field(default_factory=dict)
    outputs: list[Key] = field(default_factory=list)
    progress: int = 0
    labels: dict[Key, str] = field(default_factory=dict)  # phase of each task, for timings
    grid: tuple[int, int] | None = None  # process grid of the gang program, for worker names
    step: str = "step"  # the step it runs (names the workers a backend starts for it)

    def worker_name(self, rank: int) -> str:
        """``worker(i,j)`` for a worker at (i, j) of the process grid, else ``worker(rank)``."""
        if self.grid is not None and rank < self.grid[0] * self.grid[1]:
            return f"worker({rank // self.grid[1]},{rank % self.grid[1]})"
        return f"worker({rank})"

    def gang_of(self) -> dict[Key, str]:
        return {key: name for name, keys in self.gangs.items() for key in keys}

    def dependencies(self, key: Key) -> set[Key]:
        """Keys of the graph this task needs (the communicator is not one of them)."""
        return {d for d in self.dsk[key].dependencies if d in self.dsk}

    def check(self, workers: int) -> None:
        """Fail early on a malformed graph: missing placements, dangling references."""
        gang_of = self.gang_of()
        for key, node in self.dsk.items():
            rank = self.placement.get(key)
            if rank is None or not 0 <= rank < workers:
                raise ValueError(f"task {key!r} is placed on worker {rank}, not in 0..{workers - 1}")
            gang = gang_of.get(key)
            for dep in node.dependencies:
                if dep not in self.dsk and (gang is None or dep != comm_key(gang)):
                    raise ValueError(f"task {key!r} depends on {dep!r}, which is not in the graph")
        for name, keys in self.gangs.items():
            ranks = [self.placement[k] for k in keys]
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"gang {name!r} places two members on one worker: {ranks}")


Unit = tuple[str, Any]  # ("task", key) or ("gang", name)


def schedule(graph: StepGraph) -> list[Unit]:
    """A topological order of the graph in which each gang is one unit.

    Ties are broken by insertion order of ``dsk``, so the builder's order (reads, then
    compute, then writes) is kept. Every worker executing its share of this order in sequence
    cannot deadlock: whatever a unit waits for comes earlier in the order.
    """
    gang_of = graph.gang_of()
    unit_of = {key: (("gang", gang_of[key]) if key in gang_of else ("task", key)) for key in graph.dsk}
    position: dict[Unit, int] = {}
    for i, key in enumerate(graph.dsk):
        position.setdefault(unit_of[key], i)
    needs: dict[Unit, set[Unit]] = {u: set() for u in position}
    for key in graph.dsk:
        for dep in graph.dependencies(key):
            if unit_of[dep] != unit_of[key]:
                needs[unit_of[key]].add(unit_of[dep])
    users: dict[Unit, list[Unit]] = {u: [] for u in position}
    for unit, deps in needs.items():
        for dep in deps:
            users[dep].append(unit)
    waiting = {u: len(d) for u, d in needs.items()}
    ready = [(position[u], u) for u, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[Unit] = []
    while ready:
        _, unit = heapq.heappop(ready)
        order.append(unit)
        for user in users[unit]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user))
    if len(order) != len(position):
        stuck = [u for u, n in waiting.items() if n > 0][:3]
        raise ValueError(f"the task graph has a cycle (through {stuck})")
    return order


def unit_keys(graph: StepGraph, unit: Unit) -> list[Key]:
    kind, name = unit
    return list(graph.gangs[name]) if kind == "gang" else [name]


def ref(key: Key) -> TaskRef:
    return TaskRef(key)
