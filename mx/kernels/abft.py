"""Algorithm-based fault tolerance for block products (``params: {verify: abft}``).

Each block product P = A·B is made into a scratch block and checked before it is added to C:
its row sums must equal A·(B·e) and its column sums (eᵀ·A)·B, both computed from the inputs in
O(mk + kn) instead of O(mnk). A product whose checksums disagree beyond the rounding bound is
recomputed (a transient fault: a flipped bit, a bad kernel launch); one that disagrees twice
fails the task with a message naming the worker and round. Costs per product: the scratch
block, one extra pass over it, and four vector products, a few percent of the product itself
for blocks worth distributing.
"""

from __future__ import annotations

import os

import numpy as np

from mx.kernels import gemm
from mx.kernels.precision import UNIT_ROUNDOFF, as_float

# For tests and drills: MX_FAULT="abft:<gang rank>:<round>" corrupts that product once.
FAULT_ENV = "MX_FAULT"


class ChecksumError(RuntimeError):
    pass


def planned_fault(rank: int) -> set[int]:
    spec = os.environ.get(FAULT_ENV, "")
    rounds = set()
    for item in filter(None, spec.split(",")):
        kind, who, when = item.split(":")
        if kind == "abft" and int(who) == rank:
            rounds.add(int(when))
    return rounds


def checked_accumulate(xp, c, a, b, precision: str, counters: dict, label: str,
                       corrupt: bool = False) -> int:
    """``c += a @ b``, verified by row and column checksums; returns the number of retries."""
    scratch = xp.empty_like(c)
    af, bf = as_float(xp, a, precision), as_float(xp, b, precision)
    expect_rows = af @ bf.sum(axis=1)
    expect_cols = af.sum(axis=0) @ bf
    scale = float(xp.abs(af).sum(axis=1).max()) * float(xp.abs(bf).sum(axis=1).max()) \
        if af.size and bf.size else 0.0
    k, n = a.shape[1], b.shape[1]
    # rounding bound of a row (column) sum of a k-term product, plus the sums themselves
    tol = 4.0 * UNIT_ROUNDOFF[precision] * (k + n + 2) * scale + np.finfo(np.float64).tiny
    for attempt in range(2):
        gemm.accumulate(xp, scratch, a, b, precision, beta=0.0)
        if corrupt and attempt == 0:
            scratch[(0,) * scratch.ndim] += 1e3 * (scale + 1.0)
        bad_rows = ~(xp.abs(scratch.sum(axis=1) - expect_rows) <= tol)
        bad_cols = ~(xp.abs(scratch.sum(axis=0) - expect_cols) <= tol)
        if not (bool(bad_rows.any()) or bool(bad_cols.any())):
            c += scratch
            counters["abft-checked"] = counters.get("abft-checked", 0) + 1
            if attempt:
                counters["abft-recomputed"] = counters.get("abft-recomputed", 0) + 1
            return attempt
    raise ChecksumError(f"{label}: block product failed its checksums twice "
                        f"({int(bad_rows.sum())} rows, {int(bad_cols.sum())} columns off); "
                        f"the inputs may hold NaN/Inf or the device is faulty")


def accumulate(xp, c, a, b, precision: str, verify: str | None, counters: dict, label: str,
               corrupt: bool = False) -> None:
    """``c += a @ b``, checked by checksums when ``verify`` is "abft"."""
    if verify == "abft":
        checked_accumulate(xp, c, a, b, precision, counters, label, corrupt)
    else:
        gemm.accumulate(xp, c, a, b, precision)
