"""Out-of-core GEMM: each worker streams panels of A and B from Zarr through its device.

When A, B and C do not fit in the workers' memory, C is cut into tiles that do; each worker
takes its share of the tiles and, for each, accumulates C(i, j) over k-slabs of A(i, :) and
B(:, j) read from storage. Reads run on background threads (decoding chunks in parallel into
pinned host buffers) one slab ahead of the device, the products are queued asynchronously on
the GPU, and a finished tile goes back to the host and is written while the next tile is
computed. No worker waits for another: the storage is the only thing they share.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mx.cluster.comm import GangContext
from mx.kernels import abft, gemm, precision as prec
from mx.storage import dense

PREFETCH = 2  # slabs read ahead of the one being multiplied


def run(tiles: list, slabs: list, *, a_path: str, b_path: str, out_path: str, read_dtype: str,
        precision: str, verify: str | None, ctx: GangContext) -> dict:
    """Compute and write this worker's C tiles; returns what was written."""
    xp, pinned = ctx.xp, ctx.gpu
    written = 0
    faults = abft.planned_fault(ctx.control.rank) if verify == "abft" else set()
    product = 0  # this worker's products so far (the drill's rounds)
    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="mx-stream-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mx-stream-write") as writer:
        pending_write = None
        for t, (rows, cols) in enumerate(tiles):
            def fetch(k0k1, rows=rows, cols=cols):
                return (dense.read_block(a_path, rows, k0k1, read_dtype, pinned),
                        dense.read_block(b_path, k0k1, cols, read_dtype, pinned))

            ahead = [reader.submit(fetch, s) for s in slabs[:PREFETCH]]
            with ctx.timed("to-device"):
                c = gemm.zeros(xp, (rows[1] - rows[0], cols[1] - cols[0]), prec.output_dtype(precision))
            checks = abft.start(xp, c, precision) if verify == "abft" else None
            for s in range(len(slabs)):
                a_host, b_host = _waited(ctx, ahead.pop(0))
                if s + PREFETCH < len(slabs):
                    ahead.append(reader.submit(fetch, slabs[s + PREFETCH]))
                with ctx.timed("to-device"):  # the product's checksums taken on the way
                    a, b = abft.to_device(xp, a_host, b_host, precision, checks, ctx.counters)
                with ctx.timed("compute"):
                    abft.accumulate(xp, c, a, b, precision, None, ctx.counters, product in faults)
                product += 1
                ctx.advance(1)
            if checks is not None:
                with ctx.timed("compute"):
                    abft.verify(xp, c, checks, precision, ctx.counters, f"tile {t}")
            ctx.finish()
            host = ctx.to_host(c)
            del c
            if pending_write is not None:
                written += _waited(ctx, pending_write, "write-wait")["bytes"]
            pending_write = writer.submit(dense.write_block, out_path, rows, cols, host)
        if pending_write is not None:
            written += _waited(ctx, pending_write, "write-wait")["bytes"]
    return {"tiles": len(tiles), "bytes": written}


def _waited(ctx: GangContext, future, phase: str = "read-wait"):
    with ctx.timed_host(phase):
        return future.result()
