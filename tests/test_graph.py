import pytest
from dask.task_spec import Task, TaskRef

from mx.tasks.graph import StepGraph, comm_key, schedule


def _add(x, y=0):
    return x + y


def test_schedule_keeps_gangs_whole_and_dependencies_first():
    dsk = {
        "r0": Task("r0", _add, 1),
        "r1": Task("r1", _add, 2),
        "g0": Task("g0", _add, TaskRef("r0"), 0, ctx=TaskRef(comm_key("g"))),
        "g1": Task("g1", _add, TaskRef("r1"), 0, ctx=TaskRef(comm_key("g"))),
        "w": Task("w", _add, TaskRef("g0"), TaskRef("g1")),
    }
    graph = StepGraph(dsk=dsk, placement={"r0": 0, "r1": 1, "g0": 0, "g1": 1, "w": 0},
                      gangs={"g": ["g0", "g1"]}, outputs=["w"])
    graph.check(2)
    order = schedule(graph)
    assert order == [("task", "r0"), ("task", "r1"), ("gang", "g"), ("task", "w")]


def test_cycle_is_reported():
    dsk = {"a": Task("a", _add, TaskRef("b")), "b": Task("b", _add, TaskRef("a"))}
    graph = StepGraph(dsk=dsk, placement={"a": 0, "b": 0})
    with pytest.raises(ValueError, match="cycle"):
        schedule(graph)


def test_check_rejects_bad_placement_and_dangling_refs():
    graph = StepGraph(dsk={"a": Task("a", _add, 1)}, placement={"a": 3})
    with pytest.raises(ValueError, match="placed on worker 3"):
        graph.check(2)
    graph = StepGraph(dsk={"a": Task("a", _add, TaskRef("zz"))}, placement={"a": 0})
    with pytest.raises(ValueError, match="not in the graph"):
        graph.check(1)


def test_local_get_is_a_dask_scheduler():
    import dask
    from mx.cluster.local import get

    @dask.delayed
    def inc(x):
        return x + 1

    total = dask.delayed(sum)([inc(i) for i in range(5)])
    assert dask.compute(total, scheduler=get)[0] == 15
