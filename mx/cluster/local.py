"""The local backend: the same graphs, executed in one process (debugging, tests, small jobs).

Tasks run in schedule order in the calling thread; the members of a gang run together on
threads and talk through an in-process ``LocalComm``. Workers are virtual: placement is
ignored because every value lives in one store. ``get`` is a Dask-compatible scheduler
(``dask.compute(x, scheduler=mx.cluster.local.get)``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable

from dask._task_spec import convert_legacy_graph

from mx.cluster import devices, execute
from mx.cluster.comm import GangAborted, GangContext, LocalComm, Mailroom
from mx.errors import JobCancelled, WorkerLost
from mx.tasks.graph import StepGraph, schedule, unit_keys


class LocalBackend:
    name = "local"

    def __init__(self, workers: int, gpus: int = 0):
        self.workers = workers
        self.gpu = gpus > 0
        self.xp = devices.array_module(self.gpu)

    def start(self, log: Callable[[str], None]) -> list[dict]:
        device = devices.device_name(self.gpu)
        log(f"local backend: one process, {self.workers} virtual workers on {device}")
        return [execute.describe_process(r, device) for r in range(self.workers)]

    def run(self, graph: StepGraph, on_progress: Callable[[int], None] = lambda n: None,
            cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        graph.check(self.workers)
        store: dict[Any, Any] = {}
        infos: list[dict] = []
        remaining = _consumer_counts(graph)
        outputs = set(graph.outputs)
        done = 0
        lock = threading.Lock()

        def advance(n: int) -> None:
            nonlocal done
            with lock:
                done += n
                on_progress(done)

        for unit in schedule(graph):
            if cancelled():
                raise JobCancelled("cancelled")
            keys = unit_keys(graph, unit)
            if unit[0] == "gang":
                results = self._run_gang(graph, unit[1], keys, store, advance, cancelled)
            else:
                key = keys[0]
                values = {d: store[d] for d in graph.dependencies(key)}
                results = [execute.run(key, graph.dsk[key], values, graph.placement[key],
                                       graph.labels.get(key))]
                advance(1)
            for key, (value, info) in zip(keys, results):
                if key in outputs:
                    info["value"] = value
                infos.append(info)
                store[key] = value
                for dep in graph.dependencies(key):
                    remaining[dep] -= 1
                    if remaining[dep] == 0 and dep not in outputs:
                        store.pop(dep, None)
        return infos

    def _run_gang(self, graph, name, keys, store, advance, cancelled):
        mailroom = Mailroom()
        results: list = [None] * len(keys)
        errors: list[BaseException] = []

        def member(rank: int, key) -> None:
            ctx = GangContext(comm_or_factory=LocalComm(mailroom, rank, len(keys)), xp=self.xp, advance=advance)
            values = {d: store[d] for d in graph.dependencies(key)}
            try:
                results[rank] = execute.run(key, graph.dsk[key], values, graph.placement[key],
                                            graph.labels.get(key), ctx, name)
            except BaseException as exc:
                errors.append(exc)
                mailroom.abort(exc)

        threads = [threading.Thread(target=member, args=(r, k), name=f"mx-{name}-{r}", daemon=True)
                   for r, k in enumerate(keys)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)
                if cancelled():
                    mailroom.abort(JobCancelled("cancelled"))  # members stop at their next message
                    raise JobCancelled("cancelled")
        if errors:
            # the first failure is the cause; the others are peers told to stop
            causes = [e for e in errors if not isinstance(e.__cause__, GangAborted)]
            cause = (causes or errors)[0]
            if getattr(cause, "retryable", False):
                raise WorkerLost(str(cause)) from cause
            raise cause
        return results

    def stop(self) -> None:
        pass


def _consumer_counts(graph: StepGraph) -> dict:
    counts: dict = defaultdict(int)
    for key in graph.dsk:
        for dep in graph.dependencies(key):
            counts[dep] += 1
    return counts


def get(dsk, keys, **kwargs):
    """A Dask scheduler: run a (legacy or task-spec) graph in this process, return ``keys``."""
    if not isinstance(dsk, Mapping):  # dask hands schedulers an expression
        dsk = dsk.__dask_graph__()
    graph_dsk = convert_legacy_graph(dict(dsk))
    flat = list(_flatten(keys))
    graph = StepGraph(dsk=graph_dsk, placement={k: 0 for k in graph_dsk}, outputs=flat)
    infos = LocalBackend(workers=1).run(graph)
    values = {info["key"]: info.get("value") for info in infos if info["key"] in flat}
    return _pack(keys, values)


def _flatten(keys):
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten(k)
    else:
        yield keys


def _pack(keys, values):
    if isinstance(keys, list):
        return [_pack(k, values) for k in keys]
    return values[keys]
