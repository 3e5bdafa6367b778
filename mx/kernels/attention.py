"""Scaled dot-product attention softmax(q kᵀ / √d) v, on NumPy or CuPy.

Queries go in chunks so the score matrix of a chunk stays small (a 16384-token image has 2^28
scores per head); each chunk is two batched products (cuBLAS on the GPU) around a softmax
taken in float32 whatever the input precision.
"""

from __future__ import annotations

import math

import numpy as np

SCORE_BUDGET = 2**26  # scores (all heads) held at once per chunk: 256 MiB in float32


def attend(xp, q, k, v):
    """q: (heads, n, d); k, v: (heads, N, d). Returns (heads, n, d) in q's dtype."""
    heads, n, d = q.shape
    total = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    chunk = max(1, min(n, SCORE_BUDGET // max(1, heads * total)))
    kt = k.transpose(0, 2, 1)
    out = xp.empty_like(q)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = (q[:, start:stop] @ kt).astype(np.float32, copy=False)
        s *= scale
        s -= s.max(axis=-1, keepdims=True)
        e = xp.exp(s, out=s)
        e /= e.sum(axis=-1, keepdims=True)
        out[:, start:stop] = e.astype(q.dtype, copy=False) @ v
    return out
