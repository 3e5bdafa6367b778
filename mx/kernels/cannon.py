"""Cannon's algorithm, the SPMD program one gang member runs on a q×q grid.

Rank r sits at (i, j) = divmod(r, q). The initial skew is applied when the blocks are read:
rank (i, j) starts with A(i, s) and B(s, j), s = (i + j) mod q, so no skew shift is needed.
Each of the q rounds multiplies the local blocks while the next A block arrives from the right
neighbour and the next B block from the neighbour below (A shifts left, B shifts up): the
shifts are started before the product and waited for after it.
"""

from __future__ import annotations

import numpy as np

from mx.cluster.comm import GangContext
from mx.kernels import gemm


def skewed_index(i: int, j: int, q: int) -> int:
    """The k-block rank (i, j) holds in round 0 (and (i, j) reads from storage)."""
    return (i + j) % q


def run(a, b, *, q: int, dtype: str, ctx: GangContext):
    """Return this rank's block of C = A·B."""
    comm, xp = ctx.comm, ctx.xp
    if comm.size != q * q:
        raise ValueError(f"Cannon needs {q * q} ranks, the gang has {comm.size}")
    i, j = divmod(comm.rank, q)
    left, right = i * q + (j - 1) % q, i * q + (j + 1) % q
    up, down = ((i - 1) % q) * q + j, ((i + 1) % q) * q + j
    with ctx.timed("to-device"):
        a = xp.asarray(a)
        b = xp.asarray(b)
        c = gemm.zeros(xp, (a.shape[0], b.shape[1]), np.dtype(dtype))
    scratch = None
    for step in range(q):
        last = step == q - 1
        if not last:
            send_a = comm.isend(a, left, ("a", step))
            send_b = comm.isend(b, up, ("b", step))
            next_a = comm.irecv(right, ("a", step))
            next_b = comm.irecv(down, ("b", step))
        with ctx.timed("compute"):
            gemm.accumulate(xp, c, a, b, scratch)
        ctx.advance(1)
        if not last:
            a = xp.asarray(ctx.wait(next_a, "shift-wait"))
            b = xp.asarray(ctx.wait(next_b, "shift-wait"))
            ctx.wait(send_a, "shift-wait")
            ctx.wait(send_b, "shift-wait")
    return c
