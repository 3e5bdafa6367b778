"""The ops a step may name, and what each must provide.

An op is plain data plus three functions (and two optional ones):

- ``plan(inputs, params, workers, what, gpus)``: check the inputs (``DenseInfo``/``SparseInfo``)
  and params, decide how to run (algorithm, grid, blocks) and return a plan whose ``output``
  describes the result (so later steps can be checked before anything runs) and whose
  ``describe()`` gives the log lines saying what was chosen and why. Raises ``UserError``.
- ``create_output(plan, path, attributes)``: create the empty output the graph writes into.
- ``build(plan, paths, output, step, final_output)``: the step's ``StepGraph`` (reads ->
  compute -> writes) writing into ``output`` (the temporary); ``final_output`` is where it
  will be committed (for what must outlive a failed run, such as checkpoints).
- ``publish(output)`` (optional): files derived from the committed output, made after the
  commit (``diffuse``'s PNG beside its Zarr array), with ``check_publish(output, what)``
  refusing beforehand paths it may not write.
- ``check_memory(plan, backend, gpus, here, what)`` (optional): refuse, when the job is
  submitted, work that cannot fit its workers' memory; ``here`` says whether the job runs on
  this machine (so its memory is the workers').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class Op:
    name: str
    inputs: dict[str, str]  # input name -> kind of matrix it takes ("dense" | "sparse")
    params: type[BaseModel]
    plan: Callable[..., Any]
    create_output: Callable[..., None]
    build: Callable[..., Any]
    publish: Callable[[str], Any] | None = None  # run on the output once committed
    check_publish: Callable[[str, str], None] | None = None  # at plan time: may publish write?
    check_memory: Callable[..., None] | None = None  # at submit time: does the work fit?


def registry() -> dict[str, Op]:
    from mx.tasks import complete, diffuse, gemm, spgemm

    return {op.name: op for op in (gemm.OP, spgemm.OP, complete.OP, diffuse.OP)}
