"""GEMM benchmark: mx side by side with its peers, in one run, with ratios.

For each shape and precision it measures
  cublas        one GPU, cublasGemmEx on resident operands (the per-GPU ceiling)
  mx-compute    mx's Cannon/SUMMA gang on G GPU actors, blocks already on the GPUs
                (the span of the rounds, shifts included, slowest actor)
  mx-e2e        an mx job from Zarr to Zarr (read, transfer, rounds, write, commit), with the
                actors already started
  dask-compute  dask.array with CuPy chunks on the same GPUs, operands persisted on them
  dask-e2e      dask.array with CuPy chunks, Zarr to Zarr
On one GPU dask runs its threaded scheduler. On G > 1 it runs dask.distributed with one
single-threaded worker process per GPU, each seeing only its GPU: what dask-cuda's
LocalCUDACluster sets up (chunks move between workers over TCP, its default protocol).
and with --cpu the same job on CPU actors against dask.array (NumPy chunks) and NumPy.

Usage (GPU machine):  python bench/gemm.py --gpus 1,2,4 --sizes 16384,32768 --out $OUT/gemm.json
Prints a table last; writes every figure and the per-actor timeline of each mx run as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dask.task_spec import Task  # noqa: E402

import mx  # noqa: E402
from mx.kernels import gemm as kgemm  # noqa: E402
from mx.kernels import precision as prec  # noqa: E402
from mx.storage import dense  # noqa: E402
from mx.tasks import gemm as tgemm  # noqa: E402


def tflops(m, k, n, seconds):
    return 2.0 * m * k * n / seconds / 1e12 if seconds else float("nan")


# ---------------------------------------------------------------------------------- cuBLAS
def cublas_time(m, k, n, precision, repeat=5):
    import cupy

    rng = cupy.random.default_rng(0)
    a = prec.to_device(cupy, rng.random((m, k), dtype=np.float32), precision)
    b = prec.to_device(cupy, rng.random((k, n), dtype=np.float32), precision)
    c = cupy.empty((m, n), dtype=prec.output_dtype(precision))
    times = []
    for it in range(repeat + 2):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        kgemm.accumulate(cupy, c, a, b, precision, beta=0.0)
        end.record()
        end.synchronize()
        if it >= 2:
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b, c
    cupy.get_default_memory_pool().free_all_blocks()
    return statistics.median(times)


# ------------------------------------------------------------------------- mx compute-only
def device_block(shape, seed, gpu):
    """A random float32 block made where it will be used (on the GPU for GPU actors)."""
    if gpu:
        import cupy

        return cupy.random.default_rng(seed).random(shape, dtype=np.float32)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def sink(block):
    return tuple(np.shape(block))


def compute_graph(m, k, n, precision, workers, gpu, algorithm="auto", verify="none"):
    """mx's gemm graph with reads replaced by on-device generation and writes by a sink."""
    info = {"a": dense.DenseInfo("", (m, k), "<f4", (m, k)), "b": dense.DenseInfo("", (k, n), "<f4", (k, n))}
    params = tgemm.GemmParams(algorithm=algorithm, precision=precision, verify=verify)
    plan = tgemm.plan(info, params, workers, "bench", gpus=workers if gpu else 0)
    graph = tgemm.build(plan, {"a": "", "b": ""}, "", f"bench-{m}-{k}-{n}-{precision}")
    for seed, (key, task) in enumerate(list(graph.dsk.items())):
        label = graph.labels[key]
        if label == "read":
            rows, cols = task.args[1], task.args[2]
            graph.dsk[key] = Task(key, device_block, (rows[1] - rows[0], cols[1] - cols[0]), seed, gpu)
        elif label == "write":
            graph.dsk[key] = Task(key, sink, task.args[3])
    return plan, graph


def mx_compute(backend, m, k, n, precision, workers, gpu, repeat=2, verify="none",
               phases=("rounds",)):
    """Median over runs (after one warm-up) of the slowest actor's time in ``phases``: the
    rounds (blocks resident), or with "to-device" too, the blocks' conversion (where ABFT
    takes a first product's checksums)."""
    spans, plan, infos = [], None, None
    for it in range(repeat + 1):
        plan, graph = compute_graph(m, k, n, precision, workers, gpu, verify=verify)
        infos = backend.run(graph)
        span = max(sum(i["stats"].get(p, 0.0) for p in phases)
                   for i in infos if i["label"] == "compute")
        if it:
            spans.append(span)
    return statistics.median(spans), plan, infos


