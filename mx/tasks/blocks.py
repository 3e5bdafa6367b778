"""Partitions of a matrix dimension into the blocks of a process grid (plain functions)."""

from __future__ import annotations

Bounds = tuple[int, int]


def even(n: int, parts: int) -> list[Bounds]:
    """``parts`` contiguous ranges covering 0..n whose lengths differ by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def aligned(n: int, parts: int, max_chunk: int) -> tuple[int, list[Bounds]]:
    """Split 0..n into ``parts`` blocks made of whole chunks; returns (chunk, bounds).

    The chunk is at most ``max_chunk`` and divides the block length, so each block's writer
    owns whole chunks of the output. Blocks are near-equal: a block exceeds n/parts by less
    than the number of chunks in it; only the last block is shorter (and it is empty only
    when n < parts, or n barely exceeds a multiple of the chunk).
    """
    block = max(1, -(-n // parts))
    pieces = -(-block // max_chunk)
    chunk = -(-block // pieces)
    step = chunk * pieces
    return chunk, [(min(p * step, n), min((p + 1) * step, n)) for p in range(parts)]


def length(bounds: Bounds) -> int:
    return bounds[1] - bounds[0]
