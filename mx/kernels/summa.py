"""SUMMA, the SPMD program one gang member runs on a pr×pc grid (any worker count).

C is split pr×pc over the ranks; the inner dimension is split into ``panels`` pieces. Panel
A(i, k) is held by rank (i, k mod pc) and B(k, j) by rank (k mod pr, j). In step k, the
holder of A(i, k) broadcasts it along grid row i and the holder of B(k, j) along grid column
j; every rank adds A(i, k)·B(k, j) to its C block. The broadcasts of step k + 1 are started
before the product of step k (double buffering).
"""

from __future__ import annotations

from mx.cluster.comm import GangContext
from mx.kernels import abft, gemm, precision as prec


def a_holder(i: int, k: int, pc: int) -> int:
    """Grid column of the rank holding panel A(i, k)."""
    return k % pc


def b_holder(k: int, j: int, pr: int) -> int:
    """Grid row of the rank holding panel B(k, j)."""
    return k % pr


def run(a_index: list, a_held: list, b_index: list, b_held: list, *, grid: tuple[int, int],
        inner: list[int], precision: str, verify: str | None, c_shape: tuple[int, int],
        ctx: GangContext):
    """Return this rank's block of C (a host array). ``a_held[t]`` is panel A(i, a_index[t])
    and ``b_held[t]`` is panel B(b_index[t], j): the panels this rank holds; ``inner`` lists
    the panel widths."""
    comm, xp = ctx.comm, ctx.xp
    pr, pc = grid
    if comm.size != pr * pc:
        raise ValueError(f"SUMMA on {pr}×{pc} needs {pr * pc} ranks, the gang has {comm.size}")
    i, j = divmod(comm.rank, pc)
    row = [i * pc + jj for jj in range(pc)]
    col = [ii * pc + j for ii in range(pr)]
    with ctx.timed("to-device"):
        a_panels = {k: prec.to_device(xp, p, precision) for k, p in zip(a_index, a_held)}
        b_panels = {k: prec.to_device(xp, p, precision) for k, p in zip(b_index, b_held)}
        c = gemm.zeros(xp, tuple(c_shape), prec.output_dtype(precision))
    stored = prec.stored_dtype(xp, precision)

    def start(k):
        a_root = i * pc + a_holder(i, k, pc)
        b_root = b_holder(k, j, pr) * pc + j
        a = comm.ibcast(a_panels.get(k), a_root, row, ("a", k), (c_shape[0], inner[k]), stored)
        b = comm.ibcast(b_panels.get(k), b_root, col, ("b", k), (inner[k], c_shape[1]), stored)
        if comm.rank == a_root:
            ctx.count("bytes-shifted", int(a_panels[k].nbytes) * (pc - 1))
        if comm.rank == b_root:
            ctx.count("bytes-shifted", int(b_panels[k].nbytes) * (pr - 1))
        return a, b

    faults = abft.planned_fault(comm.rank) if verify == "abft" else set()
    checks = abft.start(xp, c, precision) if verify == "abft" else None
    with ctx.timed("rounds"):  # all panels and the check, blocks resident: the compute-only time
        _steps(ctx, c, start, inner, precision, checks, faults)
        if checks is not None:
            abft.verify(xp, c, checks, precision, ctx.counters, f"worker ({i},{j})")
    ctx.finish()
    return ctx.to_host(c)


def _steps(ctx, c, start, inner, precision, checks, faults):
    xp = ctx.xp
    pending = start(0) if inner else None
    for k in range(len(inner)):
        a_req, b_req = pending
        a = ctx.wait(a_req, "bcast-wait")
        b = ctx.wait(b_req, "bcast-wait")
        if k + 1 < len(inner):
            pending = start(k + 1)
        with ctx.timed("compute"):
            abft.accumulate(xp, c, a, b, precision, checks, ctx.counters, k in faults)
        ctx.advance(1)
