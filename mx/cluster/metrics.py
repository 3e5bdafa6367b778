"""Job progress as Ray metrics, for the dashboard's Metrics view (and Prometheus/Grafana).

Gauges tagged with the job and step: blocks done and in all, FLOP/s, bytes moved between
workers, and whatever a gang program reports as it goes (``complete``: its sweep and
held-out error; ``diffuse``: its denoising step). They exist only where Ray runs; elsewhere
``publish`` does nothing.
"""

from __future__ import annotations

import sys

NAMES = {
    "blocks_done": "progress units (blocks, rounds, sweeps) done in the step",
    "blocks_total": "progress units in the step",
    "flops_per_second": "floating-point operations per second over the step so far",
    "bytes_moved": "bytes moved between workers in the step",
    "iteration": "sweeps done (complete)",
    "holdout_error": "held-out relative error after the last sweep (complete)",
    "train_rmse": "training RMSE, a sweep behind the held-out error while sweeping (complete)",
    "denoising_step": "denoising step (diffuse)",
}
_gauges: dict = {}


def publish(values: dict[str, float], job: str, step: str) -> None:
    """Set the ``mx_<name>`` gauges of this job and step (where Ray is running)."""
    ray = sys.modules.get("ray")  # a backend without Ray never pays for importing it
    if ray is None or not ray.is_initialized():
        return
    from ray.util.metrics import Gauge

    for name, value in values.items():
        if name not in NAMES or value is None:
            continue
        if name not in _gauges:
            _gauges[name] = Gauge(f"mx_{name}", description=NAMES[name], tag_keys=("job", "step"))
        _gauges[name].set(float(value), tags={"job": job, "step": step})
