"""Patch-parallel diffusion sampling: the SPMD program of a gang, one band of latent rows each.

Every worker holds the same initial noise and runs the sampler on its own band of token rows
(``blocks.even`` over the token grid's rows). Tokens interact only in attention, so what the
modes differ in is which keys and values a band attends to besides its own:

- ``none``: one band, the whole image (the reference).
- ``naive``: its own only; nothing is exchanged (the lower bound on fidelity).
- ``sync``: every other band's fresh keys/values, exchanged in every layer before use; equals
  ``none`` up to rounding (this checks the exchange).
- ``distrifusion``: after ``warmup`` synchronous steps, the other bands' keys/values from the
  previous step. A layer's own keys/values are sent as soon as they are made, ``bucket``
  layers per message, and the exchange runs beside the compute (NCCL on its own stream, or a
  host transport's background send); step t+1 waits for a layer's bucket just before using it.
- ``pcpp``: as distrifusion, but only the ``condition`` fraction of each neighbour's token
  rows nearest the band, exchanged with the two neighbours alone.

Bytes sent per step and the memory held for stale keys/values are counted and returned.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mx.cluster.comm import GangContext
from mx.kernels import dit, sampler
from mx.storage import image

STALE = ("distrifusion", "pcpp")


def neighbour_rows(bands, me: int, condition: float) -> dict[int, tuple[int, int]]:
    """pcpp: for each neighbour of band ``me``, the token rows of that neighbour's band (relative
    to its start) that ``me`` attends to: the ``condition`` fraction nearest to ``me``."""
    out = {}
    for peer in (me - 1, me + 1):
        if 0 <= peer < len(bands):
            rows = bands[peer][1] - bands[peer][0]
            take = min(rows, max(1, math.ceil(condition * rows)))
            out[peer] = (rows - take, rows) if peer < me else (0, take)
    return out


class Exchange:
    """The keys/values one band attends to, per layer and step, for one mode."""

    def __init__(self, ctx: GangContext, mode: str, bands, cols: int, heads: int, head_dim: int,
                 depth: int, dtype, warmup: int, condition: float, bucket: int):
        self.ctx, self.mode, self.bands, self.cols = ctx, mode, bands, cols
        self.heads, self.head_dim, self.depth, self.dtype = heads, head_dim, depth, dtype
        self.warmup, self.bucket = warmup, max(1, bucket)
        self.me = ctx.control.rank if len(bands) > 1 else 0
        others = [q for q in range(len(bands)) if q != self.me]
        # token rows (relative to a band's start) received from / sent to each peer:
        # synchronous steps take every other band whole
        self.whole = {} if mode == "naive" else {q: (0, self._rows(q)) for q in others}
        self.mine = {q: (0, self._rows(self.me)) for q in self.whole}
        if mode == "pcpp":  # stale steps: the nearest part of each neighbour
            self.want = neighbour_rows(bands, self.me, condition)
            self.give = {q: neighbour_rows(bands, q, condition)[self.me] for q in self.want}
        else:
            self.want, self.give = (self.whole, self.mine) if mode in STALE else ({}, {})
        self.stale: dict[int, dict[int, object]] = {}  # layer -> peer -> (2, h, tokens, d)
        self.pending: dict[int, tuple] = {}  # layer -> (request, index in its bucket)
        self.outbox: list = []  # this step's own keys/values of the bucket being filled
        self.bytes_sent = 0

    def _rows(self, q: int) -> int:
        return self.bands[q][1] - self.bands[q][0]

    def synchronous(self, step: int) -> bool:
        # the first step has no previous step's keys/values: it is synchronous in any case
        return self.mode == "sync" or (self.mode in STALE and step < max(1, self.warmup))

    def tokens(self, rows: tuple[int, int]) -> int:
        return (rows[1] - rows[0]) * self.cols

    def buffer_bytes(self) -> int:
        """Memory held for other bands' keys/values between steps (stale modes)."""
        if self.mode not in STALE:
            return 0
        itemsize = np.dtype(self.dtype).itemsize
        return sum(2 * self.depth * self.heads * self.tokens(r) * self.head_dim * itemsize
                   for r in self.want.values())

    def kv(self, step: int, last_step: bool):
        """The ``kv(layer, k, v)`` function that ``dit.forward_band`` calls in this step."""
        xp = self.ctx.xp
        if not self.whole:
            return dit.own_kv
        sync = self.synchronous(step)

        def kv(layer, k, v):
            own = xp.stack([k, v])  # (2, heads, tokens, head_dim)
            if sync:
                got = self.ctx.wait(self._post(own, ("kv", step, layer), self.mine, self.whole),
                                    "wait-sync-exchange")
                others = dict(zip(sorted(self.whole), got))
                if self.want:  # what the first stale step will use
                    self.stale[layer] = {q: self._slice(others[q], rows)
                                         for q, rows in self.want.items()}
            else:
                others = self._stale(layer)
                if not last_step:
                    self._queue(own, layer, step)
            parts = [others[q] for q in sorted(others)] + [own]
            merged = xp.concatenate(parts, axis=2)
            return merged[0], merged[1]

        return kv

    def _stale(self, layer: int) -> dict:
        pending = self.pending.pop(layer, None)
        if pending is not None:
            request, index = pending
            got = self.ctx.wait(request, "wait-exchange")
            self.stale[layer] = {q: a[index] for q, a in zip(sorted(self.want), got)}
        return self.stale[layer]

    def _queue(self, own, layer: int, step: int) -> None:
        """Send this layer's keys/values (for the next step) once ``bucket`` layers are ready."""
        self.outbox.append(own)
        if len(self.outbox) == self.bucket or layer == self.depth - 1:
            first = layer + 1 - len(self.outbox)
            bucket = self.ctx.xp.stack(self.outbox)  # (layers, 2, heads, tokens, head_dim)
            self.outbox = []
            request = self._post(bucket, ("kv", step, first), self.give, self.want)
            for i in range(first, layer + 1):
                self.pending[i] = (request, i - first)

    def _post(self, own, tag, give: dict, want: dict):
        """Send each peer its rows of ``own`` and receive each wanted peer's rows."""
        lead = own.shape[:-3]  # (2,) or (layers, 2)
        sends = []
        for q, rows in give.items():
            part = self.ctx.xp.ascontiguousarray(self._slice(own, rows))
            sends.append((part, q, tag))
            self.bytes_sent += part.nbytes
        recvs = [(q, tag, lead + (self.heads, self.tokens(want[q]), self.head_dim),
                  np.dtype(self.dtype)) for q in sorted(want)]
        with self.ctx.timed("exchange-post"):
            return self.ctx.comm.start(sends, recvs)

    def _slice(self, a, rows: tuple[int, int]):
        """Token rows ``rows`` of keys/values laid out (..., heads, tokens, head_dim)."""
        if rows[0] == 0 and rows[1] * self.cols == a.shape[-2]:
            return a
        return a[..., rows[0] * self.cols:rows[1] * self.cols, :]