# ------------------------------------------------------------------------------- mx e2e
def mx_e2e(folder, a_path, b_path, precision, workers, gpus, backend_name="ray", memory=None):
    """An mx job of two identical steps (the first warms the page cache and the kernel caches);
    the second is timed, without the start of its workers.
    ``memory`` caps each worker's memory (forcing the out-of-core path when it is small)."""
    params = {"precision": precision, **({"memory": memory} if memory else {})}
    steps = [{"id": f"c{t}", "op": "gemm", "inputs": {"a": a_path, "b": b_path},
              "output": os.path.join(folder, f"C{t}.zarr"), "params": params}
             for t in range(2)]
    job = {"name": "bench", "backend": backend_name,
           "resources": {"workers": workers, "gpus": gpus}, "steps": steps}
    job_id = mx.submit(job, base=folder)
    rec = mx.status(job_id)
    timed = rec["steps"][1]
    for t in range(2):
        shutil.rmtree(os.path.join(folder, f"C{t}.zarr"), ignore_errors=True)
    # each step starts its own workers (named for it in the dashboard); that start is timed
    # apart, as phase start-workers, and left out here like dask's own start-up
    return timed["seconds"] - timed["phases"].get("start-workers", 0.0), timed, job_id


# ---------------------------------------------------------------------------------- dask
def dask_gpu_cluster(gpus: int):
    """A dask.distributed client over one worker process per GPU (one thread each), every
    worker seeing only its own GPU."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {f"gpu{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "memory_limit": 0, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
        for i in range(gpus)}
    cluster = SpecCluster(workers=workers, silence_logs=logging.ERROR,
                          scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})
    return Client(cluster)


def _sync_gpus(client):
    """Wait for every GPU's queued work (on one GPU without a client: this process's)."""
    import cupy

    if client is None:
        cupy.cuda.runtime.deviceSynchronize()
    else:
        client.run(lambda: __import__("cupy").cuda.runtime.deviceSynchronize())


def dask_run(a_path, b_path, out_path, gpu, compute_only, gpus=1):
    """Seconds for dask.array's A @ B: compute only (operands persisted, the product persisted)
    or Zarr to Zarr. ``gpus`` > 1: on a dask.distributed cluster, a worker per GPU."""
    import dask
    import dask.array as da

    client = dask_gpu_cluster(gpus) if gpu and gpus > 1 else None
    if client is not None:
        import distributed
    try:
        a, b = da.from_zarr(a_path), da.from_zarr(b_path)
        if gpu:
            import cupy

            a, b = a.map_blocks(cupy.asarray), b.map_blocks(cupy.asarray)
        scheduler = {"scheduler": "threads"} if client is None else {}
        with dask.config.set(**scheduler):
            if compute_only:
                a, b = a.persist(), b.persist()
                if client is not None:
                    distributed.wait([a, b])
                if gpu:
                    _sync_gpus(client)
                t0 = time.perf_counter()
                c = (a @ b).persist()
                if client is not None:
                    distributed.wait(c)
                if gpu:
                    _sync_gpus(client)
                seconds = time.perf_counter() - t0
                del c
                return seconds
            t0 = time.perf_counter()
            c = a @ b
            if gpu:
                c = c.map_blocks(cupy.asnumpy)
            # the codec mx writes with, so that the ratio compares the engines, not the codecs
            c.to_zarr(out_path, overwrite=True, compressors=dense.COMPRESSORS)
            seconds = time.perf_counter() - t0
        shutil.rmtree(out_path, ignore_errors=True)
        return seconds
    finally:
        if client is not None:
            cluster = client.cluster
            client.close()
            cluster.close()


def numpy_e2e(a_path, b_path, out_path):
    t0 = time.perf_counter()
    import zarr

    a = np.asarray(zarr.open_array(a_path, mode="r")[...])
    b = np.asarray(zarr.open_array(b_path, mode="r")[...])
    c = a @ b
    out = zarr.create_array(store=out_path, shape=c.shape, chunks=(2048, 2048), dtype=c.dtype,
                            overwrite=True, compressors=dense.COMPRESSORS)
    out[...] = c
    seconds = time.perf_counter() - t0
    shutil.rmtree(out_path, ignore_errors=True)
    return seconds


# ------------------------------------------------------------------------------- driver
def make_inputs(folder, m, k, n, dtype):
    from mx.storage import generate

    a, b = os.path.join(folder, f"A-{m}x{k}-{dtype}.zarr"), os.path.join(folder, f"B-{k}x{n}-{dtype}.zarr")
    for path, shape, seed in ((a, (m, k), 1), (b, (k, n), 2)):
        if not os.path.exists(path):
            generate.random_dense(path, shape, (min(shape[0], 2048), min(shape[1], 2048)),
                                  seed=seed, dtype=dtype)
    return a, b


def timeline(infos):
    """Per-actor phases of one run: what each worker spent in compute, waiting, I/O."""
    rows = {}
    t0 = min(i["start"] for i in infos)
    for i in infos:
        row = rows.setdefault(i["worker"], {"tasks": []})
        row["tasks"].append({"label": i["label"], "start": round(i["start"] - t0, 4),
                             "seconds": round(i["seconds"], 4)})
        for phase, s in i.get("stats", {}).items():
            row[phase] = round(row.get(phase, 0.0) + s, 4)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="1", help="GPU counts, e.g. 1,2,4 (0: skip GPU runs)")
    ap.add_argument("--sizes", default="16384", help="square sizes n")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rect", action="store_true", help="also 65536×8192 · 8192×65536")
    ap.add_argument("--e2e-sizes", default="16384", help="sizes also run Zarr to Zarr")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--abft", action="store_true", help="also time compute-only with verify: abft")
    ap.add_argument("--backends", default="ray", help="e2e runs on these backends, e.g. ray,mpi")
    ap.add_argument("--ooc-memory", default="", help="e.g. 2GiB: also run e2e sizes out of core "
                    "with this memory cap per GPU, beside the in-memory run")
    ap.add_argument("--cpu", default="", help="CPU runs: sizes for mx vs dask vs NumPy on CPU actors")
    ap.add_argument("--cpu-workers", type=int, default=4)
    ap.add_argument("--data", default=None, help="folder for inputs (default: a temp folder)")
    ap.add_argument("--out", default="gemm-bench.json")
    args = ap.parse_args(argv)

    import ray

    folder = args.data or tempfile.mkdtemp(prefix="mx-bench-")
    os.makedirs(folder, exist_ok=True)
    os.environ.setdefault("MX_HOME", os.path.join(folder, "mx-home"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    results = []
    device = "cpu"
    gpu_counts = [int(g) for g in args.gpus.split(",") if int(g) > 0]
    shapes = [(n, n, n) for n in map(int, args.sizes.split(","))]
    if args.rect:
        shapes.append((65536, 8192, 65536))
    e2e_sizes = {int(n) for n in args.e2e_sizes.split(",") if n}
    precisions = args.precisions.split(",")

    if gpu_counts:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        device = f"{cupy.cuda.runtime.getDeviceCount()}× {props['name'].decode()}"
        ceiling = {}
        for (m, k, n) in shapes:
            for p in precisions:
                ceiling[(m, k, n, p)] = cublas_time(m, k, n, p)
                print(f"cublas {m}x{k}x{n} {p}: {tflops(m, k, n, ceiling[(m, k, n, p)]):.1f} TFLOP/s", flush=True)
        dask_cache = {}
        from mx.cluster.ray_backend import RayBackend

        for g in gpu_counts:
            backend = RayBackend(g, g, job_id=f"bench-g{g}")
            backend.start(lambda line: None)
            try:
                for (m, k, n) in shapes:
                    for p in precisions:
                        span, plan, infos = mx_compute(backend, m, k, n, p, g, gpu=True)
                        cub = ceiling[(m, k, n, p)]
                        row = {"device": device, "gpus": g, "shape": [m, k, n], "precision": p,
                               "algorithm": plan.algorithm, "grid": plan.grid,
                               "plan": plan.describe(),
                               "cublas_s": cub, "cublas_tflops": tflops(m, k, n, cub),
                               "mx_compute_s": span, "mx_compute_tflops": tflops(m, k, n, span),
                               "efficiency": cub / (g * span),
                               "timeline": timeline(infos)}
                        if args.abft:  # with the conversion: ABFT takes round 0's checks there
                            both = ("rounds", "to-device")
                            plain, _, _ = mx_compute(backend, m, k, n, p, g, gpu=True, phases=both)
                            abft_span, _, _ = mx_compute(backend, m, k, n, p, g, gpu=True,
                                                         verify="abft", phases=both)
                            row.update(mx_plain_converted_s=plain, mx_abft_s=abft_span,
                                       abft_overhead=abft_span / plain - 1)
                        results.append(row)
                        print(f"mx compute g={g} {m}x{k}x{n} {p}: {row['mx_compute_tflops']:.1f} TFLOP/s "
                              f"eff {row['efficiency']:.2f}"
                              + (f" abft +{row['abft_overhead']:.1%}" if args.abft else ""), flush=True)
            finally:
                backend.stop()
            for (m, k, n) in shapes:
                if m != n or n not in e2e_sizes:
                    continue
                for p in precisions:
                    a, b = make_inputs(folder, m, k, n, "float32")
                    seconds, step, job_id = mx_e2e(folder, a, b, p, g, g)
                    row = next(r for r in results if r["gpus"] == g and r["shape"] == [m, k, n]
                               and r["precision"] == p)
                    row.update(mx_e2e_s=seconds, mx_e2e_phases=step.get("phases"), mx_e2e_job=job_id)
                    for other in [x for x in args.backends.split(",") if x not in ("", "ray")]:
                        s2, step2, job2 = mx_e2e(folder, a, b, p, g, g, backend_name=other)
                        log_lines = mx.logs(job2).splitlines()
                        row.update({f"{other}_e2e_s": s2, f"{other}_e2e_phases": step2.get("phases"),
                                    f"{other}_transport": next((ln.split("gang transport: ")[1] for ln in log_lines
                                                                if "gang transport: " in ln), "?")})
                        print(f"e2e g={g} {m} {p} {other}: {s2:.2f} s (ray {seconds:.2f} s), rounds "
                              f"{step2['phases'].get('gang:rounds')} vs {step['phases'].get('gang:rounds')}; "
                              f"{row[f'{other}_transport']}", flush=True)
                    if not args.no_dask and p in ("fp32", "fp64"):
                        if (m, p, g) not in dask_cache:
                            dask_cache[(m, p, g)] = (
                                dask_run(a, b, os.path.join(folder, "Cd.zarr"), True, False, g),
                                dask_run(a, b, None, True, True, g))
                        row["dask_e2e_s"], row["dask_compute_s"] = dask_cache[(m, p, g)]
                        row["dask_compute_tflops"] = tflops(m, k, n, row["dask_compute_s"])
                    if args.ooc_memory:
                        ooc, ooc_step, _ = mx_e2e(folder, a, b, p, g, g, memory=args.ooc_memory)
                        row.update(mx_ooc_s=ooc, mx_ooc_phases=ooc_step.get("phases"),
                                   ooc_memory=args.ooc_memory)
                    print(f"e2e g={g} {m} {p}: mx {seconds:.2f} s"
                          + (f", out of core {row['mx_ooc_s']:.2f} s" if "mx_ooc_s" in row else "")
                          + (f", dask {row['dask_e2e_s']:.2f} s" if "dask_e2e_s" in row else ""), flush=True)

    for n in [int(x) for x in args.cpu.split(",") if x]:
        a, b = make_inputs(folder, n, n, n, "float64")
        seconds, step, job_id = mx_e2e(folder, a, b, "fp64", args.cpu_workers, 0)
        row = {"device": f"cpu ({os.cpu_count()} cores)", "gpus": 0, "workers": args.cpu_workers,
               "shape": [n, n, n], "precision": "fp64", "mx_e2e_s": seconds,
               "mx_e2e_phases": step.get("phases"),
               "dask_e2e_s": None if args.no_dask else dask_run(a, b, os.path.join(folder, "Cd.zarr"), False, False),
               "numpy_e2e_s": numpy_e2e(a, b, os.path.join(folder, "Cn.zarr"))}
        results.append(row)

    ray.shutdown()
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device, "argv": sys.argv[1:]}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)

    print(f"\nGEMM benchmark, {device}, {meta['date']} (TFLOP/s; ratios: higher is better for mx)")
    print(f"{'gpus':>4} {'shape':>20} {'prec':>5} {'alg':>7} {'cuBLAS':>7} {'mx-comp':>8} {'eff':>5} "
          f"{'dask-comp':>9} {'mx-e2e s':>8} {'dask-e2e s':>10} {'e2e ×':>6} {'ooc s':>6}")
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        if r["gpus"] == 0:
            ratio = (r["dask_e2e_s"] / r["mx_e2e_s"]) if r.get("dask_e2e_s") else float("nan")
            print(f"{'cpu':>4} {shape:>20} {r['precision']:>5} {'':>7} {'':>7} {'':>8} {'':>5} {'':>9} "
                  f"{r['mx_e2e_s']:8.2f} {r['dask_e2e_s'] or float('nan'):10.2f} {ratio:6.2f}  "
                  f"(NumPy {r['numpy_e2e_s']:.2f} s, {r['workers']} workers)")
            continue
        e2e = r.get("mx_e2e_s")
        de2e = r.get("dask_e2e_s")
        print(f"{r['gpus']:>4} {shape:>20} {r['precision']:>5} {r['algorithm']:>7} "
              f"{r['cublas_tflops']:7.1f} {r['mx_compute_tflops']:8.1f} {r['efficiency']:5.2f} "
              f"{r.get('dask_compute_tflops', float('nan')):9.1f} "
              f"{e2e if e2e else float('nan'):8.2f} {de2e if de2e else float('nan'):10.2f} "
              f"{(de2e / e2e) if (e2e and de2e) else float('nan'):6.2f} "
              f"{r.get('mx_ooc_s', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
