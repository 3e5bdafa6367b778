"""A diffusion transformer (DiT, Peebles & Xie) on NumPy or CuPy, and where its weights come from.

The network is DiT's: patchify (a p×p, stride-p convolution) plus fixed 2-D sin-cos position
embeddings, a timestep embedding (sinusoid -> MLP) plus an optional class embedding as the
condition ``c``, ``depth`` blocks of adaLN-Zero-modulated self-attention and MLP, a modulated
final layer, unpatchify. It runs on the tokens of one band of the latent at a time: attention
asks ``kv(layer, k, v)`` for the keys and values to attend to, which is where patch
parallelism (``mx.kernels.patches``) exchanges them between workers.

**Checkpoint layout (safetensors).** Tensor names are those of the reference implementation
(facebookresearch/DiT), PyTorch's (out, in) layout for linear weights:
``x_embedder.proj.{weight,bias}`` (hidden, C, p, p), ``t_embedder.mlp.{0,2}.{weight,bias}``,
``y_embedder.embedding_table.weight`` (classes [+1 null], hidden; only for class-conditional
models), ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, ``blocks.{i}.adaLN_modulation.1`` (each ``.weight`` and ``.bias``),
``final_layer.adaLN_modulation.1`` and ``final_layer.linear``. ``pos_embed`` is ignored (mx
computes it for the image's grid). Metadata (strings): ``num_heads`` (default: hidden/64, or
16 for DiT-XL's 1152), ``num_classes``, ``vae_factor`` (image pixels per latent pixel, 8 for
Stable Diffusion's VAE, 1 for a pixel-space model) and ``clip_x0`` ("1" for models of images
in [-1, 1]). Output channels of twice the input are DiT's learned sigma; mx uses the first
half (the predicted noise).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from mx.errors import UserError
from mx.kernels import attention, norm, pointwise
from mx.storage import safetensors

FREQ_DIM = 256  # width of the sinusoidal timestep features
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models")


@dataclass(frozen=True)
class Config:
    hidden: int
    depth: int
    heads: int
    patch: int
    in_channels: int
    out_channels: int
    num_classes: int = 0  # 0: unconditional
    vae_factor: int = 1
    clip_x0: bool = False
    name: str = "dit"


XL = Config(hidden=1152, depth=28, heads=16, patch=2, in_channels=4, out_channels=8,
            num_classes=1000, vae_factor=8, name="builtin:dit-xl")
BUILTINS = ("builtin:dit-tiny", "builtin:dit-xl")


@dataclass
class Model:
    config: Config
    w: dict  # name -> device array; linear weights transposed to (in, out)
    cache: dict = field(default_factory=dict)  # position embeddings, by grid and rows


# --------------------------------------------------------------------------- loading
def _builtin_file(name: str) -> str:
    return os.path.join(BUILTIN_DIR, name.split(":", 1)[1] + ".safetensors")


def inspect(source: str, where: str) -> Config:
    """The configuration of a model (its header only), checked; ``UserError`` if unusable."""
    if source == "builtin:dit-xl":
        return XL
    path = source
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise UserError(f"{where}: unknown builtin model '{source}'; use one of "
                            f"{', '.join(BUILTINS)} or a path to a .safetensors file")
        path = _builtin_file(source)
    if not os.path.isfile(path):
        raise UserError(f"{where}: no model file at {path}; give builtin:dit-tiny, "
                        f"builtin:dit-xl or a path to a .safetensors DiT checkpoint")
    try:
        header, metadata, _ = safetensors.read_header(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    shapes = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise UserError(f"{where}: {path}: tensor '{name}' has a malformed header entry")
        shapes[name] = tuple(entry["shape"])
    return replace(config_from(shapes, metadata, f"{where} ({path})"), name=source)


def _count(metadata: dict[str, str], key: str, default: int, where: str, least: int = 1) -> int:
    """An integer metadata entry (safetensors metadata values are strings), at least ``least``."""
    raw = metadata.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value < least:
        raise UserError(f"{where}: metadata {key} = {raw!r} is not an integer >= {least}; fix or "
                        f"drop it (default {default})")
    return value


def config_from(shapes: dict[str, tuple], metadata: dict[str, str], where: str) -> Config:
    """Infer the configuration from tensor shapes and check that every tensor is there and
    has the shape the configuration implies."""
    proj = shapes.get("x_embedder.proj.weight")
    if proj is None or len(proj) != 4 or proj[2] != proj[3]:
        raise UserError(f"{where}: not a DiT checkpoint: no x_embedder.proj.weight of shape "
                        f"(hidden, channels, p, p); see mx/kernels/dit.py for the tensor names")
    hidden, channels, patch = proj[0], proj[1], proj[2]
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in shapes:
        depth += 1
    if depth == 0:
        raise UserError(f"{where}: no transformer blocks (blocks.0.attn.qkv.weight is missing)")
    final = shapes.get("final_layer.linear.weight", (0, hidden))
    out_channels = final[0] // (patch * patch)
    table = shapes.get("y_embedder.embedding_table.weight")
    classes = _count(metadata, "num_classes", table[0] - 1, where, 0) if table else 0
    default_heads = 16 if hidden == 1152 else max(1, hidden // 64)
    heads = _count(metadata, "num_heads", default_heads, where)
    if hidden % heads:
        raise UserError(f"{where}: hidden width {hidden} is not divisible by num_heads {heads}; "
                        f"fix the num_heads metadata")
    config = Config(hidden=hidden, depth=depth, heads=heads, patch=patch, in_channels=channels,
                    out_channels=out_channels, num_classes=classes,
                    vae_factor=_count(metadata, "vae_factor", 8 if channels == 4 else 1, where),
                    clip_x0=metadata.get("clip_x0", "0") == "1")
    expected = expected_shapes(config, table[0] if table else 0)
    for name, shape in expected.items():
        if name not in shapes:
            raise UserError(f"{where}: tensor {name} is missing (a DiT with hidden {hidden}, "
                            f"depth {depth}, patch {patch} needs it)")
        if tuple(shapes[name]) != shape:
            raise UserError(f"{where}: tensor {name} has shape {tuple(shapes[name])}, expected "
                            f"{shape} for hidden {hidden}, patch {patch}, {channels} channels")
    if out_channels not in (channels, 2 * channels):
        raise UserError(f"{where}: final_layer.linear has {out_channels} output channels per "
                        f"pixel; expected {channels} (noise) or {2 * channels} (noise and sigma)")
    return config


def expected_shapes(c: Config, table_rows: int = 0) -> dict[str, tuple]:
    d, p = c.hidden, c.patch
    shapes = {"x_embedder.proj.weight": (d, c.in_channels, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, FREQ_DIM), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d),
              "final_layer.adaLN_modulation.1.bias": (2 * d,),
              "final_layer.linear.weight": (p * p * c.out_channels, d),
              "final_layer.linear.bias": (p * p * c.out_channels,)}
    if c.num_classes:
        shapes["y_embedder.embedding_table.weight"] = (table_rows or c.num_classes + 1, d)
    for i in range(c.depth):
        for name, (rows, cols) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d),
                                   "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d),
                                   "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def check_weights(source: str, where: str) -> None:
    """Read a model's weights once to refuse NaN or infinite ones before a job runs: its
    workers load them only once its outputs are being written. builtin:dit-xl's weights are
    drawn from the seed."""
    if source == "builtin:dit-xl":
        return
    path = _builtin_file(source) if source.startswith("builtin:") else source
    try:
        safetensors.check(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def load(source: str, xp, dtype, seed: int = 0) -> Model:
    """The model named by ``source`` on ``xp`` in ``dtype`` (float32 or float16)."""
    if source == "builtin:dit-xl":
        tensors, config = random_weights(XL, seed), XL
    else:
        path = _builtin_file(source) if source.startswith("builtin:") else source
        tensors, metadata = safetensors.read(path)  # refuses weights that are not finite
        config = replace(config_from({k: v.shape for k, v in tensors.items()}, metadata, path),
                         name=source)
    return Model(config=config, w=to_device(tensors, xp, dtype))


def to_device(tensors: dict[str, np.ndarray], xp, dtype) -> dict:
    out = {}
    for name, t in tensors.items():
        if name == "pos_embed":
            continue
        t = np.asarray(t, dtype=np.float32)
        if name.endswith(".weight") and t.ndim == 2 and "embedding_table" not in name:
            t = t.T  # (in, out): tokens @ w
        elif name == "x_embedder.proj.weight":
            t = t.reshape(t.shape[0], -1).T  # (C·p·p, hidden)
        out[name] = xp.asarray(np.ascontiguousarray(t), dtype=dtype)
    return out


def random_weights(c: Config, seed: int) -> dict[str, np.ndarray]:
    """Weights of DiT's shapes drawn from ``seed`` (for timing; the picture is noise).

    Scaled like a trained network's (unit-variance activations, non-zero adaLN gates) so that
    the arithmetic is representative, not a stream of zeros.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(c).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith("bias"):
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float16)
        elif "embedding_table" in name:
            out[name] = rng.standard_normal(shape).astype(np.float16)
        else:
            out[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float16)
    return out