def run(rank: int, *, model, precision, height, width, steps, seed, label, mode, warmup,
        condition, bucket, bands, out_path, ctx: GangContext) -> dict:
    """Sample one image; rank 0 gathers the bands, writes the output and returns the record."""
    xp = ctx.xp
    dtype = np.float16 if precision == "fp16" else np.float32
    with ctx.timed_host("load-model"):
        net = dit.load(model, xp, dtype, seed)
    cfg = net.config
    p = cfg.patch
    lat_h, lat_w = height // cfg.vae_factor, width // cfg.vae_factor
    grid = (lat_h // p, lat_w // p)
    r0, r1 = bands[rank]
    x = xp.asarray(sampler.initial_noise((cfg.in_channels, lat_h, lat_w), seed)[:, r0 * p:r1 * p])
    exchange = Exchange(ctx, mode, bands, grid[1], cfg.heads, cfg.hidden // cfg.heads, cfg.depth,
                        dtype, warmup, condition, bucket)
    times = sampler.timesteps(steps)
    traced = bool(exchange.whole) and hasattr(ctx.comm, "trace")  # NCCL: when exchanges run
    if traced:
        ctx.comm.trace()
    clock = _Clock(xp)
    sent = []
    for step, t in enumerate(times):
        last = step == len(times) - 1
        before = exchange.bytes_sent
        with ctx.timed("denoise"):
            c = dit.condition(net, xp, t, label)
            eps = dit.forward_band(net, xp, x.astype(dtype), (r0, r1), grid, c,
                                   exchange.kv(step, last))
            x = sampler.ddim_step(xp, x, eps, t, None if last else times[step + 1], cfg.clip_x0)
        clock.mark()
        sent.append(exchange.bytes_sent - before)
        ctx.count("exchange-bytes", sent[-1])
        ctx.advance(1)
        ctx.report({"denoising_step": step + 1})
    ctx.finish()
    seconds = clock.seconds()
    # steady state: the steps after the warmup (the last sends nothing: no step follows it)
    steady = [i for i in range(steps) if not exchange.synchronous(i) and i < steps - 1]
    steady = steady or list(range(steps))
    mine = {"band": [r0, r1], "step_seconds": seconds,
            "steady_bytes": float(np.median([sent[i] for i in steady])),
            "buffer_bytes": exchange.buffer_bytes()}
    if traced:
        # the steady steps' stalls: waits for stale keys/values, or (sync mode, where every step
        # is synchronous and counts as steady) the waits for fresh ones
        waits = "wait-sync-exchange" if exchange.synchronous(steady[0]) else "wait-exchange"
        mine["timeline"] = clock.timeline(ctx.comm.take_spans())
        mine["overlap"] = _overlap(mine["timeline"], steady, ctx.stats.get(waits, 0.0))
    gathered = _gather(ctx, ctx.to_host(x), mine, len(bands))
    if gathered is None:
        return {"band": [r0, r1]}
    latent, records = gathered
    step_seconds = [max(r["step_seconds"][i] for r in records) for i in range(steps)]
    summary = {"mode": mode, "bands": [r["band"] for r in records], "steps": steps,
               "model": model, "precision": "fp16" if dtype == np.float16 else "fp32",
               "height": height, "width": width, "seed": seed,
               "step_seconds": step_seconds,
               "steady_step_seconds": float(np.median([step_seconds[i] for i in steady])),
               "bytes_per_step_per_worker": int(max(r["steady_bytes"] for r in records)),
               "buffer_bytes_per_worker": int(max(r["buffer_bytes"] for r in records))}
    if all("timeline" in r for r in records):
        summary["overlap"] = [r["overlap"] for r in records]
        summary["timeline"] = [r["timeline"] for r in records]
    bad = int(latent.size - np.count_nonzero(np.isfinite(latent)))
    if bad:  # a picture of NaN must never look like a result
        hint = "; try precision: fp32" if dtype == np.float16 else ""
        raise FloatingPointError(f"the denoised latent holds {bad} NaN or infinite values; "
                                 f"nothing is committed (the model's activations overflow{hint})")
    image.write(out_path, latent, cfg.clip_x0, summary)
    return summary


def _gather(ctx, band, record, parts: int):
    """Rank 0 receives every band (host arrays, in band order) and every worker's record;
    returns (latent, records) there and None elsewhere."""
    if parts == 1:
        return band, [record]
    control = ctx.control
    if control.rank != 0:
        control.start([([band, record], 0, "bands")], []).wait()
        return None
    got = control.start([], [(q, "bands", None, None) for q in range(1, parts)]).wait()
    return (np.concatenate([band] + [g[0] for g in got], axis=1),
            [record] + [g[1] for g in got])


def _overlap(timeline: dict, steady: list[int], stalled: float) -> dict:
    """How much of the steady steps' exchange time the compute hid: the NCCL stream's busy
    seconds in those steps against the seconds the compute stream waited for an exchange."""
    steps = timeline["steps"]
    lo, hi = steps[min(steady)][0], steps[max(steady)][1]
    busy = sum(e - b for b, e in timeline["exchanges"] if lo <= b < hi)
    compute = sum(e - b for b, e in steps[min(steady):max(steady) + 1])
    return {"steady_steps": len(steady), "compute_s": round(compute, 6),
            "exchange_s": round(busy, 6), "stalled_s": round(stalled, 6),
            "hidden": round(1.0 - stalled / busy, 4) if busy else None}


class _Clock:
    """Per-step seconds: CUDA events on the GPU (launches are asynchronous), else host time."""

    def __init__(self, xp):
        self.xp = xp
        self.gpu = xp.__name__ != "numpy"
        self.marks = [self._now()]

    def _now(self):
        return self.xp.cuda.get_current_stream().record() if self.gpu else time.perf_counter()

    def mark(self) -> None:
        self.marks.append(self._now())

    def timeline(self, spans) -> dict:
        """Each step's and each exchange's (start, end) in seconds from the first mark (GPU)."""
        self.marks[-1].synchronize()
        at = lambda e: round(self.xp.cuda.get_elapsed_time(self.marks[0], e) / 1000.0, 6)  # noqa: E731
        marks = [at(m) for m in self.marks]
        return {"steps": [[a, b] for a, b in zip(marks, marks[1:])],
                "exchanges": [[at(b), at(e)] for b, e in spans]}

    def seconds(self) -> list[float]:
        if not self.gpu:
            return [round(b - a, 6) for a, b in zip(self.marks, self.marks[1:])]
        self.marks[-1].synchronize()
        return [round(self.xp.cuda.get_elapsed_time(a, b) / 1000.0, 6)
                for a, b in zip(self.marks, self.marks[1:])]
