"""Train ``builtin:dit-tiny``: a small pixel-space DiT on crops of scikit-image's sample photos.

Three stages, so the GPU machine needs neither scikit-image nor network access:

    python scripts/train_dit_tiny.py prepare photos.npz         # needs scikit-image
    python scripts/train_dit_tiny.py train photos.npz mx/models/dit-tiny.safetensors --seconds 240
    python scripts/train_dit_tiny.py check mx/models/dit-tiny.safetensors   # mx == torch

The photos are the colour images that ship inside the scikit-image wheel. Training samples
random 32×32 crops of them at several scales (with flips), with DDPM's noise-prediction
objective on the linear β schedule mx's sampler uses, and keeps an exponential moving
average of the weights, which is what is saved (float16, DiT's tensor names).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

PHOTO_FILES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
               "ihc.png", "retina.jpg", "motorcycle_left.png"]
CONFIG = dict(hidden=128, depth=6, heads=4, patch=2, channels=3)
CROP = 32
SCALES = (1, 1.5, 2, 3, 4, 6)
METADATA = {"num_heads": "4", "vae_factor": "1", "clip_x0": "1",
            "trained_on": "32x32 crops of scikit-image's sample photos: " + ", ".join(PHOTO_FILES)}


def prepare(out: str) -> None:
    import skimage.io
    from skimage import data

    images = {}
    for name in PHOTO_FILES:
        image = skimage.io.imread(os.path.join(data.data_dir, name))
        images[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
        print(name, images[name].shape)
    np.savez_compressed(out, **images)


def _pyramid(path: str, device):
    import torch
    import torch.nn.functional as F

    levels = []
    with np.load(path) as photos:
        for name in photos.files:
            x = torch.from_numpy(photos[name]).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1
            for s in SCALES:
                h, w = int(x.shape[2] / s), int(x.shape[3] / s)
                if min(h, w) >= CROP:
                    levels.append(F.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                                align_corners=False)[0])
    weights = np.array([lv.shape[1] * lv.shape[2] for lv in levels], dtype=np.float64)
    return levels, weights / weights.sum()


def _batch(levels, weights, size, rng):
    import torch

    picks = rng.choice(len(levels), size=size, p=weights)
    crops = []
    for i in picks:
        lv = levels[i]
        y = rng.integers(0, lv.shape[1] - CROP + 1)
        x = rng.integers(0, lv.shape[2] - CROP + 1)
        crop = lv[:, y:y + CROP, x:x + CROP]
        crops.append(torch.flip(crop, dims=[2]) if rng.random() < 0.5 else crop)
    return torch.stack(crops)


def train(data: str, out: str, seconds: float, batch: int, lr: float) -> None:
    import torch

    from dit_torch import DiT
    from mx.kernels import sampler

    torch.manual_seed(0)
    device = "cuda"
    model = DiT(**CONFIG).to(device)
    ema = DiT(**CONFIG).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ac = torch.tensor(sampler.alphas_cumprod(), dtype=torch.float32, device=device)
    levels, weights = _pyramid(data, device)
    rng = np.random.default_rng(0)
    start, step, avg = time.time(), 0, None
    while time.time() - start < seconds:
        x0 = _batch(levels, weights, batch, rng)
        t = torch.randint(0, sampler.TRAIN_STEPS, (batch,), device=device)
        noise = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 500)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(xt, t).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.9995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if step % 1000 == 0:
            print(f"step {step} loss {avg:.4f} ({time.time() - start:.0f} s)", flush=True)
        step += 1
    print(f"trained {step} steps of batch {batch} in {time.time() - start:.0f} s, loss {avg:.4f}")
    save(ema, out, {**METADATA, "train_steps": str(step), "batch": str(batch)})


def save(model, out: str, metadata: dict) -> None:
    from mx.storage import safetensors

    tensors = {k: v.detach().float().cpu().numpy().astype(np.float16)
               for k, v in model.state_dict().items()}
    safetensors.write(out, tensors, metadata)
    print(f"wrote {out}: {sum(t.size for t in tensors.values())} parameters")


def check(path: str) -> None:
    """mx's forward (NumPy, and CuPy if present) against torch's on the same weights."""
    import torch

    from dit_torch import DiT
    from mx.kernels import dit
    from mx.storage import safetensors

    tensors, _ = safetensors.read(path)
    model = DiT(**CONFIG).double()
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in tensors.items()})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 40, 24))
    t = 437
    want = model(torch.from_numpy(x), torch.tensor([t])).detach().numpy()[0]
    modules = [np]
    try:
        import cupy
        modules.append(cupy)
    except ImportError:
        pass
    for xp in modules:
        net = dit.load(path, xp, np.float32)
        c = dit.condition(net, xp, t, None)
        got = dit.forward_band(net, xp, xp.asarray(x[0], dtype=np.float32), (0, 20), (20, 12), c,
                               dit.own_kv)
        got = got.get() if xp is not np else got
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"{xp.__name__}: max error relative to torch (float64): {err:.2e}")
        assert err < 1e-4, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out")
    p = sub.add_parser("train")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p = sub.add_parser("check")
    p.add_argument("path")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "train":
        train(args.data, args.out, args.seconds, args.batch, args.lr)
    else:
        check(args.path)


if __name__ == "__main__":
    main()
