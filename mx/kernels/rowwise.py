"""Row-partitioned SpGEMM, the SPMD program one gang member runs.

Each worker holds some row chunks of A (contiguous row ranges; the plan deals them out
balanced by A's nonzeros, optionally in a random order). For each chunk it reads A's rows and
the rows of B they touch, multiplies them, and keeps its part of C. B comes whole when it fits,
otherwise only the rows needed. Then:

1. every worker tells every other how many entries each of its chunks produced (small
   messages), so all know every chunk's offset in C;
2. rank 0 creates C's arrays, now that their length is known, and the others wait;
3. each worker writes row offsets for its chunks (whole pointer chunks) and its entries. A
   Zarr chunk that a worker's range covers entirely, it writes itself. A chunk shared by
   several ranges is written once, by the worker holding the chunk's first entry, which
   receives the other pieces first. No two writers ever touch one chunk.
"""

from __future__ import annotations

import numpy as np

from mx.cluster.comm import GangContext
from mx.kernels import spgemm
from mx.storage import chunkio
from mx.storage import sparse


def run(units: list, *, all_units: list, owners: list, a_path: str, b_path: str,
        out_path: str, shape: tuple[int, int], dtype: str, replicate_b: bool,
        pointer_chunk: int, value_chunk: int, batch_bytes: int | None, ctx: GangContext) -> dict:
    """``units``: the (r0, r1) row ranges this worker computes; ``all_units``/``owners``: every
    row range of C in order, and the gang rank computing it."""
    xp, control = ctx.xp, ctx.control
    me = control.rank
    with ctx.timed_host("read-b"):
        b_full = sparse.read_csr(b_path) if replicate_b else None
    results = {}
    for r0, r1 in units:
        with ctx.timed_host("read-a"):
            a = sparse.read_csr(a_path, rows=(r0, r1))
            b = b_full
            if b is None:
                needed = np.unique(a.indices)
                b = sparse.read_rows(b_path, needed)
                a = spgemm_remap(a, needed)
        with ctx.timed_host("compute"):  # includes bringing C back to the host, in batches
            c = spgemm.multiply_to_host(xp, spgemm.Csr.from_scipy(a).on(xp, dtype),
                                        spgemm.Csr.from_scipy(b).on(xp, dtype), batch_bytes)
        results[(r0, r1)] = spgemm.Csr(c.indptr, c.indices, np.asarray(c.data, dtype), c.shape)
        ctx.advance(1)
    ctx.finish()

    # 1. everyone learns every range's length
    counts = {unit: int(c.indptr[-1]) for unit, c in results.items()}
    everything = _allgather(control, counts, "counts")
    lengths = [everything[owners[u]][tuple(unit)] for u, unit in enumerate(all_units)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])

    # 2. rank 0 makes the arrays
    if me == 0:
        sparse.create_arrays(out_path, total, pointer_chunk, value_chunk)
    control.barrier("arrays")

    # 3. write: row offsets, whole chunks, pieces to their chunk's first owner
    first_owner = _chunk_first_owner(offsets, owners, value_chunk, total)
    outgoing: dict[int, list] = {rank: [] for rank in range(control.size)}
    mine_partial: list = []
    whole_chunks: list = []
    with ctx.timed_host("write"):
        for u, unit in enumerate(all_units):
            if owners[u] != me:
                continue
            c = results.pop(tuple(unit))
            base = int(offsets[u])
            last = u == len(all_units) - 1
            ptr = c.indptr[:-1] + base if not last else c.indptr + base
            sparse.write_pointers(out_path, unit[0], ptr)
            for lo, hi, whole in sparse.pieces(base, base + len(c.indices), value_chunk, total):
                idx, val = c.indices[lo - base:hi - base], c.data[lo - base:hi - base]
                if whole:
                    whole_chunks.append((lo, idx, val))
                else:
                    owner = first_owner[lo // value_chunk]
                    (mine_partial if owner == me else outgoing[owner]).append((lo, idx, val))
        # whole chunks are independent: encode and write them on the I/O threads
        list(chunkio.pool().map(lambda piece: sparse.write_entries(out_path, *piece), whole_chunks))
    with ctx.timed_host("exchange"):
        received = _alltoall(control, outgoing, "pieces")
    with ctx.timed_host("write"):
        _write_shared_chunks(out_path, mine_partial + [p for ps in received for p in ps],
                             value_chunk, total, dtype)
    return {"ranges": len(units), "entries": int(sum(lengths[u] for u in range(len(all_units))
                                                   if owners[u] == me))}


def spgemm_remap(a, needed):
    """A's column indices renumbered to positions in ``needed`` (the B rows read)."""
    import scipy.sparse as sp

    return sp.csr_array((a.data, np.searchsorted(needed, a.indices).astype(np.int32), a.indptr),
                        shape=(a.shape[0], len(needed)))


def _chunk_first_owner(offsets, owners, chunk, total) -> dict:
    """Zarr value chunk -> the rank whose range holds the chunk's first entry."""
    out = {}
    for j in range(-(-total // chunk) if total else 0):
        u = int(np.searchsorted(offsets, j * chunk, side="right")) - 1
        while offsets[u + 1] == offsets[u]:  # skip empty ranges
            u += 1
        out[j] = owners[u]
    return out


def _write_shared_chunks(path, parts, chunk, total, dtype) -> None:
    by_chunk: dict[int, list] = {}
    for lo, idx, val in parts:
        by_chunk.setdefault(lo // chunk, []).append((lo, idx, val))
    for j, items in sorted(by_chunk.items()):
        start, stop = j * chunk, min((j + 1) * chunk, total)
        idx_dtype = items[0][1].dtype
        indices = np.empty(stop - start, idx_dtype)
        values = np.empty(stop - start, dtype)
        covered = 0
        for lo, idx, val in items:
            indices[lo - start:lo - start + len(idx)] = idx
            values[lo - start:lo - start + len(val)] = val
            covered += len(idx)
        if covered != stop - start:
            raise RuntimeError(f"value chunk {j}: {covered} of {stop - start} entries arrived")
        sparse.write_entries(path, start, indices, values)


def _allgather(control, value, tag) -> list:
    peers = [p for p in range(control.size) if p != control.rank]
    got = control.start([(value, p, tag) for p in peers],
                        [(p, tag, None, None) for p in peers]).wait()
    out = [None] * control.size
    out[control.rank] = value
    for p, v in zip(peers, got):
        out[p] = v
    return out


def _alltoall(control, outgoing: dict, tag) -> list:
    peers = [p for p in range(control.size) if p != control.rank]
    return control.start([(outgoing[p], p, tag) for p in peers],
                         [(p, tag, None, None) for p in peers]).wait()
