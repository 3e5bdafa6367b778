"""What host memory costs a fresh GPU process: allocating pinned memory, locking pageable memory
in place, and copies to and from the GPU from each kind. This is why mx page-locks a block it
has just read (``mx.storage.dense.page_lock``) instead of reading it into freshly allocated
pinned memory: every step starts its own workers, so no pinned pool is warm.

Usage (GPU machine, a fresh process):  python bench/host_copies.py
"""

import time

import cupy
import numpy as np

GIB = 1 << 30


def timed(fn):
    cupy.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    out = fn()
    cupy.cuda.runtime.deviceSynchronize()
    return time.perf_counter() - t0, out


def main():
    cupy.ones(4).sum().item()  # the CUDA context, outside the timings
    n = GIB // 4
    rows = []
    s, mem = timed(lambda: cupy.cuda.alloc_pinned_memory(GIB))
    rows.append(("cudaHostAlloc 1 GiB (CuPy's pinned pool, empty)", s))
    pinned = np.frombuffer(mem, np.float32, n)
    s, _ = timed(lambda: pinned.fill(1.0))
    rows.append(("first touch of that pinned memory", s))
    s, pageable = timed(lambda: np.ones(n, np.float32))
    rows.append(("first touch of fresh pageable memory, one thread", s))
    device = cupy.empty(n, np.float32)
    for name, src in (("pinned", pinned), ("pageable", pageable)):
        s, _ = timed(lambda: device.set(src))
        rows.append((f"H2D from {name}", s))
        s, _ = timed(lambda: device.get(out=src))
        rows.append((f"D2H into {name}", s))
    s, _ = timed(lambda: device.get())
    rows.append(("D2H into a new pageable array", s))
    locked = np.ones(n, np.float32)
    s, _ = timed(lambda: cupy.cuda.runtime.hostRegister(locked.ctypes.data, GIB, 0))
    rows.append(("cudaHostRegister of touched pageable memory", s))
    s, _ = timed(lambda: device.set(locked))
    rows.append(("H2D from registered", s))
    cupy.cuda.runtime.hostUnregister(locked.ctypes.data)
    print(f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, 1 GiB each")
    for name, seconds in rows:
        rate = f"{GIB / seconds / 1e9:6.1f} GB/s" if name.startswith(("H2D", "D2H")) else ""
        print(f"{name:>50}: {seconds:.3f} s {rate}")


if __name__ == "__main__":
    main()
