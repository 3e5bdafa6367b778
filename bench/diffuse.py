"""Patch-parallel diffusion (the `diffuse` op) against its peers, in one run.

    python bench/diffuse.py --gpus 1,2 --sizes 1024,2048 --steps 50

1. **The single-GPU model.** DiT-XL/2 shapes (weights drawn from a seed), float16: one
   forward of mx's CuPy DiT against the same network in PyTorch with scaled-dot-product
   attention (``scripts/dit_torch.py``, same weights), at each size's token count.
2. **Parallel modes.** Whole ``diffuse`` jobs on the Ray backend, one actor per GPU: ``none``
   on one GPU, then naive / sync / distrifusion / pcpp on each GPU count. Reported: the
   steady-state seconds per step (median over the steps after the warmup, slowest worker),
   the speed-up over ``none``, bytes each worker sends per step and the memory it holds for
   stale keys/values (from the output's attributes).
3. **Fidelity** with dit-tiny, each mode against ``none`` from the same seed: PSNR, SSIM and
   the largest pixel error (images in [-1, 1]). LPIPS and FID need pretrained networks that
   cannot be downloaded on this machine, so they are not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))

import mx  # noqa: E402
from mx.kernels import dit  # noqa: E402
from mx.storage import image  # noqa: E402

MODES = ("none", "naive", "sync", "distrifusion", "pcpp")


# ------------------------------------------------------------------------ 1. one GPU
def xl_setup(size: int):
    """DiT-XL/2 shapes at one image size: (config, weights drawn from seed 0, token grid, a
    float16 latent), the same for mx and torch."""
    cfg, grid, x = xl_latent(size)
    return cfg, dit.random_weights(cfg, 0), grid, x


def xl_latent(size: int):
    """DiT-XL/2's (config, token grid, float16 latent from seed 0) at one image size."""
    cfg = dit.XL
    lat = size // cfg.vae_factor
    grid = (lat // cfg.patch, lat // cfg.patch)
    x = np.random.default_rng(0).standard_normal((cfg.in_channels, lat, lat)).astype(np.float16)
    return cfg, grid, x


def torch_forward(cfg, weights, x):
    """The same DiT in PyTorch (``scripts/dit_torch.py``), float16 on the GPU: a function
    running its forward on x at step 500, class 3."""
    import torch

    from dit_torch import DiT

    model = DiT(cfg.hidden, cfg.depth, cfg.heads, cfg.patch, cfg.in_channels, cfg.out_channels,
                classes=cfg.num_classes)
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()})
    model = model.cuda().half().eval()
    xt, t, y = (torch.from_numpy(x)[None].cuda(), torch.tensor([500], device="cuda"),
                torch.tensor([3], device="cuda"))

    def forward():
        with torch.no_grad():
            return model(xt, t, y)

    return forward


