"""SpGEMM benchmark: C = A·A with mx's hash kernel beside cuSPARSE and SciPy, in one run.

For each matrix (R-MAT at several scales, and look-alikes of the classic SpGEMM test set:
FEM-like banded, web graph, road network) it measures, on one GPU with A resident:
  mx        mx's two-pass hash kernel (symbolic + numeric, output on the device)
  cusparse  cupyx's csr @ csr (cuSPARSE SpGEMM, its default algorithm: the only one CuPy exposes)
  scipy     SciPy on the CPU (small and medium sizes)
GFLOP/s counts 2 × partial products / time. Peak GPU memory is tracked through CuPy's
allocator. Each result is checked: against SciPy where it ran, otherwise mx against cuSPARSE, or
on a sample of rows against SciPy when cuSPARSE fails or comes back empty.

Where C would take more than --batch-gib of GPU memory (default: 40% of the GPU, as the op
plans it), mx makes it in row batches and frees each batch once made, where a job would write
it out: the time is the kernels' and the check runs on a sample of rows.

With --scaling 1,2 (and --scaling-matrices) it also deals A's rows over 1..G GPUs of this
process, each GPU holding B = A and making its part in batches, and prints the speed-up over
one GPU. With --e2e it runs the spgemm op from Zarr to Zarr on 1..G GPU actors.

Usage: python bench/spgemm.py --rmat 14,15,16,17,18 --lookalikes --out $OUT/spgemm.json
       python bench/spgemm.py --rmat 19,20 --scaling 1,2 --scaling-matrices rmat-20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mx  # noqa: E402
from mx.kernels import spgemm  # noqa: E402
from mx.storage import generate, sparse  # noqa: E402


class PeakPool:
    """A CuPy memory pool that remembers its peak use."""

    def __init__(self):
        import cupy

        self.pool = cupy.cuda.MemoryPool()
        self.peak = 0

    def malloc(self, size):
        ptr = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return ptr


MIN_SECONDS = 0.5


def timed_gpu(fn, repeat=3):
    """(median seconds, peak bytes, last result) of fn() on the GPU, after one warm-up. The timed
    runs share one warm pool (a cold pool would time cudaMalloc, which hits a kernel that
    allocates often harder than one that allocates once). The peak comes from one more run,
    untimed, through a pool that tracks it: its Python hook on every allocation would tax the
    side that allocates more often."""
    import cupy

    times, pool = [], cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        it = 0
        # short runs are repeated for at least MIN_SECONDS, so the median rides out clock ramps
        # and host jitter
        while it <= repeat or (sum(times) < MIN_SECONDS and it <= 100):
            cupy.cuda.runtime.deviceSynchronize()
            t0 = time.perf_counter()
            fn()
            cupy.cuda.runtime.deviceSynchronize()
            if it:
                times.append(time.perf_counter() - t0)
            it += 1
    pool.free_all_blocks()
    tracked = PeakPool()
    with cupy.cuda.using_allocator(tracked.malloc):
        result = fn()
        cupy.cuda.runtime.deviceSynchronize()
    return statistics.median(times), tracked.peak, result


def mx_kernel(a_dev):
    return spgemm._GpuProduct(a_dev, a_dev).numeric()


def mx_batched(a_dev, b_dev, limit: int, keep=None):
    """C = A·B in row batches of at most ``limit`` entries, each freed once made (a job writes
    it out). Returns C's entry count, and with ``keep`` (sorted row numbers) also those rows of
    C as a SciPy matrix, for the check."""
    product = spgemm._GpuProduct(a_dev, b_dev)
    kept = []
    for lo, hi in product.batches(limit):
        c = product.numeric(lo, hi)
        if keep is not None:
            ptr = c.indptr.get()
            for r in keep[(keep >= lo) & (keep < hi)] - lo:
                kept.append(sp.csr_array((c.data[ptr[r]:ptr[r + 1]].get(),
                                          c.indices[ptr[r]:ptr[r + 1]].get(),
                                          [0, int(ptr[r + 1] - ptr[r])]), shape=(1, c.shape[1])))
        del c
    entries = int(product.cptr[-1])
    return entries if keep is None else (entries, sp.vstack(kept, format="csr"))


def batch_limit(args, value_bytes: int) -> int:
    """Entries of C that one batch may hold."""
    import cupy

    budget = args.batch_gib * 2**30 if args.batch_gib else 0.4 * cupy.cuda.runtime.memGetInfo()[1]
    return max(1, int(budget // (4 + value_bytes)))


def sample_rows(a) -> np.ndarray:
    """The rows checked against SciPy when a full reference is too costly: random ones, and
    the heaviest (R-MAT's row 0 is its hub)."""
    m = a.shape[0]
    sample = np.random.default_rng(0).choice(m, size=min(200, m), replace=False)
    heavy = np.argsort(np.diff(a.indptr))[-5:]
    return np.unique(np.concatenate([sample, heavy]))


def cusparse(a_cupyx):
    return a_cupyx @ a_cupyx


def matrices(args, folder):
    out = []
    for scale in [int(s) for s in args.rmat.split(",") if s]:
        path = os.path.join(folder, f"rmat{scale}.zarr")
        if not os.path.exists(path):
            generate.rmat(path, scale, edge_factor=16, seed=1, dtype=args.dtype)
        out.append((f"rmat-{scale}", path))
    if args.lookalikes:
        specs = [("banded-fem", lambda p: generate.banded(p, 200_000, 40, density=0.5, seed=2, dtype=args.dtype)),
                 ("web", lambda p: generate.web(p, 500_000, avg_degree=8, seed=3, dtype=args.dtype)),
                 ("road", lambda p: generate.road(p, 1000, seed=4, dtype=args.dtype))]
        for name, make in specs:
            path = os.path.join(folder, f"{name}.zarr")
            if not os.path.exists(path):
                make(path)
            out.append((name, path))
    return out


def compare(got_ptr, got_idx, got_val, want: sp.csr_array) -> float | None:
    """Relative error of values when the patterns agree exactly, else None."""
    want = sp.csr_array(want)
    want.sort_indices()
    if len(got_idx) != want.nnz or not np.array_equal(got_ptr, want.indptr) \
            or not np.array_equal(got_idx, want.indices):
        return None
    denom = np.linalg.norm(want.data) or 1.0
    return float(np.linalg.norm(got_val.astype(np.float64) - want.data) / denom)


def run_one(name, path, args):
    import cupy
    import cupyx.scipy.sparse as csp

    a = sparse.read_csr(path)
    a.sort_indices()
    host = spgemm.Csr.from_scipy(a)
    products = int(spgemm.products_per_row(np, host, host).sum())
    flops = 2 * products
    row = {"matrix": name, "rows": a.shape[0], "nnz": int(a.nnz), "products": products}
    a_dev = host.on(cupy)
    limit = batch_limit(args, a.dtype.itemsize)
    product = spgemm._GpuProduct(a_dev, a_dev)  # the symbolic pass, once, untimed
    entries = int(product.cptr[-1])
    batched = entries > limit
    row["batches"] = len(product.batches(limit))
    del product
    mx_out = sampled = None
    if batched:
        seconds, peak, _ = timed_gpu(lambda: mx_batched(a_dev, a_dev, limit))
        sample = sample_rows(a)
        _, sampled = mx_batched(a_dev, a_dev, limit, keep=sample)
    else:
        seconds, peak, c = timed_gpu(lambda: mx_kernel(a_dev))
        mx_out = (c.indptr.get(), c.indices.get(), c.data.get())
        del c
    row.update(mx_s=seconds, mx_gflops=flops / seconds / 1e9, mx_peak_gib=peak / 2**30,
               out_nnz=entries)
    if args.profile and not batched:  # one more run, each kernel launch timed on the GPU
        t0 = time.perf_counter()
        product = spgemm._GpuProduct(a_dev, a_dev, profile=True)
        product.numeric()
        cupy.cuda.runtime.deviceSynchronize()
        row["mx_profile"] = product.profile()
        row["mx_profile_wall_ms"] = (time.perf_counter() - t0) * 1e3
        del product
    cus = None
    scale = int(name.split("-")[1]) if name.startswith("rmat-") else 0
    try:
        if scale > args.skip_cusparse_above:
            raise RuntimeError(f"not run above R-MAT {args.skip_cusparse_above} (--skip-cusparse-above)")
        a_cx = csp.csr_matrix((a_dev.data, a_dev.indices, a_dev.indptr.astype(np.int32)), shape=a.shape)
        seconds, peak, c = timed_gpu(lambda: cusparse(a_cx))
        c.sort_indices()
        cus = (c.indptr.get().astype(np.int64), c.indices.get(), c.data.get())
        row.update(cusparse_s=seconds, cusparse_gflops=flops / seconds / 1e9,
                   cusparse_peak_gib=peak / 2**30, cusparse_nnz=int(c.nnz))
        del c
    except Exception as exc:  # cuSPARSE out of memory or int32 overflow: recorded, not hidden
        row["cusparse_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    cupy.get_default_memory_pool().free_all_blocks()

    want = None
    if products <= args.scipy_max_products and not batched:
        t0 = time.perf_counter()
        want = a @ a
        row.update(scipy_s=time.perf_counter() - t0)
        row["scipy_gflops"] = flops / row["scipy_s"] / 1e9
    # correctness (values positive: no cancellation, so SciPy's pattern is the structural one)
    if want is not None:
        row["mx_error"] = compare(*mx_out, want)
        row["cusparse_error_vs_scipy"] = compare(*cus, want) if cus else None
    elif cus is not None and row.get("cusparse_nnz") and not batched:
        row["mx_error_vs_cusparse"] = compare(*mx_out, sp.csr_array((cus[2], cus[1], cus[0]), shape=a.shape))
    else:  # a sample of rows against SciPy
        if sampled is None:
            sample = sample_rows(a)
            sampled = rows_of(*mx_out, sample, a.shape[1])
        row["mx_error_sampled"] = compare(sampled.indptr, sampled.indices, sampled.data, a[sample] @ a)
        if cus is not None and row.get("cusparse_nnz"):
            row["mx_nnz_matches_cusparse"] = row["cusparse_nnz"] == entries
    row["mx_correct"] = all(row.get(k) is not None and row[k] < 1e-4 for k in
                            ("mx_error", "mx_error_vs_cusparse", "mx_error_sampled") if k in row)
    if cus is not None:
        row["cusparse_correct"] = row.get("cusparse_nnz", 0) == row["out_nnz"] and (
            row.get("cusparse_error_vs_scipy") is None or row["cusparse_error_vs_scipy"] < 1e-4)
    return row


def rows_of(ptr, idx, val, rows, n) -> sp.csr_array:
    """Some rows of a CSR matrix held as arrays (no SciPy matrix of the whole)."""
    lens = ptr[rows + 1] - ptr[rows]
    pick = np.concatenate([np.arange(ptr[r], ptr[r + 1]) for r in rows]) if len(rows) else []
    return sp.csr_array((val[pick], idx[pick], np.concatenate([[0], np.cumsum(lens)])),
                        shape=(len(rows), n))


def deal_rows(a, host, gpus: int, seed: int = 0) -> list[sp.csr_array]:
    """A's rows in a random order, cut into ``gpus`` parts of about equal partial products."""
    perm = np.random.default_rng(seed).permutation(a.shape[0])
    work = np.cumsum(spgemm.products_per_row(np, host, host)[perm])
    cuts = np.searchsorted(work, work[-1] * np.arange(1, gpus) / gpus)
    return [a[part] for part in np.split(perm, cuts)]


def run_scaling(name, path, args) -> list[dict]:
    """C = A·A with A's rows dealt over 1..G GPUs (threads of this process), B = A resident on
    each, every GPU making its part in batches: the median wall time of 3 after a warm-up."""
    import threading

    import cupy

    a = sparse.read_csr(path)
    a.sort_indices()
    host = spgemm.Csr.from_scipy(a)
    flops = 2 * int(spgemm.products_per_row(np, host, host).sum())
    out = []
    for gpus in [int(g) for g in args.scaling.split(",")]:
        if gpus > cupy.cuda.runtime.getDeviceCount():
            print(f"scaling {name}: {gpus} GPUs asked, "
                  f"{cupy.cuda.runtime.getDeviceCount()} present: skipped", flush=True)
            continue
        resident = []
        for g, part in enumerate(deal_rows(a, host, gpus)):
            with cupy.cuda.Device(g):
                resident.append((spgemm.Csr.from_scipy(part).on(cupy), host.on(cupy)))
                limit = batch_limit(args, a.dtype.itemsize)
        entries = [0] * gpus
        errors = []

        def work(g):
            try:
                with cupy.cuda.Device(g):
                    entries[g] = mx_batched(*resident[g], limit)
                    cupy.cuda.runtime.deviceSynchronize()
            except Exception as exc:  # reported after the join
                errors.append(exc)

        times = []
        for it in range(4):
            threads = [threading.Thread(target=work, args=(g,)) for g in range(gpus)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            if it:
                times.append(time.perf_counter() - t0)
            for g in range(gpus):
                with cupy.cuda.Device(g):
                    cupy.get_default_memory_pool().free_all_blocks()
        seconds = statistics.median(times)
        out.append({"matrix": name, "gpus": gpus, "seconds": seconds, "gflops": flops / seconds / 1e9,
                    "out_nnz": int(sum(entries))})
        print(f"scaling {name} gpus={gpus}: {seconds:.3f} s, {flops / seconds / 1e9:.1f} GFLOP/s, "
              f"{sum(entries)} entries", flush=True)
        resident.clear()
    return out


def run_e2e(name, path, gpus, folder):
    out = os.path.join(folder, f"C-{name}-{gpus}.zarr")
    job = {"name": f"spgemm-{name}", "resources": {"gpus": gpus},
           "steps": [{"id": f"c{t}", "op": "spgemm", "inputs": {"a": path, "b": path},
                      "output": f"{out}{t}", "params": {"permute": True}} for t in range(2)]}
    job_id = mx.submit(job, base=folder)
    step = mx.status(job_id)["steps"][1]
    import shutil
    for t in range(2):
        shutil.rmtree(f"{out}{t}", ignore_errors=True)
    return step["seconds"] - step["phases"].get("start-workers", 0.0), step.get("phases")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rmat", default="14,15,16")
    ap.add_argument("--lookalikes", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scipy-max-products", type=float, default=3e8)
    ap.add_argument("--e2e", default="", help="matrices to also run as an mx job, e.g. rmat-16")
    ap.add_argument("--gpus", default="1")
    ap.add_argument("--profile", action="store_true", help="also time mx's kernels one by one")
    ap.add_argument("--batch-gib", type=float, default=None,
                    help="most GiB of C on the GPU at once (default: 40%% of the GPU)")
    ap.add_argument("--skip-cusparse-above", type=int, default=19,
                    help="do not try cuSPARSE on R-MAT scales above this")
    ap.add_argument("--scaling", default="", help="GPU counts for the multi-GPU run, e.g. 1,2")
    ap.add_argument("--scaling-matrices", default="", help="matrices for --scaling, e.g. rmat-20")
    ap.add_argument("--kernel-matrices", default=None,
                    help="matrices for the one-GPU comparison (default: all)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="spgemm-bench.json")
    args = ap.parse_args(argv)
    import cupy

    folder = args.data or tempfile.mkdtemp(prefix="mx-spgemm-")
    os.makedirs(folder, exist_ok=True)
    os.environ.setdefault("MX_HOME", os.path.join(folder, "mx-home"))
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    mats = matrices(args, folder)
    for name, path in mats:
        if args.kernel_matrices is not None and name not in args.kernel_matrices.split(","):
            continue
        try:
            row = run_one(name, path, args)
        except Exception as exc:  # recorded and shown; the other matrices still run
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"matrix": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "mx_profile"}), flush=True)
        if "mx_profile" in row:
            spans = row["mx_profile"]
            print(f"  {name} kernels {sum(s['ms'] for s in spans):.2f} ms of "
                  f"{row['mx_profile_wall_ms']:.2f} ms: " +
                  "; ".join(f"{s['kernel']} ({s['rows']} rows) {s['ms']:.2f}" for s in spans),
                  flush=True)
    scaling = []
    for name, path in mats:
        if args.scaling and name in args.scaling_matrices.split(","):
            scaling += run_scaling(name, path, args)
    e2e = []
    if args.e2e:
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        for name, path in mats:
            if name in args.e2e.split(","):
                for g in [int(x) for x in args.gpus.split(",")]:
                    seconds, phases = run_e2e(name, path, g, folder)
                    e2e.append({"matrix": name, "gpus": g, "seconds": seconds, "phases": phases})
                    print(f"e2e {name} gpus={g}: {seconds:.2f} s {phases}", flush=True)
        ray.shutdown()
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device, "argv": sys.argv[1:]},
                   "kernel": rows, "scaling": scaling, "e2e": e2e}, f, indent=1, default=str)

    print(f"\nSpGEMM A·A, {device}, {args.dtype} (GFLOP/s = 2·products/s; peak GiB on the GPU)")
    print(f"{'matrix':>12} {'nnz':>10} {'out nnz':>12} {'mx':>7} {'cuSPARSE':>9} {'×':>5} "
          f"{'scipy':>6} {'mx GiB':>7} {'cuSP GiB':>8}  correct (mx / cuSPARSE)")
    for r in rows:
        if "error" in r:
            print(f"{r['matrix']:>12} failed: {r['error'][:150]}")
            continue
        cus = r.get("cusparse_gflops") if r.get("cusparse_correct") else None  # wrong: no rate
        print(f"{r['matrix']:>12} {r['nnz']:>10} {r['out_nnz']:>12} {r['mx_gflops']:7.1f} "
              f"{cus if cus else float('nan'):9.1f} {(r['mx_gflops'] / cus) if cus else float('nan'):5.2f} "
              f"{r.get('scipy_gflops', float('nan')):6.2f} {r['mx_peak_gib']:7.2f} "
              f"{r.get('cusparse_peak_gib', float('nan')):8.2f}  {r['mx_correct']} / "
              f"{r.get('cusparse_correct', r.get('cusparse_error', '-'))}"
              + (f"  ({r['batches']} batches)" if r.get("batches", 1) > 1 else ""))
    if scaling:
        print("\nC = A·A with A's rows dealt over GPUs (B = A on each, C made in batches)")
        print(f"{'matrix':>12} {'GPUs':>5} {'seconds':>8} {'GFLOP/s':>8} {'speed-up':>9}")
        one = {r["matrix"]: r["seconds"] for r in scaling if r["gpus"] == 1}
        for r in scaling:
            base = one.get(r["matrix"])
            print(f"{r['matrix']:>12} {r['gpus']:>5} {r['seconds']:8.3f} {r['gflops']:8.1f} "
                  f"{(base / r['seconds']) if base else float('nan'):9.2f}")


if __name__ == "__main__":
    main()
