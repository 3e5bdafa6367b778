"""Cannon's algorithm, the SPMD program one gang member runs on a q×q grid.

Rank r sits at (i, j) = divmod(r, q). The initial skew is applied when the blocks are read:
rank (i, j) starts with A(i, s) and B(s, j), s = (i + j) mod q, so no skew shift is needed.
Each of the q rounds multiplies the local blocks while the next A block arrives from the right
neighbour and the next B block from the neighbour below (A shifts left, B shifts up): the
exchange is started before the product and waited for after it. On GPUs the blocks stay in
device memory for all rounds, the exchange runs on its own stream, and bf16 blocks travel as
bf16.
"""

from __future__ import annotations

from mx.cluster.comm import GangContext
from mx.kernels import abft, gemm, precision as prec


def skewed_index(i: int, j: int, q: int) -> int:
    """The k-block rank (i, j) holds in round 0 (and (i, j) reads from storage)."""
    return (i + j) % q


def run(a, b, *, q: int, inner: list[int], precision: str, verify: str | None,
        ctx: GangContext):
    """Return this rank's block of C = A·B (a host array). ``inner`` lists the k-block lengths."""
    comm, xp = ctx.comm, ctx.xp
    if comm.size != q * q:
        raise ValueError(f"Cannon needs {q * q} ranks, the gang has {comm.size}")
    i, j = divmod(comm.rank, q)
    left, right = i * q + (j - 1) % q, i * q + (j + 1) % q
    up, down = ((i - 1) % q) * q + j, ((i + 1) % q) * q + j
    faults = abft.planned_fault(comm.rank) if verify == "abft" else set()
    with ctx.timed("to-device"):
        c = gemm.zeros(xp, (a.shape[0], b.shape[1]), prec.output_dtype(precision))
        checks = abft.start(xp, c, precision) if verify == "abft" else None
        # round 0's share of the checksums is taken as its blocks are converted
        a, b = abft.to_device(xp, a, b, precision, checks, ctx.counters)
    with ctx.timed("rounds"):  # all rounds and the check, blocks resident: the compute-only time
        _rounds(ctx, a, b, c, q, i, j, (left, right, up, down), inner, precision, checks, faults)
        if checks is not None:
            abft.verify(xp, c, checks, precision, ctx.counters, f"worker ({i},{j})")
    ctx.finish()
    return ctx.to_host(c)


def _rounds(ctx, a, b, c, q, i, j, neighbours, inner, precision, checks, faults):
    comm, xp = ctx.comm, ctx.xp
    left, right, up, down = neighbours
    for step in range(q):
        last = step == q - 1
        if not last:
            s = (i + j + step + 1) % q  # the k-block both neighbours send for the next round
            exchange = comm.start(
                [(a, left, ("a", step)), (b, up, ("b", step))],
                [(right, ("a", step), (a.shape[0], inner[s]), a.dtype),
                 (down, ("b", step), (inner[s], b.shape[1]), b.dtype)])
            ctx.count("bytes-shifted", int(a.nbytes + b.nbytes))
        with ctx.timed("compute"):
            abft.accumulate(xp, c, a, b, precision, checks if step else None, ctx.counters,
                            step in faults)
        ctx.advance(1)
        if not last:
            a, b = ctx.wait(exchange, "shift-wait")
