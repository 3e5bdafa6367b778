"""Reading and writing the safetensors format (the one diffusion checkpoints ship in).

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``__metadata__`` of
strings), then the raw little-endian bytes. NumPy has no bfloat16, so BF16 tensors are
widened to float32 on read (exactly: bf16 is float32's top half). A float tensor that holds
NaN or infinite values is refused as it is read: such a checkpoint is damaged, or saved from
a diverged training run, and would only make a non-finite result.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from mx.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def read_header(path: str) -> tuple[dict, dict, int]:
    """(tensors' header entries, metadata, byte offset of the data)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header "
                                f"length); give a .safetensors checkpoint")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER:
                raise UserError(f"{path}: not a safetensors file (header length {length} is "
                                f"implausible); give a .safetensors checkpoint")
            raw = f.read(length)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the model file ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise UserError(f"{path}: not a safetensors file (its header is not JSON); give a "
                        f".safetensors checkpoint") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a file (name -> array) and its metadata."""
    header, metadata, start = read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    tensors = {name: _tensor(path, name, entry, data) for name, entry in header.items()}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def check(path: str) -> None:
    """Read every tensor of a file as ``read`` does, and keep none: the file is mapped, not
    copied, so a checkpoint can be checked before a job runs at the cost of one read."""
    header, _, start = read_header(path)
    if os.path.getsize(path) <= start:
        data = np.empty(0, np.uint8)  # nothing to map; every tensor's size check fails
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    for name, entry in header.items():
        _tensor(path, name, entry, data)


def _tensor(path: str, name: str, entry, data) -> np.ndarray:
    """One tensor from its header entry and the file's data (bytes or a memory map)."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: tensor '{name}' has a malformed header entry") from None
    if dtype != "BF16" and dtype not in DTYPES:
        raise UserError(f"{path}: tensor '{name}' has dtype {dtype}, which mx cannot read; "
                        f"save it as F32, F16 or BF16")
    count = int(np.prod(shape, dtype=np.int64))
    width = 2 if dtype == "BF16" else np.dtype(DTYPES[dtype]).itemsize
    if end - begin != count * width or end > len(data):
        raise UserError(f"{path}: tensor '{name}' says {dtype} {shape} but holds "
                        f"{end - begin} bytes; the file is truncated or corrupt")
    if dtype == "BF16":
        raw = np.frombuffer(data, dtype="<u2", count=count, offset=begin)
        array = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(data, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"),
                              count=count, offset=begin)
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise UserError(f"{path}: tensor {name} holds {bad} NaN or infinite "
                            f"value{'s' if bad > 1 else ''}; the checkpoint is damaged (or "
                            f"saved from a diverged training run): use another one")
    return array.reshape(shape)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
