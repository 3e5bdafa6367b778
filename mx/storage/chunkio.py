"""Reading and writing regions of Zarr arrays one chunk per I/O thread, in parallel.

Zarr's synchronous API hands every call to one shared event-loop thread, and that thread
copies each decoded chunk into the result by itself: however many threads call it, a single
thread faults in and fills the whole region. Here each I/O thread runs Zarr's coroutine for one
chunk on an event loop of its own, decoding (or encoding) and copying in parallel, straight
into (or out of) the caller's array. On 16 cores a 1 GiB dense block reads 2.2× faster.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from zarr.core.buffer.cpu import NDBuffer

IO_THREADS = min(32, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None
_THREAD = threading.local()
_LOOPS: list = []  # every I/O thread's loop, closed at exit (an unclosed one warns as it goes)


def pool() -> ThreadPoolExecutor:
    """Threads for chunk I/O: Zarr's codecs (zstd, blosc) release the GIL, so the chunks of one
    region decode and encode in parallel on the worker's cores."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="mx-io")
    return _POOL


def _run(coroutine):
    """Run one of Zarr's coroutines to the end on this thread's own event loop."""
    loop = getattr(_THREAD, "loop", None)
    if loop is None:
        loop = _THREAD.loop = asyncio.new_event_loop()
        _LOOPS.append(loop)
    return loop.run_until_complete(coroutine)


@atexit.register
def _close_loops() -> None:
    for loop in _LOOPS:
        if not loop.is_running() and not loop.is_closed():
            loop.close()


def pieces(region: tuple, chunks: tuple):
    """``region`` (a (start, stop) per axis) split at the chunk boundaries: one piece per chunk
    it touches, each one chunk's decode (or encode) and one thread's work."""
    return itertools.product(*(list(_spans(bounds, chunk)) for bounds, chunk in zip(region, chunks)))


def _spans(bounds: tuple[int, int], chunk: int):
    start, end = bounds
    while start < end:
        stop = min(end, (start // chunk + 1) * chunk)
        yield start, stop
        start = stop


def read(array, region: tuple, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (shaped like ``region``) with ``array[region]``, cast to out's dtype; array
    is an opened ``zarr.Array``."""
    source = array.async_array
    cast = out.dtype != source.dtype

    def fill(piece):
        selection = tuple(slice(lo, hi) for lo, hi in piece)
        where = out[tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(piece, region))]
        if cast:
            where[...] = _run(source.get_orthogonal_selection(selection))
        else:
            _run(source.get_orthogonal_selection(selection, out=NDBuffer.from_numpy_array(where)))

    list(pool().map(fill, pieces(region, source.chunks)))
    return out


def write(array, region: tuple, block: np.ndarray) -> None:
    """``array[region] = block``, a chunk per thread; ``array`` is an opened ``zarr.Array``. Two
    writers must not share a chunk (Zarr would lose one's data): regions cover whole chunks."""
    target = array.async_array

    def put(piece):
        selection = tuple(slice(lo, hi) for lo, hi in piece)
        part = block[tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(piece, region))]
        _run(target.setitem(selection, part))

    list(pool().map(put, pieces(region, target.chunks)))
