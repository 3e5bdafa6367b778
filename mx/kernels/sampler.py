"""DDIM sampling (η = 0, deterministic) for a noise-predicting model trained on DDPM's schedule.

DiT and mx's dit-tiny are trained with DDPM's linear β schedule over 1000 steps; DDIM takes
``steps`` evenly spaced timesteps of it. Each update is elementwise, so a worker updates its
own band of the latent without the others.
"""

from __future__ import annotations

import numpy as np

TRAIN_STEPS = 1000


def alphas_cumprod() -> np.ndarray:
    betas = np.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def timesteps(steps: int) -> list[int]:
    """The model timesteps visited, from noisiest to cleanest."""
    return [int(t) for t in np.linspace(0, TRAIN_STEPS - 1, steps).round()[::-1]]


def initial_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """x_T: the same on every worker for one seed (float32)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def ddim_step(xp, x, eps, t: int, t_prev: int | None, clip_x0: bool = False):
    """x_{t_prev} from x_t and the predicted noise (float32 arithmetic); t_prev None is the end."""
    ac = alphas_cumprod()
    a = float(ac[t])
    a_prev = 1.0 if t_prev is None else float(ac[t_prev])
    x = x.astype(np.float32, copy=False)
    eps = eps.astype(np.float32, copy=False)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip_x0:
        x0 = xp.clip(x0, -1.0, 1.0)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