# ----------------------------------------------------------------------------- pieces
def pos_embed(xp, hidden: int, grid: tuple[int, int], rows: tuple[int, int], dtype):
    """DiT's fixed 2-D sin-cos embedding of token rows ``rows`` of a ``grid`` (rows, cols):
    first half from the column index, second from the row index, as the reference does."""
    gh, gw = grid
    r = np.arange(rows[0], rows[1], dtype=np.float64)
    col = np.tile(np.arange(gw, dtype=np.float64), len(r))
    row = np.repeat(r, gw)
    emb = np.concatenate([_sincos(hidden // 2, col), _sincos(hidden // 2, row)], axis=1)
    return xp.asarray(emb, dtype=dtype)


def _sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def condition(model: Model, xp, t: float, label: int | None):
    """The condition vector c (1, hidden) for timestep ``t`` and class ``label``."""
    w = model.w
    half = FREQ_DIM // 2
    freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float64) / half)
    args = t * freqs
    feats = xp.asarray(np.concatenate([np.cos(args), np.sin(args)])[None, :],
                       dtype=w["t_embedder.mlp.0.weight"].dtype)
    h = _silu(xp, linear(feats, w, "t_embedder.mlp.0"))
    c = linear(h, w, "t_embedder.mlp.2")
    if model.config.num_classes:
        table = w["y_embedder.embedding_table.weight"]
        index = model.config.num_classes if label is None else label
        c = c + table[index][None, :]
    return c


def linear(x, w: dict, name: str):
    return x @ w[name + ".weight"] + w[name + ".bias"]


def _silu(xp, x):
    return x / (1 + xp.exp(-x))


def patchify(xp, latent, patch: int):
    """(C, h, W) latent rows -> (h/p · W/p, C·p·p) tokens, features ordered (c, a, b) like the
    patch-embedding convolution's weight."""
    c, h, w = latent.shape
    t = latent.reshape(c, h // patch, patch, w // patch, patch)
    return t.transpose(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


def unpatchify(xp, tokens, rows: int, cols: int, patch: int, channels: int):
    """(rows·cols, p·p·C) tokens -> (C, rows·p, cols·p), as the reference's (p, q, c) order."""
    t = tokens.reshape(rows, cols, patch, patch, channels)
    return t.transpose(4, 0, 2, 1, 3).reshape(channels, rows * patch, cols * patch)


# ---------------------------------------------------------------------------- forward
def forward_band(model: Model, xp, latent_rows, token_rows: tuple[int, int], grid, c, kv):
    """The predicted noise for one band of the latent.

    ``latent_rows``: the band's latent pixel rows (C, rows·p, W) in the compute dtype;
    ``token_rows``: which token rows of ``grid`` those are; ``c``: the condition. Attention in
    layer i attends to ``kv(i, k, v)``'s keys and values, where k and v are this band's own,
    shaped (heads, tokens, head_dim). Returns (C, rows·p, W).
    """
    cfg, w = model.config, model.w
    p, d = cfg.patch, cfg.hidden
    x = patchify(xp, latent_rows, p) @ w["x_embedder.proj.weight"] + w["x_embedder.proj.bias"]
    key = ("pos", grid, tuple(token_rows), x.dtype.str)
    if key not in model.cache:  # made on the host: cache it for the following steps
        model.cache[key] = pos_embed(xp, d, grid, token_rows, x.dtype)
    x = x + model.cache[key]
    sc = _silu(xp, c)
    # each block's six modulation vectors depend on the condition alone: made up front, so that
    # a residual update and the next LayerNorm are one kernel (norm.residual_modulate)
    mods = [_split(linear(sc, w, f"blocks.{i}.adaLN_modulation.1"), 6) for i in range(cfg.depth)]
    final = _split(linear(sc, w, "final_layer.adaLN_modulation.1"), 2)
    h = norm.modulate(xp, x, mods[0][0], mods[0][1])
    for i, (_, _, gate1, shift2, scale2, gate2) in enumerate(mods):
        x, h = norm.residual_modulate(xp, x, gate1, _attention(model, xp, h, i, kv),
                                      w[f"blocks.{i}.attn.proj.bias"], shift2, scale2)
        fc1, fc2 = f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"
        f = pointwise.bias_gelu(xp, h @ w[fc1 + ".weight"], w[fc1 + ".bias"])
        shift, scale = mods[i + 1][:2] if i + 1 < cfg.depth else final
        x, h = norm.residual_modulate(xp, x, gate2, f @ w[fc2 + ".weight"], w[fc2 + ".bias"],
                                      shift, scale)
    out = linear(h, w, "final_layer.linear")
    rows = token_rows[1] - token_rows[0]
    noise = unpatchify(xp, out, rows, grid[1], p, cfg.out_channels)
    return noise[:cfg.in_channels]


def _attention(model: Model, xp, h, layer: int, kv):
    cfg = model.config
    n, d = h.shape
    hd = d // cfg.heads
    name = f"blocks.{layer}.attn.qkv"
    qkv = pointwise.add_bias(xp, h @ model.w[name + ".weight"], model.w[name + ".bias"])
    qkv = qkv.reshape(n, 3, cfg.heads, hd)
    qkv = qkv.transpose(1, 2, 0, 3)  # (3, heads, tokens, head_dim)
    k_all, v_all = kv(layer, qkv[1], qkv[2])
    out = attention.attend(xp, qkv[0], k_all, v_all)  # (heads, tokens, head_dim)
    out = out.transpose(1, 0, 2).reshape(n, d)
    return out @ model.w[f"blocks.{layer}.attn.proj.weight"]  # its bias: in the residual


def _split(v, parts: int):
    width = v.shape[-1] // parts
    return [v[..., j * width:(j + 1) * width] for j in range(parts)]


def own_kv(layer, k, v):
    """Attend to this band's own tokens only (a whole image is one band)."""
    return k, v
