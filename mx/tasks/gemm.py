"""The ``gemm`` op: C = A·B for dense A (m×k) and B (k×n), Cannon or SUMMA over the workers.

Planning picks the algorithm and the process grid; building lays out the graph: each worker
reads its blocks of A and B from Zarr, the workers run Cannon's or SUMMA's rounds as one gang,
and each writes its C block (whole chunks) into the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from dask.task_spec import List, Task, TaskRef
from pydantic import Field

from mx.errors import UserError
from mx.units import human_bytes
from mx.kernels import cannon, stream, summa
from mx.kernels import precision as prec
from mx.storage import dense
from mx.tasks import blocks
from mx.tasks.graph import StepGraph, comm_key
from mx.tasks.ops import Op
from mx.tasks.spec import Strict

# Cannon is kept when its traffic is within this factor of the best SUMMA grid's.
CANNON_TRAFFIC_SLACK = 1.25
# Widest SUMMA panel (columns of A / rows of B) broadcast in one step when no measured model
# of the device is at hand (CPU workers, or a cluster whose GPU type was never measured).
MAX_PANEL = 4096


# what a memory param accepts, as errors say it
MEMORY_FORMS = "a number of bytes or an amount such as 8GiB or 512MB"


class GemmParams(Strict):
    algorithm: Literal["cannon", "summa", "stream", "auto"] = "auto"
    # memory each worker may use for blocks (e.g. "8GiB"); default: 80% of a GPU's memory,
    # no limit on CPU workers. Past it, auto streams panels from storage (out of core).
    memory: int | float | str | None = Field(default=None, description=MEMORY_FORMS)
    # default: fp32 when both inputs are float32, else fp64
    precision: Literal["fp64", "fp32", "tf32", "bf16"] | None = None
    verify: Literal["none", "abft"] = "none"


@dataclass(frozen=True)
class GemmPlan:
    m: int
    k: int
    n: int
    dtype: str  # of C
    precision: str
    verify: str
    algorithm: str
    reason: str
    panel_reason: str
    memory_reason: str
    grid: tuple[int, int]  # process grid, or the tile grid when streaming
    rows: list  # row bounds of C blocks (one per grid row)
    cols: list  # column bounds of C blocks (one per grid column)
    inner: list  # bounds of the k blocks (Cannon) or panels (SUMMA)
    chunks: tuple[int, int]
    output: dense.DenseInfo
    gpu: bool = False  # blocks go to GPUs: read into pinned host memory
    workers: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def describe(self) -> list[str]:
        pr, pc = self.grid
        biggest = f"{max(map(blocks.length, self.rows))}×{max(map(blocks.length, self.cols))}"
        lines = [f"gemm {self.m}×{self.k} · {self.k}×{self.n} -> {self.m}×{self.n} "
                 f"{np.dtype(self.dtype).name}, precision {self.precision}, "
                 f"{self.flops / 1e9:.3g} GFLOP" + (", ABFT checksums on" if self.verify == "abft" else "")]
        if self.algorithm == "stream":
            lines += [f"algorithm stream (out of core): {self.reason}",
                      f"{pr}×{pc} tiles of C up to {biggest} shared by {self.workers} workers, "
                      f"{len(self.inner)} k-slabs per tile read from storage; output chunks "
                      f"{self.chunks[0]}×{self.chunks[1]}", self.panel_reason]
        else:
            lines += [f"algorithm {self.algorithm} on a {pr}×{pc} grid: {self.reason}",
                      f"C blocks up to {biggest}, output chunks {self.chunks[0]}×{self.chunks[1]}"]
        if self.algorithm == "cannon":
            lines.append(f"initial skew applied at read: worker (i,j) loads A(i,(i+j) mod {pr}) "
                         f"and B((i+j) mod {pr},j); then {pr} rounds of product + shift "
                         f"(A left, B up)")
        elif self.algorithm == "summa":
            lines.append(f"{len(self.inner)} panels of width up to "
                         f"{max(map(blocks.length, self.inner))}, broadcast along grid rows "
                         f"(A) and columns (B); {self.panel_reason}")
        if self.memory_reason:
            lines.append(self.memory_reason)
        return lines


def traffic(m: int, k: int, n: int, pr: int, pc: int) -> float:
    """Elements each rank receives: the A and B panels it does not hold."""
    return (m / pr) * k * (pc - 1) / pc + (n / pc) * k * (pr - 1) / pr


def best_grid(m: int, k: int, n: int, p: int) -> tuple[int, int]:
    """The pr×pc factorisation of p that moves the fewest bytes, avoiding empty blocks."""
    pairs = [(pr, p // pr) for pr in range(1, p + 1) if p % pr == 0]
    return min(pairs, key=lambda g: (g[0] > m or g[1] > n, traffic(m, k, n, *g), abs(g[0] - g[1])))


def choose(m: int, k: int, n: int, p: int, algorithm: str, what: str) -> tuple[str, tuple[int, int], str]:
    q = math.isqrt(p)
    square = q * q == p
    if algorithm == "cannon":
        if not square:
            raise UserError(f"{what}.params.algorithm: cannon needs a square number of workers "
                            f"(got {p}); use algorithm summa or auto, or set workers to "
                            f"{q * q} or {(q + 1) ** 2}")
        return "cannon", (q, q), "asked for in the job file"
    grid = best_grid(m, k, n, p)
    if algorithm == "summa":
        return "summa", grid, "asked for in the job file; grid chosen to move the fewest bytes"
    if not square:
        return "summa", grid, f"{p} workers do not form a square grid"
    if q > min(m, n, k):
        return "summa", grid, (f"a {q}×{q} Cannon grid would leave empty blocks "
                               f"(m={m}, k={k}, n={n})")
    ratio = traffic(m, k, n, q, q) / max(traffic(m, k, n, *grid), 1e-9)
    if ratio > CANNON_TRAFFIC_SLACK:
        return "summa", grid, (f"the shape is rectangular: SUMMA on {grid[0]}×{grid[1]} moves "
                               f"{ratio:.1f}× fewer bytes than Cannon on {q}×{q}")
    return "cannon", (q, q), f"{p} workers form a square grid and the shape suits it"


def product_shape(a, b, what: str) -> tuple[int, int, int]:
    """(m, k, n) of A·B, or the error that A's columns and B's rows differ."""
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise UserError(f"{what}: A is {m}×{k} but B is {k2}×{n}: A's columns must equal B's "
                        f"rows ({k} ≠ {k2}); check the inputs' order and shapes")
    return m, k, n


def plan(inputs: dict, params: GemmParams, workers: int, what: str, gpus: int = 0) -> GemmPlan:
    a, b = inputs["a"], inputs["b"]
    m, k, n = product_shape(a, b, what)
    precision = params.precision or prec.default(dense.compute_dtype(a.dtype, b.dtype))
    dtype = prec.output_dtype(precision)
    budget, budget_source = memory_budget(params.memory, gpus, f"{what}.params.memory")
    side = dense.chunk_side(dtype.itemsize)
    common = dict(m=m, k=k, n=n, dtype=dtype.str, precision=precision, verify=params.verify,
                  gpu=gpus > 0, workers=workers)
    memory_reason = ""
    if params.algorithm != "stream":
        algorithm, grid, reason = choose(m, k, n, workers, params.algorithm, what)
        pr, pc = grid
        row_chunk, rows = blocks.aligned(m, pr, side)
        col_chunk, cols = blocks.aligned(n, pc, side)
        panel_reason = ""
        if algorithm == "cannon":
            inner = blocks.balanced(k, pr)
        else:
            width, panel_reason = panel_width(m / pr, n / pc, k, precision, gpus)
            panels = math.lcm(pr, pc)
            panels *= max(1, -(-k // (panels * width)))
            inner = blocks.balanced(k, panels)
        need = in_core_bytes(algorithm, rows, cols, inner, grid, precision)
        if budget is not None:
            memory_reason = (f"memory per worker: {human_bytes(need)} needed in core, {human_bytes(budget)} "
                             f"available ({budget_source})")
        if budget is None or need <= budget:
            return GemmPlan(**common, algorithm=algorithm, reason=reason, panel_reason=panel_reason,
                            memory_reason=memory_reason, grid=grid, rows=rows, cols=cols,
                            inner=inner, chunks=(row_chunk, col_chunk),
                            output=_output_info(m, n, dtype, (row_chunk, col_chunk)))
        if params.algorithm != "auto":
            raise UserError(f"{what}.params.algorithm: {params.algorithm} needs {human_bytes(need)} per "
                            f"worker but {human_bytes(budget)} is available ({budget_source}); use "
                            f"algorithm auto or stream (out of core), or more workers")
        reason = f"A, B and C do not fit: {memory_reason}"
    else:
        reason = "asked for in the job file"
    if budget is None:
        budget = 8 * 2**30  # streaming asked for with no limit given: tiles of a few GiB
        budget_source = "default tile budget"
    width, panel_reason = stream_width(precision, gpus)
    tile, width = stream_tile(budget, width, (m, k, n), precision, what)
    row_chunk, rows = blocks.aligned(m, max(1, -(-m // tile)), side)
    col_chunk, cols = blocks.aligned(n, max(1, -(-n // tile)), side)
    inner = blocks.balanced(k, max(1, -(-k // width)))
    memory_reason = memory_reason or f"memory per worker: {human_bytes(budget)} ({budget_source})"
    return GemmPlan(**common, algorithm="stream", reason=reason, panel_reason=panel_reason,
                    memory_reason=memory_reason, grid=(len(rows), len(cols)), rows=rows,
                    cols=cols, inner=inner, chunks=(row_chunk, col_chunk),
                    output=_output_info(m, n, dtype, (row_chunk, col_chunk)))


def _output_info(m, n, dtype, chunks) -> dense.DenseInfo:
    return dense.DenseInfo(path="", shape=(m, n), dtype=dtype.str, chunks=chunks)


def element_bytes(precision: str) -> tuple[int, int]:
    """(bytes of an input element on the device, of an output element); bf16 counts the
    float32 staging its conversion needs."""
    return {"fp64": (8, 8), "fp32": (4, 4), "tf32": (4, 4), "bf16": (6, 4)}[precision]


def in_core_bytes(algorithm, rows, cols, inner, grid, precision) -> int:
    """Device memory one worker needs to keep its blocks resident (largest worker)."""
    ib, ob = element_bytes(precision)
    bm, bn = max(map(blocks.length, rows)), max(map(blocks.length, cols))
    c = bm * bn * ob  # ABFT's running checksums are 3 numbers a row: no second C
    if algorithm == "cannon":
        bk = max(map(blocks.length, inner))
        return c + 2 * (bm * bk + bk * bn) * ib  # current blocks and the ones arriving
    pr, pc = grid
    k = sum(map(blocks.length, inner))
    w = max(map(blocks.length, inner))
    held = bm * -(-k // pc) + -(-k // pr) * bn
    return c + (held + 2 * (bm * w + w * bn)) * ib


def stream_tile(budget: int, width: int, shape: tuple[int, int, int], precision: str,
                what: str) -> tuple[int, int]:
    """(side of a square C tile, k-slab width) that fit ``budget`` with two slabs in flight:
    the tile takes about half, the slabs the rest, the slab no wider than ``width``. Tiles
    are whole numbers of aligned blocks unless all of the m×n C fits in one."""
    m, k, n = shape
    ib, ob = element_bytes(precision)
    usable = 0.8 * budget
    tile = int(math.sqrt(usable / 2 / ob))
    if tile >= blocks.ALIGN:
        tile -= tile % blocks.ALIGN
    elif ob * m * n <= usable / 2:
        tile = max(m, n)
    else:
        raise UserError(f"{what}: {human_bytes(budget)} per worker is too little to stream GEMM "
                        f"tiles of {blocks.ALIGN}×{blocks.ALIGN}; raise params.memory")
    # 2 slabs in flight, each a (tile × w) panel of A and a (w × tile) panel of B
    fit = int((usable - ob * tile * tile) / (4 * tile * ib))
    width = max(1, min(width, k, fit))
    if width >= blocks.ALIGN:
        width -= width % blocks.ALIGN
    return tile, width


def stream_width(precision: str, gpus: int) -> tuple[int, str]:
    width, why = panel_width(16384, 16384, 1 << 30, precision, gpus)
    return width, why.replace("panel width", "slab width", 1)


def memory_budget(memory, gpus: int, what: str) -> tuple[int | None, str]:
    """Bytes each worker may hold: the job's ``memory`` param, else 80% of a local GPU's
    memory, else no limit."""
    if memory is not None:
        return parse_bytes(memory, what), "params.memory"
    if gpus > 0:
        from mx.cluster import devices

        total = devices.gpu_memory()
        if total:
            return int(0.8 * total), "80% of the GPU's memory"
    return None, "no limit"


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        nbytes = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            amount = float(number) * UNITS[unit]
            nbytes = int(amount)
        except (ValueError, KeyError, OverflowError):  # NaN, an unknown unit, infinity
            raise UserError(f"{what}: {value!r} is not an amount of memory; give "
                            f"{MEMORY_FORMS}") from None
        if amount != nbytes:  # 1.5 bytes, or 1.0001 kB
            raise UserError(f"{what}: {value!r} is not a whole number of bytes; give "
                            f"{MEMORY_FORMS}")
    if nbytes <= 0:
        raise UserError(f"{what}: {value!r} must be positive")
    return nbytes


def panel_width(rows: float, cols: float, k: int, precision: str, gpus: int) -> tuple[int, str]:
    """The SUMMA panel width: from the measured cuBLAS model of this GPU type when there is
    one (measured here and cached when this machine has the GPUs), else MAX_PANEL."""
    if gpus <= 0:
        return MAX_PANEL, f"panel width {MAX_PANEL} (CPU workers: BLAS panels this wide run at full speed)"
    from mx.cluster import devices
    from mx.kernels import gemm_model

    count, _ = devices.gpu_count()
    device = devices.device_name(True).split(" ", 1)[1] if count else None
    table = gemm_model.load_or_measure(device, precision, allow_measure=True) if device else None
    if table is None:
        return MAX_PANEL, f"panel width {MAX_PANEL} (no cuBLAS model for these GPUs on this host)"
    width, why = gemm_model.choose_width(table, (rows * cols) ** 0.5, k)
    return width, f"panel width {width} from the {device} {why}"


def create_output(p: GemmPlan, path: str, attributes: dict) -> None:
    dense.create(path, (p.m, p.n), p.chunks, p.dtype, attributes)


def build(p: GemmPlan, paths: dict[str, str], output: str, step: str,
          final_output: str | None = None) -> StepGraph:
    pr, pc = p.grid
    verify = p.verify if p.verify != "none" else None
    inner = [blocks.length(b) for b in p.inner]
    gang = f"{step}:{p.algorithm}"
    ctx = TaskRef(comm_key(gang))
    dsk, placement, labels = {}, {}, {}

    def add(key, task, rank, label):
        dsk[key] = task
        placement[key] = rank
        labels[key] = label

    if p.algorithm == "stream":
        return _build_stream(p, paths, output, step)
    compute_keys = []
    if p.algorithm == "cannon":
        q = pr
        for i in range(q):
            for j in range(q):
                s = cannon.skewed_index(i, j, q)
                ka, kb = ("read-a", step, i, j), ("read-b", step, i, j)
                add(ka, Task(ka, dense.read_block, paths["a"], p.rows[i], p.inner[s], p.dtype, p.gpu),
                    i * q + j, "read")
                add(kb, Task(kb, dense.read_block, paths["b"], p.inner[s], p.cols[j], p.dtype, p.gpu),
                    i * q + j, "read")
        for i in range(q):
            for j in range(q):
                key = ("cannon", step, i, j)
                add(key, Task(key, cannon.run, TaskRef(("read-a", step, i, j)),
                              TaskRef(("read-b", step, i, j)), q=q, inner=inner,
                              precision=p.precision, verify=verify, ctx=ctx),
                    i * q + j, "compute")
                compute_keys.append(key)
        rounds = q
    else:
        for k, bounds in enumerate(p.inner):
            for i in range(pr):
                key = ("read-a", step, i, k)
                add(key, Task(key, dense.read_block, paths["a"], p.rows[i], bounds, p.dtype, p.gpu),
                    i * pc + summa.a_holder(i, k, pc), "read")
            for j in range(pc):
                key = ("read-b", step, k, j)
                add(key, Task(key, dense.read_block, paths["b"], bounds, p.cols[j], p.dtype, p.gpu),
                    summa.b_holder(k, j, pr) * pc + j, "read")
        for i in range(pr):
            for j in range(pc):
                ka = [k for k in range(len(p.inner)) if summa.a_holder(i, k, pc) == j]
                kb = [k for k in range(len(p.inner)) if summa.b_holder(k, j, pr) == i]
                a_refs = List(*[TaskRef(("read-a", step, i, k)) for k in ka])
                b_refs = List(*[TaskRef(("read-b", step, k, j)) for k in kb])
                key = ("summa", step, i, j)
                c_shape = (blocks.length(p.rows[i]), blocks.length(p.cols[j]))
                add(key, Task(key, summa.run, ka, a_refs, kb, b_refs, grid=(pr, pc),
                              inner=inner, precision=p.precision, verify=verify,
                              c_shape=c_shape, ctx=ctx),
                    i * pc + j, "compute")
                compute_keys.append(key)
        rounds = len(p.inner)
    writes = []
    for key in compute_keys:
        i, j = key[2], key[3]
        wkey = ("write", step, i, j)
        add(wkey, Task(wkey, dense.write_block, output, p.rows[i], p.cols[j], TaskRef(key)),
            i * pc + j, "write")
        writes.append(wkey)
    reads = sum(1 for label in labels.values() if label == "read")
    return StepGraph(dsk=dsk, placement=placement, gangs={gang: compute_keys}, outputs=writes,
                     progress=reads + rounds * len(compute_keys) + len(writes), labels=labels,
                     grid=(pr, pc))


def _build_stream(p: GemmPlan, paths: dict[str, str], output: str, step: str) -> StepGraph:
    gang = f"{step}:stream"
    tiles = [(r, c) for r in p.rows for c in p.cols if blocks.length(r) and blocks.length(c)]
    share = [tiles[w::p.workers] for w in range(p.workers)]
    dsk, placement, labels, keys = {}, {}, {}, []
    for w in range(p.workers):
        key = ("stream", step, w)
        dsk[key] = Task(key, stream.run, share[w], p.inner, a_path=paths["a"], b_path=paths["b"],
                        out_path=output, read_dtype=p.dtype, precision=p.precision,
                        verify=p.verify if p.verify != "none" else None,
                        ctx=TaskRef(comm_key(gang)))
        placement[key], labels[key] = w, "compute"
        keys.append(key)
    return StepGraph(dsk=dsk, placement=placement, gangs={gang: keys}, outputs=keys,
                     progress=len(tiles) * len(p.inner), labels=labels)


OP = Op(name="gemm", inputs={"a": "dense", "b": "dense"}, params=GemmParams, plan=plan,
        create_output=create_output, build=build)
