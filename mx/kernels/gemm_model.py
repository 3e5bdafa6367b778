"""A measured model of cuBLAS throughput against block shape, per GPU type and precision.

Tile shape alone moves GEMM throughput by several times (thin panels starve the tensor cores),
so block sizes are chosen from measurement, not guessed. ``measure`` times cublasGemmEx on a
small grid of shapes (M = N, several K) once per GPU type and precision and caches the table
under ``$MX_HOME/cache``; ``predict`` interpolates it; ``choose_width`` picks the narrowest
inner-dimension panel that keeps within ``slack`` of the best modelled throughput (narrower
panels mean less memory per buffer and finer pipelining).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

SIDES = (2048, 4096, 8192, 16384)
# bump when the measurement changes, so cached tables are measured again
VERSION = 2
WIDTHS = (256, 512, 1024, 2048, 4096, 8192)


def cache_path(device: str, precision: str) -> str:
    from mx.tasks.record import home

    safe = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-")
    return os.path.join(home(), "cache", f"gemm-model-v{VERSION}-{safe}-{precision}.json")


def measure(precision: str, repeat: int = 3) -> dict:
    """Time cuBLAS on this process's GPU for every (side, side, width); TFLOP/s per shape."""
    import cupy

    from mx.kernels import gemm, precision as prec

    rng = cupy.random.default_rng(0)
    table = {}
    for side in SIDES:
        for width in WIDTHS:
            a = prec.to_device(cupy, rng.random((side, width), dtype=np.float32), precision)
            b = prec.to_device(cupy, rng.random((width, side), dtype=np.float32), precision)
            c = cupy.zeros((side, side), prec.output_dtype(precision))
            times = []
            for it in range(repeat + 1):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                gemm.accumulate(cupy, c, a, b, precision)  # beta = 1: as the rounds use it
                end.record()
                end.synchronize()
                if it:
                    times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
            table[f"{side},{width}"] = 2.0 * side * side * width / min(times) / 1e12
            del a, b, c
    cupy.get_default_memory_pool().free_all_blocks()
    return table


def load_or_measure(device: str, precision: str, allow_measure: bool) -> dict | None:
    path = cache_path(device, precision)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    if not allow_measure:
        return None
    table = measure(precision)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
    return table


def predict(table: dict, side: float, width: float) -> float:
    """Modelled TFLOP/s of a (side × width) · (width × side) product: bilinear in log2 space,
    clamped to the measured range."""
    ls = min(max(math.log2(max(side, 1)), math.log2(SIDES[0])), math.log2(SIDES[-1]))
    lw = min(max(math.log2(max(width, 1)), math.log2(WIDTHS[0])), math.log2(WIDTHS[-1]))

    def bracket(values, x):
        logs = [math.log2(v) for v in values]
        for lo, hi in zip(range(len(logs) - 1), range(1, len(logs))):
            if logs[lo] <= x <= logs[hi]:
                return values[lo], values[hi], (x - logs[lo]) / (logs[hi] - logs[lo])
        return values[-1], values[-1], 0.0

    s0, s1, ts = bracket(SIDES, ls)
    w0, w1, tw = bracket(WIDTHS, lw)
    f = lambda s, w: table[f"{s},{w}"]  # noqa: E731
    return ((1 - ts) * ((1 - tw) * f(s0, w0) + tw * f(s0, w1))
            + ts * ((1 - tw) * f(s1, w0) + tw * f(s1, w1)))


def choose_width(table: dict, side: float, k: int, slack: float = 0.02) -> tuple[int, str]:
    """The narrowest panel width (of WIDTHS, at most k) within ``slack`` of the best; returns
    (width, why) with the modelled figures for the log."""
    side = max(1.0, side)
    candidates = [w for w in WIDTHS if w <= max(k, WIDTHS[0])]
    rates = {w: predict(table, side, w) for w in candidates}
    best = max(rates.values())
    width = min(w for w, r in rates.items() if r >= (1 - slack) * best)
    why = (f"cuBLAS model: {rates[width]:.1f} TFLOP/s at {int(side)}×{int(side)}×{width}, "
           f"{rates[width] / best:.0%} of the best modelled {best:.1f}")
    return width, why
