"""The DiT of ``mx.kernels.dit`` written in PyTorch (scaled-dot-product attention).

Used to train ``builtin:dit-tiny`` (scripts/train_dit_tiny.py), as the peer mx's single-GPU
model is timed against (bench/diffuse.py), and to check that mx computes the same function.
Parameter names are the reference implementation's (facebookresearch/DiT), so
``state_dict()`` is a checkpoint mx reads. Not part of the mx package: it needs torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, channels, hidden, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32,
                                                          device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def pos_embed(hidden, gh, gw):
    """DiT's 2-D sin-cos embedding (first half from the column index), as mx computes it."""
    def sincos(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    col = np.tile(np.arange(gw, dtype=np.float64), gh)
    row = np.repeat(np.arange(gh, dtype=np.float64), gw)
    return torch.from_numpy(np.concatenate([sincos(hidden // 2, col), sincos(hidden // 2, row)],
                                           axis=1)).float()


class DiT(nn.Module):
    def __init__(self, hidden, depth, heads, patch, channels, out_channels=None, classes=0):
        super().__init__()
        self.hidden, self.heads, self.patch, self.channels = hidden, heads, patch, channels
        self.out_channels = out_channels or channels
        self.x_embedder = PatchEmbed(channels, hidden, patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(classes, hidden) if classes else None
        self.blocks = nn.ModuleList([Block(hidden, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)
        self._pos = {}
        self._init()

    def _init(self):
        # DiT's: xavier linears, adaLN-Zero (modulations and the output start at zero)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def forward(self, x, t, y=None):
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        key = (gh, gw, x.device, x.dtype)
        if key not in self._pos:
            self._pos[key] = pos_embed(self.hidden, gh, gw).to(x.device, x.dtype)
        tokens = self.x_embedder(x) + self._pos[key]
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # (b, n, p·p·C)
        p, ch = self.patch, self.out_channels
        out = out.reshape(b, gh, gw, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, ch, gh * p, gw * p)
