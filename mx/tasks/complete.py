"""The ``complete`` op: rank-k factors U (m×k), V (n×k) with UVᵀ ≈ M from M's observed entries.

Input: the observed entries as a binsparse CSR group. Output: a Zarr group with arrays ``u``
and ``v``. Its attributes hold the per-sweep history (training RMSE, held-out RMSE and
relative error, seconds) and why the run stopped. The rows of U and the rows of V (columns
of M) are split across the workers; the sweeps run as one gang (``mx.kernels.altmin``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from dask.task_spec import Task, TaskRef
from pydantic import ConfigDict, Field

from mx.errors import UserError
from mx.kernels import altmin, lsq
from mx.storage import dense, sparse
from mx.tasks import blocks
from mx.tasks.graph import StepGraph, comm_key
from mx.tasks.ops import Op
from mx.tasks.spec import SEED_MAX, Strict


class CompleteParams(Strict):
    # lax: YAML reads 1e-6 (no dot) as a string; numbers written that way are accepted
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    rank: int = Field(ge=1)
    method: Literal["altmin-sketch", "als", "als-cg"] = "altmin-sketch"
    tol: float = Field(default=1e-6, gt=0, allow_inf_nan=False)
    max_iters: int = Field(default=50, ge=1)
    reg: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    holdout: float = Field(default=0.02, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    # CG steps per row per half-sweep (als-cg, and altmin-sketch's heavy rows); default
    # altmin.CG_STEPS
    cg_iters: Optional[int] = Field(default=None, ge=1, le=100)
    checkpoint: bool = True


@dataclass(frozen=True)
class CompletePlan:
    shape: tuple[int, int]
    nnz: int
    params: CompleteParams
    row_blocks: list
    col_blocks: list
    chunks: tuple[int, int]
    workers: int
    output: object  # not a matrix another step can use as a dense or sparse input
    thin: dict  # rows and columns with fewer observed entries than the rank (none counted
    # for an earlier step's output, unknown when the job is planned)
    gpus: int = 0  # the job's GPUs (0: CPU workers)

    def describe(self) -> list[str]:
        m, n = self.shape
        p = self.params
        # with nothing held out, the error that stops the sweeps is the training entries'
        which = "held-out" if p.holdout > 0 else "training"
        observed = (f"{self.nnz} observed entries ({self.nnz / (m * n):.3g} of all)"
                    if self.nnz >= 0 else "the observed entries an earlier step made")
        return [f"complete {m}×{n} from {observed}, rank {p.rank}, method {p.method}, "
                f"reg {p.reg:g}, held out {p.holdout:g}",
                f"U rows and V rows split over {self.workers} workers ("
                f"{max(map(blocks.length, self.row_blocks))} and "
                f"{max(map(blocks.length, self.col_blocks))} rows each at most); only k-wide "
                f"factor blocks move between them",
                *_row_treatment(p, self.gpus), *_thin_warning(self),
                f"stops when the {which} relative error < {p.tol:g}, after {p.max_iters} sweeps, "
                f"or when it stops improving; checkpoints written beside the sweeps (a new one "
                f"after each sweep that finds the last one done)" if p.checkpoint else
                f"stops when the {which} relative error < {p.tol:g} or after {p.max_iters} sweeps"]


def _row_treatment(p: CompleteParams, gpus: int) -> list[str]:
    k = p.rank
    if p.method == "als":
        return ["every row solved exactly (normal equations, Cholesky)"]
    plain = altmin.cg_steps(p.method, "plain-cg", p.cg_iters)
    if p.method == "als-cg":
        return [f"every row: {plain} CG steps from the last sweep's value"]
    otherwise = (f"a CountSketch of {lsq.sketch_buckets(k)} buckets preconditions "
                 f"{altmin.cg_steps(p.method, 'sketch', p.cg_iters)} CG steps from the last "
                 f"sweep's value")
    if altmin.sketch_degree(gpus > 0, k) != altmin.heavy_degree(k):
        otherwise += (f" for rows with >= {altmin.sketch_degree(gpus > 0, k)} observations, "
                      f"and rows below that are solved exactly (on a GPU at rank <= "
                      f"{altmin.FUSED_EXACT_MAX_RANK} the fused exact solve costs less there)")
    lighter = (f"lighter rows with < {altmin.THIN_DEGREE * k} observations (thin: an exact "
               f"solve would amplify the other factor's error) get "
               f"{altmin.cg_steps(p.method, 'plain-cg-light', p.cg_iters)} CG steps from the "
               f"last sweep's value, plain ones, but in a half-sweep whose other factor is not "
               f"well conditioned those of >= {math.ceil(altmin.GRAM_CG_DEGREE * k)} "
               f"observations get them preconditioned by its Gram matrix; ")
    if altmin.light_rows_iterative(gpus > 0, k, well=False):
        lighter += (f"and the other lighter rows (< {altmin.heavy_degree(k)}) get them too, "
                    f"preconditioned as the thin ones are (on a GPU they cost a fraction of the "
                    f"exact solve)")
    elif altmin.light_rows_iterative(gpus > 0, k):
        lighter += (f"and the other lighter rows (< {altmin.heavy_degree(k)}) get them too, "
                    f"plain, against a well-conditioned factor (on a GPU they cost a fraction "
                    f"of the exact solve), else they are solved exactly")
    else:
        lighter += "and the other lighter rows are solved exactly"
    stop = altmin.CG_STOP.get((p.method, "plain-cg"))
    if stop is not None:
        plain = (f"{plain} plain CG steps from the last sweep's value (from the third sweep, "
                 f"no more after {stop[0]} once the row's residual is below "
                 f"{altmin.FORCING:g}× the held-out error's last contraction, at most "
                 f"{stop[1]:g} of its start)")
    else:
        plain = f"{plain} plain CG steps from the last sweep's value"
    return [f"rows with >= {altmin.heavy_degree(k)} observations: in a half-sweep whose other "
            f"factor is well conditioned (cond(YᵀY) <= {altmin.WELL_CONDITIONED:g}), {plain}; "
            f"otherwise {otherwise}; {lighter} (row-solves counters below)"]


def _thin_warning(plan: CompletePlan) -> list[str]:
    rows, cols = plan.thin.get("row", 0), plan.thin.get("column", 0)
    if plan.params.reg > 0 or not (rows or cols):
        return []
    return [f"warning: {rows} rows and {cols} columns have fewer observed entries than the rank "
            f"({plan.params.rank}); with reg 0 their factors are not determined by the data "
            f"(minimum-norm solutions): set params.reg > 0 or lower the rank"]


class _FactorsInfo:
    kind = "factors"


def plan(inputs: dict, params: CompleteParams, workers: int, what: str, gpus: int = 0) -> CompletePlan:
    obs = inputs["observed"]
    m, n = obs.shape
    if params.rank > min(m, n):
        raise UserError(f"{what}.params.rank: {params.rank} is more than min(m, n) = {min(m, n)} "
                        f"for a {m}×{n} matrix; ask for a rank of at most {min(m, n)}")
    # an earlier step's output (no path yet) is checked by the workers as they read it
    degrees = {"row": np.diff(sparse.read_pointers(obs.path)),
               "column": sparse.column_counts(obs.path)} if obs.path else {}
    for kind, degree in degrees.items():
        empty = np.nonzero(degree == 0)[0]
        if empty.size:
            raise UserError(f"{what}.inputs.observed: {kind} {int(empty[0])} of {obs.path} has no "
                            f"observed entries ({empty.size} empty {kind}s); its factor is "
                            f"undetermined: drop those {kind}s or observe more entries")
    # with no regularisation, a row seen fewer times than the rank has no unique solution
    thin = {kind: int((degree < params.rank).sum()) for kind, degree in degrees.items()}
    side = dense.chunk_side(8 * params.rank)  # chunks of whole factor rows
    row_chunk, row_blocks = blocks.aligned(m, workers, max(1, side * side // params.rank), align=1)
    col_chunk, col_blocks = blocks.aligned(n, workers, max(1, side * side // params.rank), align=1)
    return CompletePlan(shape=(m, n), nnz=obs.nnz, params=params, row_blocks=row_blocks,
                        col_blocks=col_blocks, chunks=(row_chunk, col_chunk), workers=workers,
                        output=_FactorsInfo(), thin=thin, gpus=gpus)


def create_output(p: CompletePlan, path: str, attributes: dict) -> None:
    import zarr

    group = zarr.open_group(store=path, mode="w-", zarr_format=3)
    k = p.params.rank
    group.create_array("u", shape=(p.shape[0], k), chunks=(p.chunks[0], k), dtype="f8", fill_value=0)
    group.create_array("v", shape=(p.shape[1], k), chunks=(p.chunks[1], k), dtype="f8", fill_value=0)
    for key, value in attributes.items():
        group.attrs[key] = value


def checkpoint_path(output: str) -> str:
    """Beside the final output, dot-named: a re-submitted job finds it and resumes."""
    head, name = os.path.split(os.path.abspath(output))
    return os.path.join(head, f".{name}.mx-checkpoint")


def build(p: CompletePlan, paths: dict[str, str], output: str, step: str,
          final_output: str | None = None) -> StepGraph:
    gang = f"{step}:complete"
    prm = p.params
    signature = {"observed": paths["observed"], "contents": sparse.fingerprint(paths["observed"]),
                 "shape": list(p.shape), "rank": prm.rank,
                 "method": prm.method, "reg": prm.reg, "holdout": prm.holdout, "seed": prm.seed,
                 "row_blocks": [list(b) for b in p.row_blocks],
                 "col_blocks": [list(b) for b in p.col_blocks]}
    ckpt = checkpoint_path(final_output) if (prm.checkpoint and final_output) else None
    dsk, placement, labels, keys = {}, {}, {}, []
    for w in range(p.workers):
        key = ("complete", step, w)
        dsk[key] = Task(key, altmin.run, p.row_blocks[w], p.col_blocks[w], row_blocks=p.row_blocks,
                        col_blocks=p.col_blocks, path=paths["observed"], shape=p.shape,
                        rank=prm.rank, method=prm.method, tol=prm.tol, max_iters=prm.max_iters,
                        reg=prm.reg, holdout=prm.holdout, seed=prm.seed,
                        cg_iters=prm.cg_iters,
                        out_path=output, checkpoint=ckpt, signature=signature,
                        ctx=TaskRef(comm_key(gang)))
        placement[key], labels[key] = w, "compute"
        keys.append(key)
    return StepGraph(dsk=dsk, placement=placement, gangs={gang: keys}, outputs=keys,
                     progress=prm.max_iters * p.workers, labels=labels)


OP = Op(name="complete", inputs={"observed": "sparse"}, params=CompleteParams, plan=plan,
        create_output=create_output, build=build)