def model_forward(size: int, repeat: int) -> dict:
    import cupy
    import torch

    cfg, weights, grid, x = xl_setup(size)
    net = dit.load("builtin:dit-xl", cupy, np.float16, seed=0)
    xd = cupy.asarray(x)

    def mx_once():
        c = dit.condition(net, cupy, 500, 3)
        return dit.forward_band(net, cupy, xd, (0, grid[0]), grid, c, dit.own_kv)

    mx_s, mx_out = _time_cuda(mx_once, repeat, lambda: cupy.cuda.get_current_stream().synchronize())
    net = None  # free its memory before torch's model
    cupy.get_default_memory_pool().free_all_blocks()

    forward = torch_forward(cfg, weights, x)

    def torch_once():
        return forward()[0, :cfg.in_channels]

    torch_s, torch_out = _time_cuda(torch_once, repeat, torch.cuda.synchronize)
    ref = torch_out.float().cpu().numpy()
    # attention alone, the same shapes: mx's fused kernel against torch's SDPA
    from attention import compare  # bench/attention.py

    alone = compare(grid[0] * grid[1], cfg.heads, cfg.hidden // cfg.heads, repeat)
    att_mx, att_torch = alone["mx_ms"] / 1e3, alone["torch_ms"] / 1e3
    got = cupy.asnumpy(mx_out).astype(np.float32)
    forward = None
    torch.cuda.empty_cache()
    return {"size": size, "tokens": grid[0] * grid[1], "mx_s": mx_s, "torch_s": torch_s,
            "mx_over_torch": mx_s / torch_s, "attention_mx_s": att_mx,
            "attention_torch_s": att_torch,
            "rel_diff_to_torch": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def _time_cuda(fn, repeat, sync):
    out = fn()  # compile, allocate
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


# ------------------------------------------------------------------------ 2 and 3: jobs
def run_job(folder, model, size, mode, workers, gpus, steps, precision="auto", tag="") -> dict:
    output = os.path.join(folder, f"{tag}{mode}-{size}-{workers}w-{time.time_ns()}.zarr")
    params = {"height": size, "width": size, "steps": steps, "seed": 7, "precision": precision,
              "parallel": {"mode": mode, "warmup": 4}}
    if mode == "none":
        workers, gpus = 1, min(gpus, 1)
    job = {"name": f"diffuse-{mode}", "resources": {"workers": workers, "gpus": gpus},
           "steps": [{"id": "img", "op": "diffuse", "inputs": {"model": model},
                      "output": output, "params": params}]}
    rec = mx.status(mx.submit(job, base=folder))
    latent, attrs = image.read(output)
    info = attrs["diffuse"]
    return {"mode": mode, "size": size, "workers": workers, "job_s": rec["seconds"],
            "step_s": info["steady_step_seconds"], "bytes_per_step": info["bytes_per_step_per_worker"],
            "buffer_bytes": info["buffer_bytes_per_worker"], "latent": latent,
            "phases": rec["steps"][0].get("phases", {}),
            # on NCCL: per worker, how much exchange time the compute hid, and the timeline
            "overlap": info.get("overlap"), "timeline": info.get("timeline")}


def _overlap_note(r) -> str:
    """The steady steps' exchange seconds per worker and the share of them the compute hid."""
    if not r.get("overlap"):
        return ""
    parts = [f"{o['exchange_s'] * 1e3:.0f} ms exchanging, {o['stalled_s'] * 1e3:.0f} ms stalled"
             + (f" ({o['hidden']:.0%} hidden)" if o["hidden"] is not None else "")
             for o in r["overlap"]]
    return "; overlap: " + " | ".join(parts)


def ssim(a, b, data_range=2.0):
    """Mean structural similarity (Gaussian window σ = 1.5, as Wang et al.), over channels."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx_, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx_ ** 2, f(y * y) - my ** 2, f(x * y) - mx_ * my
        out.append(np.mean((2 * mx_ * my + c1) * (2 * sxy + c2) /
                           ((mx_ ** 2 + my ** 2 + c1) * (sxx + syy + c2))))
    return float(np.mean(out))


def fidelity(ref, got) -> dict:
    mse = float(np.mean((got.astype(np.float64) - ref) ** 2))
    return {"psnr_db": float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf"),
            "ssim": ssim(ref, got), "max_err": float(np.abs(got - ref).max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="1", help="GPU counts for the modes, e.g. 1,2,4")
    ap.add_argument("--sizes", default="1024,2048", help="image sizes (DiT-XL: latent = size/8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeat", type=int, default=5, help="timed forwards per model comparison")
    ap.add_argument("--no-model", action="store_true", help="skip the single-GPU model section")
    ap.add_argument("--tiny-size", type=int, default=48, help="dit-tiny image size for fidelity")
    ap.add_argument("--tiny-cpu-bands", type=int, default=4, help="also fidelity on CPU actors")
    ap.add_argument("--data", default="/tmp/mx-bench")
    ap.add_argument("--out", default="diffuse-bench.json")
    args = ap.parse_args(argv)
    os.makedirs(args.data, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    gpus = [int(g) for g in args.gpus.split(",") if g]
    modes = [m for m in args.modes.split(",") if m]
    report = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "model": [], "modes": [],
              "fidelity": []}
    device = "cpu"
    if max(gpus, default=0) > 0:
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    report["device"] = device

    if not args.no_model and max(gpus, default=0) > 0:
        for size in sizes:
            row = model_forward(size, args.repeat)
            report["model"].append(row)
            print(f"model {size}²: mx {row['mx_s'] * 1e3:.1f} ms, torch {row['torch_s'] * 1e3:.1f} ms, "
                  f"ratio {row['mx_over_torch']:.2f}, rel diff {row['rel_diff_to_torch']:.1e}; "
                  f"one attention {row['attention_mx_s'] * 1e3:.2f} vs {row['attention_torch_s'] * 1e3:.2f} ms",
                  flush=True)

    for size in sizes:
        base = None
        for g in gpus:
            for mode in modes:
                if mode == "none" and base is not None:
                    continue
                if mode != "none" and g < 2:
                    continue
                r = run_job(args.data, "builtin:dit-xl", size, mode, g, g, args.steps)
                r.pop("latent")
                if mode == "none":
                    base = r
                r["speedup"] = base["step_s"] / r["step_s"] if base else None
                report["modes"].append(r)
                print(f"{size}² {mode:12s} {r['workers']} GPU(s): {r['step_s'] * 1e3:8.1f} ms/step, "
                      f"×{r['speedup'] or 0:.2f}, {r['bytes_per_step'] / 1e6:9.1f} MB/step sent, "
                      f"buffers {r['buffer_bytes'] / 1e6:8.1f} MB{_overlap_note(r)}", flush=True)

    tiny_runs = [(g, g) for g in gpus if g >= 2] + ([(args.tiny_cpu_bands, 0)]
                                                    if args.tiny_cpu_bands else [])
    for workers, g in tiny_runs:
        outs = {m: run_job(args.data, "builtin:dit-tiny", args.tiny_size, m, workers, g,
                           args.steps, tag="tiny-") for m in modes}
        ref = outs["none"]["latent"]
        for m in modes:
            if m == "none":
                continue
            row = {"bands": workers, "gpus": g, "mode": m, "size": args.tiny_size,
                   "bytes_per_step": outs[m]["bytes_per_step"], **fidelity(ref, outs[m]["latent"])}
            report["fidelity"].append(row)
            print(f"fidelity dit-tiny {args.tiny_size}², {workers} bands ({'GPU' if g else 'CPU'}) "
                  f"{m:12s}: PSNR {row['psnr_db']:6.1f} dB, SSIM {row['ssim']:.4f}, "
                  f"max err {row['max_err']:.2e}", flush=True)

    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=float)

    print(f"\n== diffuse bench on {device}, {args.steps} steps ==")
    for row in report["model"]:
        print(f"single GPU {row['size']}² ({row['tokens']} tokens): mx/torch = "
              f"{row['mx_over_torch']:.2f} ({row['mx_s'] * 1e3:.1f} vs {row['torch_s'] * 1e3:.1f} ms)")
    for r in report["modes"]:
        print(f"{r['size']}² {r['mode']:12s} {r['workers']} GPU: {r['step_s'] * 1e3:7.1f} ms/step "
              f"speed-up ×{r['speedup']:.2f}  {r['bytes_per_step'] / 1e6:8.1f} MB/step"
              f"{_overlap_note(r)}")
    for row in report["fidelity"]:
        print(f"fidelity {row['bands']} bands {row['mode']:12s} PSNR {row['psnr_db']:6.1f} "
              f"SSIM {row['ssim']:.4f} max {row['max_err']:.1e}")


if __name__ == "__main__":
    main()
