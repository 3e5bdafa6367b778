"""The ``diffuse`` op: an image from a diffusion transformer, its latent split into bands of rows
across the workers (patch parallelism: ``mx.kernels.patches``).

Input ``model``: ``builtin:dit-tiny`` (a small pixel-space DiT trained by
``scripts/train_dit_tiny.py``), ``builtin:dit-xl`` (DiT-XL/2's shapes, weights drawn from the
seed, for timing) or a DiT checkpoint in safetensors (``mx.kernels.dit`` lists the tensor
names). Output: the final latent as a Zarr array (C, H, W) whose attributes hold the per-step
seconds and bytes exchanged, and a PNG preview beside it (``out/img.zarr`` -> ``out/img.png``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dask.task_spec import Task, TaskRef
from pydantic import ConfigDict, Field

from mx.cluster import devices
from mx.errors import UserError
from mx.kernels import attention, dit, patches
from mx.storage import image
from mx.tasks import blocks
from mx.tasks.gemm import MEMORY_FORMS, parse_bytes
from mx.tasks.graph import StepGraph, comm_key
from mx.tasks.ops import Op
from mx.tasks.spec import SEED_MAX, Strict
from mx.units import human_bytes


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
    # memory each worker may use (e.g. "16GiB"); default: what this machine has, checked when
    # the job is submitted to run here (a cluster's machines are not checked)
    memory: int | float | str | None = Field(default=None, description=MEMORY_FORMS)


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
    memory: int | None = None  # params.memory in bytes

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
    memory = None if params.memory is None else parse_bytes(params.memory, f"{what}.params.memory")
    return DiffusePlan(config=config, model=config.name, params=params, latent=latent,
                       bands=blocks.even(token_rows, parts), precision=precision,
                       output=_ImageInfo(), memory=memory)


def worker_bytes(p: DiffusePlan, gpu: bool) -> int:
    """An upper bound on the memory one worker needs, for its largest need over the bands.

    It follows what ``patches.run`` and ``dit.forward_band`` allocate, counting every array of
    one layer as live at once (the real peak is lower: the MLP's arrays come after the
    attention's are freed). With d the hidden width, b the bytes of the compute dtype, n the
    band's tokens and N the tokens its attention sees (all of the image's, in the synchronous
    steps every mode but naive starts with):

    - weights: every tensor in the compute dtype; on CPUs also the file's tensors as float32
      while they are converted (``dit.to_device``);
    - activations: x, h (2nd), qkv and its bias sum (6nd), the attention's output, its
      transposed copy and projection (3nd), the MLP's product and GELU (8nd), the band's
      position embedding (nd), all times b, plus its float64 making on the host (3nd × 8);
      keys and values attended to: this band's stacked, the others', their concatenation
      (2nd + 2(N - n)d + 2Nd = 4Nd, times b);
    - attention scores: none in the fused GPU kernel (float16, head dim <= 128); elsewhere a
      chunk of queries at a time, at most ``attention.SCORE_BUDGET`` scores unless one query
      row over all heads is larger, in float32 (plus the float16 product it is cast from),
      twice: a chunk's scores are freed only when the next chunk's are made;
    - stale keys/values (distrifusion, pcpp): those received for this step and those arriving
      for the next, 2 × 2·depth·(tokens wanted)·d·b, plus this step's own still being sent,
      2·depth·nd·b;
    - the latent: 8 copies of the whole (C, H, W) in float32 (its noise, the sampler's
      temporaries, the gather at rank 0): small beside the rest.
    """
    c, prm = p.config, p.params
    b = 2 if p.precision == "fp16" else 4
    d, cols = c.hidden, p.grid[1]
    weights = sum(math.prod(shape) for shape in dit.expected_shapes(c).values())
    weight_bytes = weights * (b if gpu else b + 4)
    total = p.grid[0] * cols
    fused = gpu and b == 2 and d // c.heads <= attention.MAX_HEAD_DIM
    mode = prm.parallel.mode
    need = 0
    for me, (r0, r1) in enumerate(p.bands):
        n = (r1 - r0) * cols
        seen = n if mode == "naive" else total
        act = (20 * n + 4 * seen) * d * b + 24 * n * d
        scores = 0
        if not fused:
            chunk = max(1, min(n, attention.SCORE_BUDGET // max(1, c.heads * seen)))
            scores = 2 * chunk * c.heads * seen * (8 if b == 2 else 4)
        stale = 0
        if mode in patches.STALE:
            wanted = seen - n
            if mode == "pcpp":
                near = patches.neighbour_rows(p.bands, me, prm.parallel.condition)
                wanted = sum(hi - lo for lo, hi in near.values()) * cols
            stale = (2 * 2 * c.depth * wanted * d + 2 * c.depth * n * d) * b
        need = max(need, act + scores + stale)
    latent = 8 * math.prod(p.latent) * 4
    return weight_bytes + need + latent


def check_memory(p: DiffusePlan, backend: str, gpus: int, here: bool, what: str) -> None:
    """Refuse, when the job is submitted, an image whose workers would run out of memory
    (``worker_bytes``) rather than fail at run time. Checked against params.memory when the
    step gives it; else against this machine when the job runs here (``here``): a GPU's
    memory per worker, or the host's shared by the workers. A job sent to a Ray cluster, or
    started under srun or mpiexec, runs on machines this process cannot see: without
    params.memory it is not checked."""
    need = worker_bytes(p, gpus > 0)
    workers = len(p.bands)
    fix = "or more patches and workers (params.parallel.patches, resources.workers or gpus)"
    if p.memory is not None:
        have, source = p.memory, "params.memory"
    elif not here:
        return
    elif gpus > 0:
        have = devices.gpu_memory()
        if have is None:
            return  # no GPU here: check_resources has said so already
        source = "the GPU's memory"
        if backend == "local":  # its virtual workers share the one GPU
            have //= workers
            source = f"the GPU's {human_bytes(have * workers)} shared by {workers} workers"
            fix = "or run on a GPU per worker (backend: ray)"
    else:
        host = devices.host_memory()
        have = host // workers
        source = f"this machine's {human_bytes(host)} shared by {workers} worker(s)"
        fix = "or more patches on more machines (resources.address, params.parallel.patches)"
    if need <= have:
        return
    prm = p.params
    raise UserError(f"{what}.params: height {prm.height} × width {prm.width} in {workers} "
                    f"patch(es) needs about {human_bytes(need)} per worker, but "
                    f"{human_bytes(have)} is there ({source}); use fewer pixels (height, width), "
                    f"{fix}")


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
        check_publish=image.check_publishable, check_memory=check_memory)
