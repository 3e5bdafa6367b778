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


# Block and chunk lengths are kept multiples of this where the sizes allow: cuBLAS runs at
# tensor-core speed only on aligned leading dimensions (an 8193-wide bf16 block ran 5× slower
# than an 8192-wide one on an H200).
ALIGN = 128


def aligned(n: int, parts: int, max_chunk: int, align: int = ALIGN) -> tuple[int, list[Bounds]]:
    """Split 0..n into ``parts`` blocks made of whole chunks; returns (chunk, bounds).

    The chunk is at most ``max_chunk`` (unless ``align`` is larger) and divides the block
    length, so each block's writer owns whole chunks of the output. The chunk is a multiple
    of ``align`` when some cut makes it one at a cost of at most 1/16 extra rows in a block;
    otherwise blocks are as near-equal as possible. Only the last block is shorter (empty
    only when n is tiny against ``parts``).
    """
    block = max(1, -(-n // parts))
    fewest = -(-block // max_chunk)
    options = [(0, fewest, -(-block // fewest))]  # unaligned: used only if nothing aligns
    for pieces in range(fewest, 2 * fewest + 1):
        if block < align * pieces:
            break
        chunk = -(-block // pieces)
        chunk = -(-chunk // align) * align  # round up to a multiple of align
        over = chunk * pieces - block
        if chunk <= max(max_chunk, align) and over <= block // 16:  # alignment, not imbalance
            options.append((over, pieces, chunk))
    aligned_options = options[1:] or options
    _, pieces, chunk = min(aligned_options)  # least excess over an exact share, fewest pieces
    step = chunk * pieces
    return chunk, [(min(p * step, n), min((p + 1) * step, n)) for p in range(parts)]


def balanced(n: int, parts: int, align: int = ALIGN) -> list[Bounds]:
    """``parts`` contiguous ranges covering 0..n, each a multiple of ``align`` long except
    the last, as equal as that allows (plain even split when n is too small to align)."""
    if n < align * parts:
        return even(n, parts)
    units, extra = divmod(n, align)
    base, more = divmod(units, parts)
    bounds, start = [], 0
    for p in range(parts):
        stop = start + (base + (1 if p < more else 0)) * align
        if p == parts - 1:
            stop = n
        bounds.append((start, stop))
        start = stop
    return bounds


def length(bounds: Bounds) -> int:
    return bounds[1] - bounds[0]
