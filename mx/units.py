"""Amounts of memory in messages: bytes printed in the unit that fits them."""

from __future__ import annotations

UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def human_bytes(nbytes: float) -> str:
    """``nbytes`` as "1.50 GiB", "512.00 KiB" or "12 B"."""
    for unit, size in UNITS:
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"
