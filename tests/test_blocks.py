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
    assert 1 <= chunk <= max_chunk
    assert aligned[0][0] == 0 and aligned[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(aligned, aligned[1:]))
    for lo, hi in aligned:
        assert lo % chunk == 0  # every writer starts on a chunk boundary
        assert hi == n or hi % chunk == 0  # ... and owns whole chunks
    ideal = -(-n // parts)
    assert max(blocks.length(b) for b in aligned) < ideal + ideal / chunk + 1
