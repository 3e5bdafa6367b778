"""Which array module a worker computes with, and whether GPUs are really there.

Kernels are written against ``xp``: NumPy on CPU workers, CuPy on GPU workers. A GPU that was
asked for and is not there is an error, never a silent CPU run.
"""

from __future__ import annotations

import numpy as np

from mx.errors import UserError


def gpu_count() -> tuple[int, str]:
    """(number of CUDA devices CuPy can use here, why none when 0)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return 0, f"CuPy is not importable: {exc}; install mx[gpu]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return 0, f"CUDA reports no usable device ({exc})"
    return count, "" if count else "CUDA reports 0 devices"


def require_gpus(wanted: int, available: int, why: str, where: str) -> None:
    if wanted > available:
        have = f"{available} GPU{'s' if available != 1 else ''}"
        detail = f" ({why})" if why and not available else ""
        fix = "set gpus: 0 to run on CPUs" if not available else f"set gpus to at most {available}"
        raise UserError(f"resources.gpus: {wanted} asked for but {where} has {have}{detail}; {fix}")


def gpu_memory() -> int | None:
    """Bytes of memory of GPU 0 here (read from its properties: no CUDA context is made)."""
    if gpu_count()[0] == 0:
        return None
    import cupy

    return int(cupy.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"])


def host_memory() -> int:
    """Bytes of physical memory of this machine. All of it, not what is free now: a check
    against it refuses only work that could never fit, not work that another process's
    memory happens to crowd out."""
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def select_gpu(ray_gpu_ids: list) -> int:
    """Make this process use its assigned GPU. Ray masks the others with CUDA_VISIBLE_DEVICES
    (then the GPU is device 0), unless RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES is set (then
    the id Ray assigned is used directly)."""
    import os

    import cupy

    device = 0
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") and ray_gpu_ids:
        device = int(ray_gpu_ids[0])
    cupy.cuda.Device(device).use()
    return device


def warm_up() -> None:
    """Create this process's CUDA context and cuBLAS handle now (a tiny product), so that a
    worker pays them when it starts, not inside its step's first block product."""
    import cupy

    x = cupy.ones((8, 8), dtype=cupy.float32)
    (x @ x).sum().item()


def array_module(gpu: bool):
    if not gpu:
        return np
    import cupy

    return cupy


def device_name(gpu: bool) -> str:
    if not gpu:
        return "cpu"
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"gpu{dev.id} {name}"
