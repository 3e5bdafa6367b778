"""The ``diffuse`` op: an image from a diffusion transformer, its latent split into bands of rows
across the workers (patch parallelism: ``mx.kernels.patches``).

Input ``model``: ``builtin:dit-tiny`` (a small pixel-space DiT trained by
``scripts/train_dit_tiny.py``), ``builtin:dit-xl`` (DiT-XL/2's shapes, weights drawn from the
seed, for timing) or a DiT checkpoint in safetensors (``mx.kernels.dit`` lists the tensor
names). Output: the final latent as a Zarr array (C, H, W) whose attributes hold the per-step
seconds and bytes exchanged, and a PNG preview beside it (``out/img.zarr`` -> ``out/img.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dask.task_spec import Task, TaskRef
from pydantic import ConfigDict, Field

from mx.errors import UserError
from mx.kernels import dit, patches
from mx.storage import image
from mx.tasks import blocks
from mx.tasks.graph import StepGraph, comm_key
from mx.tasks.ops import Op
from mx.tasks.spec import SEED_MAX, Strict


class Parallel(Strict):
    mode: Literal["none", "naive", "sync", "distrifusion", "pcpp"] = "none"
    patches: int | None = Field(default=None, ge=1)  # bands; default: one per worker
    warmup: int = Field(default=4, ge=0)  # synchronous steps before stale ones (at least 1)
    condition: float = Field(default=0.3, gt=0, le=1)  # pcpp: fraction of a neighbour's rows
    bucket: int = Field(default=4, ge=1)  # layers per asynchronous message


class DiffuseParams(Strict):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    steps: int = Field(default=50, ge=1, le=1000)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    label: int | None = Field(default=None, ge=0)  # class of a class-conditional model
    precision: Literal["auto", "fp32", "fp16"] = "auto"  # auto: fp16 on GPUs, fp32 on CPUs
    parallel: Parallel = Field(default_factory=Parallel)


class _ImageInfo:
    kind = "image"


@dataclass(frozen=True)
class DiffusePlan:
    config: dit.Config
    model: str
    params: DiffuseParams
    latent: tuple[int, int, int]  # (C, H, W)
    bands: list  # token rows of each band
    precision: str
    output: object

    @property
    def grid(self) -> tuple[int, int]:
        p = self.config.patch
        return self.latent[1] // p, self.latent[2] // p

    def describe(self) -> list[str]:
        c, p = self.config, self.params
        gh, gw = self.grid
        mode = p.parallel.mode
        lines = [f"diffuse {p.height}×{p.width} with {self.model} (hidden {c.hidden}, depth "
                 f"{c.depth}, {c.heads} heads, patch {c.patch}): latent {self.latent}, "
                 f"{gh * gw} tokens, {p.steps} DDIM steps, {self.precision}"]
        sizes = sorted({b[1] - b[0] for b in self.bands})
        what = {"none": "one band (the whole image)",
                "naive": "no exchange between bands",
                "sync": "fresh keys/values of every band exchanged in every layer",
                "distrifusion": f"{max(1, p.parallel.warmup)} synchronous steps, then stale "
                                f"keys/values of all other bands, sent {p.parallel.bucket} "
                                f"layers at a time during the step",
                "pcpp": f"{max(1, p.parallel.warmup)} synchronous steps, then stale keys/values "
                        f"of the nearest {p.parallel.condition:g} of each neighbour's rows"}[mode]
        lines.append(f"{len(self.bands)} band(s) of {'/'.join(map(str, sizes))} token rows × {gw}; "
                     f"mode {mode}: {what}")
        return lines


def plan(inputs: dict, params: DiffuseParams, workers: int, what: str, gpus: int = 0) -> DiffusePlan:
    config = inputs["model"]
    par = params.parallel
    step = config.vae_factor * config.patch
    for name in ("height", "width"):
        value = getattr(params, name)
        if value % step:
            lower = max(step, value // step * step)
            raise UserError(f"{what}.params.{name}: {value} is not a multiple of {step} (the "
                            f"model's {config.vae_factor}× latent times its {config.patch}-pixel "
                            f"patches); use {lower} or {lower + step}")
    latent = (config.in_channels, params.height // config.vae_factor,
              params.width // config.vae_factor)
    token_rows = latent[1] // config.patch
    parts = par.patches if par.patches is not None else (1 if par.mode == "none" else workers)
    if par.mode == "none" and parts != 1:
        raise UserError(f"{what}.params.parallel.patches: mode none runs the whole image as one "
                        f"band; drop patches or choose a parallel mode")
    if parts > workers:
        raise UserError(f"{what}.params.parallel.patches: {parts} bands need {parts} workers but "
                        f"the job has {workers}; set resources.workers (or gpus) to {parts}")
    if parts > token_rows:
        raise UserError(f"{what}.params.parallel.patches: {parts} bands but the latent has only "
                        f"{token_rows} rows of tokens; use at most {token_rows} or a taller image")
    if not config.num_classes and params.label is not None:
        # an unconditional model has no class embedding: the label would be silently dropped
        raise UserError(f"{what}.params.label: {config.name} is not class-conditional (it "
                        f"has no classes); drop params.label")
    if config.num_classes and params.label is not None and params.label >= config.num_classes:
        raise UserError(f"{what}.params.label: {params.label} is not a class of this model "
                        f"(0..{config.num_classes - 1})")
    precision = params.precision
    if precision == "auto":
        precision = "fp16" if gpus > 0 else "fp32"
    return DiffusePlan(config=config, model=config.name, params=params, latent=latent,
                       bands=blocks.even(token_rows, parts), precision=precision,
                       output=_ImageInfo())


def create_output(p: DiffusePlan, path: str, attributes: dict) -> None:
    image.create(path, p.latent, attributes)


def build(p: DiffusePlan, paths: dict[str, str], output: str, step: str,
          final_output: str | None = None) -> StepGraph:
    gang = f"{step}:diffuse"
    prm, par = p.params, p.params.parallel
    dsk, placement, labels, keys = {}, {}, {}, []
    for band in range(len(p.bands)):
        key = ("diffuse", step, band)
        dsk[key] = Task(key, patches.run, band, model=paths["model"], precision=p.precision,
                        height=prm.height, width=prm.width, steps=prm.steps, seed=prm.seed,
                        label=prm.label, mode=par.mode, warmup=par.warmup,
                        condition=par.condition, bucket=par.bucket, bands=p.bands,
                        out_path=output, ctx=TaskRef(comm_key(gang)))
        placement[key], labels[key] = band, "compute"
        keys.append(key)
    return StepGraph(dsk=dsk, placement=placement, gangs={gang: keys}, outputs=keys[:1],
                     progress=prm.steps * len(keys), labels=labels)


OP = Op(name="diffuse", inputs={"model": "model"}, params=DiffuseParams, plan=plan,
        create_output=create_output, build=build, publish=image.publish,
        check_publish=image.check_publishable)
