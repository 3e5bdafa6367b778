"""A generated image on disk: the final latent as a Zarr array (C, H, W) plus a PNG preview.

The array is the output a job commits; ``preview.png`` lies inside its folder (so it is
committed with it) and ``publish`` copies it beside the output as ``<name>.png`` once the
output is committed. A pixel-space model's output (3 channels in [-1, 1]) is the picture
itself; a latent (e.g. Stable Diffusion's 4 channels) is previewed from its first three
channels, each stretched between its 1st and 99th percentiles.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from mx.errors import UserError

PREVIEW = "preview.png"
MARK = ("Software", "mx")  # a PNG text entry: mx replaces only PNGs that carry it


def create(path: str, shape: tuple[int, int, int], attributes: dict) -> None:
    import zarr

    array = zarr.create_array(store=path, shape=shape, chunks=shape, dtype="f4", fill_value=0,
                              zarr_format=3)
    array.update_attributes(attributes)


def write(path: str, latent: np.ndarray, pixels: bool, summary: dict) -> None:
    import zarr

    array = zarr.open_array(store=path, mode="r+")
    array[...] = latent
    array.attrs["diffuse"] = summary
    save_png(os.path.join(path, PREVIEW), to_rgb(latent, pixels))


def to_rgb(latent: np.ndarray, pixels: bool) -> np.ndarray:
    """(C, H, W) float -> (H, W, 3) uint8."""
    x = np.asarray(latent, dtype=np.float64)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    x = x[:3]
    if pixels:
        scaled = (x + 1.0) / 2.0
    else:
        lo = np.percentile(x, 1, axis=(1, 2), keepdims=True)
        hi = np.percentile(x, 99, axis=(1, 2), keepdims=True)
        scaled = (x - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def save_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(*MARK)
    tmp = path + ".tmp"
    Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def preview_path(output: str) -> str:
    """Where ``publish`` puts an output's preview: ``<output without .zarr>.png``."""
    return (output[:-5] if output.endswith(".zarr") else output) + ".png"


def _mx_png(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get(MARK[0]) == MARK[1]
    except Exception:
        return False


def check_publishable(output: str, what: str) -> None:
    """Refuse, before a job runs, a preview path that holds something mx did not write."""
    target = preview_path(output)
    if os.path.lexists(target) and (os.path.isdir(target) or not _mx_png(target)):
        raise UserError(f"{what}: the preview {target} would replace a "
                        f"{'folder' if os.path.isdir(target) else 'file'} mx did not write; "
                        f"move it away or choose another output path")


def publish(output: str) -> str:
    """Copy a committed output's preview beside it (``preview_path``)."""
    target = preview_path(output)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp")
    try:
        shutil.copyfile(os.path.join(output, PREVIEW), tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return target


def read(path: str) -> tuple[np.ndarray, dict]:
    import zarr

    array = zarr.open_array(store=path, mode="r")
    return np.asarray(array[...]), dict(array.attrs)
