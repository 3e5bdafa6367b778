import numpy as np
import pytest

from mx.tasks import blocks


@pytest.mark.parametrize("trial", range(200))
def test_partitions_cover_and_balance(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 50_000))
    parts = int(rng.integers(1, 17))
    max_chunk = int(rng.integers(1, 5000))

    even = blocks.even(n, parts)
    assert even[0][0] == 0 and even[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(even, even[1:]))
    sizes = [blocks.length(b) for b in even]
    assert max(sizes) - min(sizes) <= 1

    chunk, aligned = blocks.aligned(n, parts, max_chunk)
    assert 1 <= chunk <= max(max_chunk, blocks.ALIGN)
    assert aligned[0][0] == 0 and aligned[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(aligned, aligned[1:]))
    for lo, hi in aligned:
        if lo == hi == n:
            continue  # an empty trailing block (n small against parts)
        assert lo % chunk == 0  # every writer starts on a chunk boundary
        assert hi == n or hi % chunk == 0  # ... and owns whole chunks
    ideal = -(-n // parts)
    # aligned cuts cost at most 1/16 extra; unaligned ones less than a row per chunk
    assert max(blocks.length(b) for b in aligned) <= ideal + max(ideal // 16, ideal // chunk + 1)

    bal = blocks.balanced(n, parts)
    assert bal[0][0] == 0 and bal[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bal, bal[1:]))
    if n >= blocks.ALIGN * parts:
        assert all(blocks.length(b) % blocks.ALIGN == 0 for b in bal[:-1])
        lengths = [blocks.length(b) for b in bal]
        assert max(lengths) - min(lengths) <= 2 * blocks.ALIGN


def test_aligned_splits_power_of_two_sizes_exactly():
    chunk, bounds = blocks.aligned(16384, 2, 2896)
    assert bounds == [(0, 8192), (8192, 16384)] and 8192 % chunk == 0 and chunk % 128 == 0


@pytest.mark.parametrize("n,parts", [(10000, 2), (50000, 3), (32768 + 640, 4), (65536, 2)])
def test_large_blocks_are_aligned(n, parts):
    chunk, _ = blocks.aligned(n, parts, 2896)
    assert chunk % blocks.ALIGN == 0


def test_small_blocks_stay_balanced():
    chunk, bounds = blocks.aligned(301, 2, 2896)  # aligning would make it 256 + 45
    assert [blocks.length(b) for b in bounds] == [151, 150]
