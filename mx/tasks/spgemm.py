"""The ``spgemm`` op: C = A·B for sparse A (m×k) and B (k×n), binsparse CSR in and out.

Planning reads A's row offsets (m + 1 integers, not the matrix), cuts the rows into chunks
aligned to C's pointer chunks, and deals the chunks to the workers balanced by A's nonzeros
(in a seeded random order with ``permute: true``, which spreads dense row clusters). B is
replicated on every worker when it fits in a quarter of a worker's memory; otherwise each
worker reads just the rows of B its rows of A touch. The workers run one gang (see
``mx.kernels.rowwise``) that computes and writes C in parallel.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from dask.task_spec import Task, TaskRef
from pydantic import Field

from mx.kernels import rowwise
from mx.storage import sparse
from mx.tasks import gemm as dense_gemm
from mx.tasks.graph import StepGraph, comm_key
from mx.tasks.ops import Op
from mx.tasks.spec import SEED_MAX, Strict
from mx.units import human_bytes

# Row chunks per worker: enough to balance skewed rows, few enough to keep pieces large.
CHUNKS_PER_WORKER = 8
VALUE_CHUNK = 1 << 20  # entries per Zarr chunk of C's indices and values


class SpgemmParams(Strict):
    permute: bool = False  # deal row chunks in a random order (load balance)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)  # NumPy's generators take no negative seed
    replicate_b: bool | None = None  # default: when B fits in a quarter of worker memory
    # per worker; default 80% of a GPU, no limit on CPUs
    memory: int | float | str | None = Field(default=None, description=dense_gemm.MEMORY_FORMS)


@dataclass(frozen=True)
class SpgemmPlan:
    shape: tuple[int, int]
    inner: int
    dtype: str
    a_nnz: int
    b_nnz: int
    units: list  # row chunks (r0, r1) in order
    owners: list  # worker of each row chunk
    replicate_b: bool
    b_reason: str
    pointer_chunk: int
    batch_bytes: int | None  # most output a worker makes on its device at once
    workers: int
    permute: bool
    output: sparse.SparseInfo

    def describe(self) -> list[str]:
        m, n = self.shape
        load = [0] * self.workers
        for (r0, r1), w in zip(self.units, self.owners):
            load[w] += r1 - r0
        return [f"spgemm {m}×{self.inner} ({_nnz(self.a_nnz)}) · {self.inner}×{n} "
                f"({_nnz(self.b_nnz)}) "
                f"-> {m}×{n} {np.dtype(self.dtype).name}",
                f"{len(self.units)} row chunks of {self.pointer_chunk} rows dealt to "
                f"{self.workers} workers" + (" in a random order" if self.permute else "")
                + f", balanced by A's nonzeros (rows per worker {min(load)}..{max(load)})",
                self.b_reason]


def plan(inputs: dict, params: SpgemmParams, workers: int, what: str, gpus: int = 0) -> SpgemmPlan:
    a, b = inputs["a"], inputs["b"]
    m, k, n = dense_gemm.product_shape(a, b, what)
    dtype = np.result_type(np.dtype(a.dtype), np.dtype(b.dtype))
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    pointer_chunk = max(1, -(-m // (workers * CHUNKS_PER_WORKER)))
    units = [(r0, min(m, r0 + pointer_chunk)) for r0 in range(0, m, pointer_chunk)] or [(0, 0)]
    weights = _row_weights(a, units)
    owners = deal(weights, workers, params.permute, params.seed)
    budget, source = dense_gemm.memory_budget(params.memory, gpus, f"{what}.params.memory")
    b_bytes = b.nnz * (np.dtype(b.dtype).itemsize + 4) + (k + 1) * 8
    replicate = params.replicate_b
    if replicate is None and b.nnz < 0 and budget is not None:
        # B is an earlier step's output, its size unknown until that step runs: the choice
        # that fits any size
        replicate = False
        b_reason = ("each worker reads only the rows of B it needs: B is an earlier step's "
                    "output, its size unknown until that step runs")
    elif replicate is None:
        replicate = budget is None or b_bytes <= budget / 4
        why = ("B is replicated on every worker" if replicate else
               "each worker reads only the rows of B it needs")
        # in units that fit each size: a budget under 0.05 GiB read "0.0 GiB"
        size = (f"B takes {human_bytes(b_bytes)}" if b.nnz >= 0 else
                "B's size is known once the earlier step has run")
        b_reason = f"{why}: {size}, worker memory " + \
            (f"{human_bytes(budget)} ({source})" if budget else "unlimited")
    else:
        b_reason = ("B is replicated on every worker" if replicate else
                    "each worker reads only the rows of B it needs") + " (asked for in the job file)"
    output = sparse.SparseInfo(path="", shape=(m, n), dtype=dtype.str, nnz=-1)
    return SpgemmPlan(shape=(m, n), inner=k, dtype=dtype.str, a_nnz=a.nnz, b_nnz=b.nnz,
                      units=units, owners=owners, replicate_b=bool(replicate), b_reason=b_reason,
                      pointer_chunk=pointer_chunk, workers=workers, permute=params.permute,
                      batch_bytes=int(0.4 * budget) if budget else None,
                      output=output)


def _nnz(count: int) -> str:
    return f"{count} nnz" if count >= 0 else "nnz known once the earlier step has run"


def _row_weights(a: sparse.SparseInfo, units: list) -> list[int]:
    """Nonzeros of A in each row chunk (from A's row offsets), plus the rows themselves."""
    ptr = sparse.read_pointers(a.path) if a.path else None
    if ptr is None:
        return [r1 - r0 for r0, r1 in units]
    return [int(ptr[r1] - ptr[r0]) + (r1 - r0) for r0, r1 in units]


def deal(weights: list[int], workers: int, permute: bool, seed: int) -> list[int]:
    """Owner of each row chunk. Without ``permute``, contiguous runs of chunks with near-equal
    weight (each worker's rows are one range); with it, chunks in a seeded random order,
    each to the least-loaded worker so far."""
    if not permute:
        total = sum(weights) or 1
        owners, acc = [], 0
        for w in weights:
            owners.append(min(workers - 1, int((acc + w / 2) * workers / total)))
            acc += w
        return owners
    order = np.random.default_rng(seed).permutation(len(weights))
    heap = [(0, rank) for rank in range(workers)]
    owners = [0] * len(weights)
    for unit in order:
        load, rank = heapq.heappop(heap)
        owners[unit] = rank
        heapq.heappush(heap, (load + weights[unit], rank))
    return owners


def create_output(p: SpgemmPlan, path: str, attributes: dict) -> None:
    sparse.create_group(path, p.shape, p.dtype, attributes)


def build(p: SpgemmPlan, paths: dict[str, str], output: str, step: str,
          final_output: str | None = None) -> StepGraph:
    gang = f"{step}:spgemm"
    dsk, placement, labels, keys = {}, {}, {}, []
    for w in range(p.workers):
        key = ("spgemm", step, w)
        mine = [u for u, o in zip(p.units, p.owners) if o == w]
        dsk[key] = Task(key, rowwise.run, mine, all_units=p.units, owners=p.owners,
                        a_path=paths["a"], b_path=paths["b"], out_path=output, shape=p.shape,
                        dtype=p.dtype, replicate_b=p.replicate_b,
                        pointer_chunk=p.pointer_chunk, value_chunk=VALUE_CHUNK,
                        batch_bytes=p.batch_bytes,
                        ctx=TaskRef(comm_key(gang)))
        placement[key], labels[key] = w, "compute"
        keys.append(key)
    return StepGraph(dsk=dsk, placement=placement, gangs={gang: keys}, outputs=keys,
                     progress=len(p.units), labels=labels)


OP = Op(name="spgemm", inputs={"a": "sparse", "b": "sparse"}, params=SpgemmParams, plan=plan,
        create_output=create_output, build=build)
