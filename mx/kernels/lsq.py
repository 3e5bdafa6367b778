"""Batched least squares for alternating minimisation, written once against ``xp``.

Half a sweep of matrix completion updates every row i of one factor X by solving

    min_x  sum_{j in Ω_i} (x·Y_j − M_ij)²  +  reg·|x|²

where Y is the other factor (fixed) and Ω_i the observed columns of row i. Ω is a CSR
pattern (indptr, indices, values). All rows are solved at once, never in a Python loop over
rows, by one of three methods:

- ``exact``: form each row's normal equations G_i = Y_Ωiᵀ Y_Ωi + reg·I (O(|Ω_i| k²)) and solve
  them in batches. This is ALS.
- ``cg``: a few conjugate-gradient steps on the normal equations, warm-started from the
  current X. Each step applies every row's operator with one gather (the predictions) and one
  sparse product (O(|Ω| k)), as GPU ALS libraries do; on a GPU one warp per row runs all the
  steps in registers, one pass over the row's entries per step (``solve_cg_rows``).
- ``sketch``: CG preconditioned by a sketch, for heavy rows (degree ≫ k). A CountSketch of
  each row's Y_Ωi into s buckets (``sketch_buckets``: about 8k) costs O(|Ω_i| k): the entry
  at position p of the row goes to bucket p mod s with a random sign (``sketch_signs``, a
  hash of row, column and seed). The inverse of the sketch's Gram matrix approximates
  (Y_Ωiᵀ Y_Ωi)⁻¹ up to a constant factor, whatever Y's conditioning, so a few preconditioned
  steps warm-started at the current X solve the row to the accuracy a sweep needs, in
  O(|Ω_i| k + s k² + k³) instead of O(|Ω_i| k²). Light rows use the exact solve, which is
  cheap at small degree. On a GPU one fused kernel does it all (``rowsolve.sketch_solve``);
  ``solve_sketch`` here is its reference, step for step.
"""

from __future__ import annotations

import numpy as np

from mx.kernels import rowsolve


def sparse_module(xp):
    if xp is np:
        import scipy.sparse as sps

        return sps
    import cupyx.scipy.sparse as csps

    return csps


def csr(xp, indptr, indices, values, shape):
    return sparse_module(xp).csr_matrix((values, indices, indptr), shape=shape)


def row_ids(xp, indptr):
    """The row of every stored entry."""
    if xp is np:
        return np.repeat(np.arange(indptr.size - 1), np.diff(indptr).astype(np.int64))
    # CuPy's repeat takes no device array of counts: the row of entry p is the number of row
    # ends at or before p
    first, end = int(indptr[0]), int(indptr[-1])
    return xp.searchsorted(indptr[1:], xp.arange(first, end, dtype=indptr.dtype), side="right")


# entries whose factor rows are gathered at once (bounds the (entries × k) temporaries)
GATHER_CHUNK = 1 << 20


def predictions(xp, x, y, rows, cols):
    """x_i · y_j for every stored entry (i, j): O(|Ω| k), in chunks of entries."""
    if rows.size <= GATHER_CHUNK:
        return (x[rows] * y[cols]).sum(axis=1)
    out = xp.empty(rows.size, dtype=x.dtype)
    for lo in range(0, int(rows.size), GATHER_CHUNK):
        hi = lo + GATHER_CHUNK
        out[lo:hi] = (x[rows[lo:hi]] * y[cols[lo:hi]]).sum(axis=1)
    return out


def squared_error(xp, x, y, indptr, cols, values):
    """Σ (x_i·y_j − M_ij)² over the stored entries (i, j) of a CSR pattern, as a 0-d array
    on xp's device (reading it is the caller's sync): on a GPU one pass over Ω that writes a
    sum a row, elsewhere ``predictions``."""
    if rowsolve.warp_supported(xp, y):
        return rowsolve.row_sq_error(xp, x, y, indptr, cols, values).sum()
    miss = predictions(xp, x, y, row_ids(xp, indptr), cols) - values
    return (miss * miss).sum()


def residual_and_error(xp, x0, y, indptr, cols, values, reg, low=False, split=None):
    """(x0's residual rows Y_Ωiᵀ(m_i − Y_Ωi x0_i) − reg·x0_i for every row, or None; Σ over
    the stored entries of (x0_i·y_j − M_ij)², as ``squared_error``, a 0-d array). Where the
    row solves start from x0's residual (``starts_from_residual``), one pass gives both, and
    the solves take the residual (their ``r0``) instead of a pass of their own; elsewhere
    the residual is None and the error ``squared_error``'s pass. ``low``: the pass in
    float32 (``LOW_RESIDUAL``). ``split``: every row's ``rowsolve.split_rows``, where the
    caller keeps it (a device sync less)."""
    if not starts_from_residual(xp, y):
        return None, squared_error(xp, x0, y, indptr, cols, values)
    dtype = np.float32 if low else y.dtype
    rows = int(indptr.size) - 1
    sq = xp.empty(rows, dtype=dtype)
    if split is None:
        split = rowsolve.split_rows(xp, indptr, xp.arange(rows, dtype=np.int64))
    r = rowsolve.residual(xp, y, x0, indptr, cols, values, reg, None, split=split, sq=sq,
                          dtype=dtype)
    return r, sq.sum(dtype=np.float64)


# On a GPU, the residual a float64 row solve's float32 correction starts from (``REFINE``)
# may be computed in float32 (Y and x0 rounded to it): half the bytes of its pass over Ω.
# Each sweep's solves then fit entries perturbed by float32's rounding of the predictions,
# about 1e-7 of their scale, and the sweeps reach a floor near that: on planted matrices
# (n = 10⁵, k = 16 and 64, κ = 1 and 100; n = 10⁶, k = 16) the held-out error a sweep was
# float64's to three digits down to 1e-7, and stopped falling at 4e-8 (bench/complete_rules.py
# --variants r32). ``altmin.iterate`` asks for it while its error is above LOW_RESIDUAL
# (None: never).
LOW_RESIDUAL = 1e-4


def normal_apply(xp, p, y, rows, cols, indptr, shape, reg):
    """(Y_Ωiᵀ Y_Ωi + reg I) p_i for every row, by a gather and a sparse product (on a GPU,
    one fused pass)."""
    if rowsolve.warp_supported(xp, y):
        return rowsolve.normal_apply(xp, p, y, indptr, cols, reg)
    weights = predictions(xp, p, y, rows, cols)
    return csr(xp, indptr, cols, weights, shape) @ y + reg * p


def spmm(xp, indptr, cols, values, x, shape):
    """The CSR matrix (indptr, cols, values) of ``shape`` times the dense x."""
    if rowsolve.spmm_supported(xp, x):
        return rowsolve.spmm(xp, indptr, cols, values, x)
    return csr(xp, indptr, cols, values, shape) @ x


# On a GPU, float64 row solves given the last sweep's value x0 (plain CG, sketch-preconditioned
# CG, and exact solves from rank 33) solve for their correction to it in float32, from x0's
# residual in float64 (iterative refinement). Each costs a pass over Ω more, and then
# float32's arithmetic and half the bytes a pass; the residual carries the float64 accuracy,
# so a sweep's fixed point is float64's (where the residual is float64's: LOW_RESIDUAL).
# False: float64 throughout (benchmarks compare the two).
REFINE = True


def _refined(xp, y) -> bool:
    return REFINE and xp is not np and y.dtype == np.float64


def _correction(xp, y, x0, indptr, cols, values, reg, rows, solve, r0=None):
    """The float32 correction to x0 for the rows ``rows``: x0's residual in float64 (one
    pass; ``r0``: ``residual_and_error``'s, where the caller has it), then ``solve(y32, delta,
    r32)``, a kernel that writes the correction into delta (zero elsewhere) from the float32
    residual. Returns (delta, what solve returned)."""
    if r0 is None:
        r0 = rowsolve.residual(xp, y, x0, indptr, cols, values, reg, rows)
    delta = xp.zeros(x0.shape, dtype=np.float32)
    return delta, solve(y.astype(np.float32), delta, r0.astype(np.float32, copy=False))


# The refined plain and sketched CG steps gather Y in float16 (``rowsolve.cg_solve``,
# ``rowsolve.sketch_solve``): half float32's bytes a pass. Rounding Y to float16 perturbs
# the correction's operator by about 5e-4 relative, far below what two or three CG steps
# leave unsolved, and the next residual, in float64, sees the difference, so a sweep's fixed
# point is unchanged. None: float32.
CORRECTION_STORAGE = np.float16


def refines_exact(xp, y) -> bool:
    """Whether ``solve_exact`` given x0 solves for a float32 correction to it (in the fused
    kernel), from x0's residual rows (its ``r0``, where the caller has them)."""
    # At rank <= 32 (a 32-wide Gram tile) the float64 exact kernel costs less than a residual
    # pass and the float32 one together (H100, k = 16: 85 against 18 + 68 ms a half-sweep);
    # from 64-wide tiles the float32 Gram pays (k = 64: 259 against 176 ms).
    return (rowsolve.supported(xp, y) and _refined(xp, y)
            and rowsolve.padded_rank(y.shape[1]) > 32)


def solve_exact(xp, y, indptr, cols, values, reg, rows_subset=None, batch_entries=1 << 24,
                x0=None, r0=None):
    """Exact row solves by normal equations (of rows ``rows_subset``; other rows of the
    result are zero). On a GPU, one fused kernel per row (``rowsolve``), refined from x0 when
    given (``REFINE``; ``r0``: x0's residual rows, ``residual_and_error``'s, where the caller
    has them); elsewhere, and for the rows it cannot factor, rows grouped by degree
    (padded to the next power of two) so each group is one batched product and one batched
    solve."""
    k = y.shape[1]
    degree = xp.diff(indptr)
    m = degree.size
    subset = xp.arange(m) if rows_subset is None else rows_subset
    out = xp.zeros((m, k), dtype=y.dtype)
    if subset.size == 0:
        return out
    singular = False
    if x0 is not None and refines_exact(xp, y):
        delta, left = _correction(xp, y, x0, indptr, cols, values, reg, subset,
                                  lambda y32, d, r32: rowsolve.solve(
                                      xp, y32, indptr, cols, None, reg, subset, d, rhs=r32),
                                  r0)
        out[subset] = x0[subset] + delta[subset]
        # rows singular in float32 go to the float64 path below, whose floor is float64's
        subset = left
        if subset.size == 0:
            return out
        singular = True
    elif rowsolve.supported(xp, y):
        subset = rowsolve.solve(xp, y, indptr, cols, values, reg, subset, out)
        if subset.size == 0:
            return out
        singular = True  # what the kernel left cannot be factored
    return _solve_exact_batched(xp, y, indptr, cols, values, reg, subset, out, batch_entries,
                                singular)


def _solve_exact_batched(xp, y, indptr, cols, values, reg, subset, out, batch_entries,
                         singular=False):
    k = y.shape[1]
    degree = xp.diff(indptr)
    deg = degree[subset]
    width = 2 ** xp.ceil(xp.log2(xp.maximum(deg, 1))).astype(np.int64)
    eye = reg * xp.eye(k, dtype=y.dtype)
    widths = _host(xp, xp.unique(width))
    for w in widths.tolist():
        group = subset[width == w]
        per = max(1, batch_entries // max(1, w * k))
        for start in range(0, int(group.size), per):
            rows = group[start:start + per]
            starts = indptr[rows]
            lengths = degree[rows]
            slot = xp.arange(w)
            valid = slot[None, :] < lengths[:, None]
            pos = xp.where(valid, starts[:, None] + slot[None, :], 0)
            ys = y[cols[pos]] * valid[..., None]  # (rows, w, k), padding zeroed
            ms = values[pos] * valid
            gram = xp.matmul(ys.transpose(0, 2, 1), ys) + eye
            b = xp.matmul(ys.transpose(0, 2, 1), ms[..., None])
            if singular:  # minimum-norm solutions, noise-level singular values cut
                floor = rowsolve.singular_floor(gram.dtype)
                out[rows] = xp.matmul(xp.linalg.pinv(gram, rcond=floor), b)[..., 0]
            else:
                out[rows] = _chol_solve(xp, gram, b)[..., 0]
    return out


def _chol_solve(xp, gram, b):
    """Solve G x = b for a stack of symmetric positive (semi)definite G (min-norm where a row
    has fewer observations than the rank and no regularisation)."""
    try:
        x = xp.linalg.solve(gram, b)
        if bool(xp.isfinite(x).all()):
            return x
    except np.linalg.LinAlgError:
        pass
    return xp.matmul(xp.linalg.pinv(gram), b)


def solve_cg(xp, x0, y, indptr, cols, values, reg, iters=3, precond=None, rows_subset=None,
             stop=None):
    """Batched (preconditioned) CG on every row's normal equations, warm-started at x0.
    ``precond`` is a stack of k×k matrices applied to residuals (rows with none: identity),
    or one k×k matrix for every row.
    ``rows_subset`` limits the update to those rows (the others keep x0). ``stop``: (firm,
    ratio), or None: after ``firm`` steps a row takes no more once its residual norm (rᵀz's
    root) has fallen below ``ratio`` times its start's. Returns (x, iterations run)."""
    shape = (indptr.size - 1, y.shape[0])
    precond = None if precond is None else xp.asarray(precond)  # where it came from the host
    rows = row_ids(xp, indptr)
    b = spmm(xp, indptr, cols, values, y, shape)  # Y_Ωiᵀ m_Ωi for every row
    x = x0.copy()
    r = b - normal_apply(xp, x, y, rows, cols, indptr, shape, reg)
    mask = None
    if rows_subset is not None:
        mask = xp.zeros(shape[0], dtype=y.dtype)
        mask[rows_subset] = 1
        r = r * mask[:, None]
    z = _apply(xp, precond, r)
    p = z.copy()
    rz = (r * z).sum(axis=1)
    # rows converged this far take no more steps (a stopped row's rz stays as it was)
    done = rz * rowsolve.converged(y.dtype)
    firm, ratio = stop or (iters, 0.0)
    enough = rz * ratio * ratio
    run = 0
    for run in range(1, iters + 1):
        hp = normal_apply(xp, p, y, rows, cols, indptr, shape, reg)
        php = (p * hp).sum(axis=1)
        going = (php > 0) & (rz > done) & ((run <= firm) | (rz > enough))
        alpha = xp.where(going, rz / xp.where(php > 0, php, 1), 0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * hp
        z = _apply(xp, precond, r)
        rz_new = (r * z).sum(axis=1)
        beta = xp.where(rz > 0, rz_new / xp.where(rz > 0, rz, 1), 0)
        p = z + beta[:, None] * p
        rz = rz_new
    return (x if mask is None else xp.where(mask[:, None] > 0, x, x0)), run


def solve_cg_rows(xp, x0, y, indptr, cols, values, reg, rows_subset, steps, precond=None,
                  stop=None):
    """``steps`` CG steps from x0 for the rows ``rows_subset`` (other rows keep x0), fewer
    where ``stop`` says (``solve_cg``): plain, as GPU ALS libraries run them, or
    preconditioned by ``precond`` (one symmetric k × k matrix for every row). On a GPU one
    warp per row does all the steps in registers (``rowsolve.cg_solve``); this is its
    reference. In float64 there, the steps solve for the correction to x0 in float32
    (``REFINE``)."""
    return solve_cg_groups(xp, x0, y, indptr, cols, values, reg,
                           [cg_group(rows_subset, steps, precond, stop=stop)])


def cg_group(rows, steps: int, precond=None, split=None, whitening=None, stop=None) -> dict:
    """Rows that take ``steps`` CG steps (preconditioned by ``precond``, one k × k matrix for
    all of them, or plain), fewer where ``stop`` says (``solve_cg``), for
    ``solve_cg_groups``; ``split``: their ``rowsolve.split_rows``, where the caller keeps it
    (one device sync less a launch);
    ``whitening``: (W, s) with W·Wᵀ = precond and WᵀW = diag(s), host arrays, where the
    caller has them (``solve_cg_groups`` then takes plain steps against Y·W on a GPU)."""
    return {"rows": rows, "steps": steps, "precond": precond, "split": split,
            "whitening": whitening, "stop": stop}


def starts_from_residual(xp, y) -> bool:
    """Whether the row solves against y start from x0's residual rows (their ``r0``), which
    a caller may compute for them (``residual_and_error``): the warp-row kernels, refined
    (their float32 correction starts there)."""
    return rowsolve.warp_supported(xp, y) and _refined(xp, y)


def solve_cg_groups(xp, x0, y, indptr, cols, values, reg, groups, top=None, r0=None):
    """``solve_cg_rows`` for several disjoint ``cg_group``s of rows at once (other rows keep
    x0). On a GPU they share what depends only on Y (its float32 and float16 copies, the
    latter's scale from max |Y|: ``top`` where the caller knows it) and, refined, one
    residual pass (``r0``: residual rows including theirs, ``residual_and_error``'s, where the
    caller launched it): each of those otherwise waits on a device sync, a fixed cost that
    more workers do not divide (bench/complete_parts.py)."""
    groups = [g for g in groups if g["rows"].size]
    if not groups:
        return x0.copy()
    if not rowsolve.warp_supported(xp, y):
        out = x0
        for g in groups:
            out = solve_cg(xp, out, y, indptr, cols, values, reg, iters=g["steps"],
                           precond=g["precond"], rows_subset=g["rows"], stop=g["stop"])[0]
        return out
    splits = [g["split"] or rowsolve.split_rows(xp, indptr, g["rows"]) for g in groups]
    if starts_from_residual(xp, y):
        if r0 is None:
            union = splits[0] if len(splits) == 1 else tuple(
                xp.concatenate([split[i] for split in splits]) for i in (0, 1))
            r0 = rowsolve.residual(xp, y, x0, indptr, cols, values, reg, None, split=union)
        y32 = y.astype(np.float32)
        prepared = rowsolve.operand(xp, y32, CORRECTION_STORAGE, top)
        delta = xp.zeros(x0.shape, dtype=np.float32)
        r32 = r0.astype(np.float32, copy=False)
        for split, steps, precond, whitening, stop in _launches(xp, groups, splits):
            if whitening is not None:
                delta += _whitened_correction(xp, y32, r0, indptr, cols, reg, split, steps,
                                              whitening, top, stop)
                continue
            rowsolve.cg_solve(xp, y32, None, indptr, cols, None, reg, None, steps, delta,
                              r0=r32, precond=precond, split=split, prepared=prepared,
                              stop=stop)
        return x0 + delta
    out = x0.copy()
    prepared = rowsolve.operand(xp, y)
    for split, steps, precond, _, stop in _launches(xp, groups, splits):
        rowsolve.cg_solve(xp, y, x0, indptr, cols, values, reg, None, steps, out,
                          precond=precond, split=split, prepared=prepared, stop=stop)
    return out


def _whitened_correction(xp, y32, r0, indptr, cols, reg, split, steps, whitening, top,
                         stop=None):
    """The correction of preconditioned CG steps (preconditioner W·Wᵀ, WᵀW = diag(s)) for the
    rows of ``split``, from their residual rows in r0 (others zero in the result), by plain
    steps in whitened coordinates: x = W z turns (AᵀA + reg I) x = r into
    ((AW)ᵀAW + reg·diag(s)) z = Wᵀr, so the steps gather Y·W and apply no k × k matrix a
    step, which cost as much as a thin row's gathers (``rowsolve.cg_solve``'s precond). The
    iterates are the preconditioned steps' own. ``top``: max |Y|, which bounds max |Y·W|
    (by √k·top·max‖W's columns‖) for the float16 operand's scale without a device read."""
    w, s = whitening
    bound = None if top is None else (
        float(np.sqrt(w.shape[0]) * top * np.sqrt((np.asarray(w) ** 2).sum(axis=0)).max()))
    w_device = xp.asarray(w)
    w32 = w_device.astype(np.float32)
    y_white = y32 @ w32
    prepared = rowsolve.operand(xp, y_white, CORRECTION_STORAGE, bound)
    r_white = (r0 @ w_device).astype(np.float32)
    z = xp.zeros(r_white.shape, dtype=np.float32)
    rowsolve.cg_solve(xp, y_white, None, indptr, cols, None, reg, None, steps, z,
                      r0=r_white, split=split, prepared=prepared, regv=reg * np.asarray(s),
                      stop=stop)
    return z @ w32.T


def _launches(xp, groups, splits) -> list:
    """The kernel launches of ``solve_cg_groups``: (split, steps, precond, whitening, stop).
    The groups with no preconditioner and the same stop share one, each row taking its
    group's steps: apart, a launch of a few thousand long rows (MovieLens's heavy films) left
    most of the GPU idle until its last row was done, and the next launch's rows waited for
    it."""
    launches = [(split, g["steps"], g["precond"], g["whitening"], g["stop"])
                for g, split in zip(groups, splits) if g["precond"] is not None]
    # plain groups by their stop's ratio; one with no stop joins another's launch, its rows'
    # firm steps all their steps (they never stop early)
    plain = {}
    for g, split in zip(groups, splits):
        if g["precond"] is None:
            ratio = g["stop"][1] if g["stop"] else None
            plain.setdefault(ratio, []).append((g, split))
    if None in plain and len(plain) > 1:
        plain[next(r for r in plain if r is not None)] += plain.pop(None)
    for ratio, shared in plain.items():
        if len(shared) == 1:
            launches.append((shared[0][1], shared[0][0]["steps"], None, None,
                             shared[0][0]["stop"]))
            continue

        def per_row(count):  # each part's rows' ``count(group)``, in the split's order
            return tuple(xp.concatenate([xp.full(s[part].size, count(g), dtype=np.int32)
                                         for g, s in shared]) for part in (0, 1))

        split = tuple(xp.concatenate([s[part] for _, s in shared]) for part in (0, 1))
        steps = per_row(lambda g: g["steps"])
        firm = per_row(lambda g: g["stop"][0] if g["stop"] else g["steps"])
        launches.append((split, steps, None, None, (firm, ratio or 0.0)))
    return launches


def _apply(xp, precond, r):
    if precond is None:
        return r
    return xp.matmul(precond, r[..., None])[..., 0]


# A row's sketch has about SKETCH_RATIO·k buckets. With 8k, the preconditioned rows' condition
# number is about 3 to 4.5 (4k: 6 to 10; 16k: 2 to 3). On an H100 at κ = 100, 8k took the
# sweeps exact ALS takes or one more, where 4k took one to three more, for 1.1 to 1.15 times
# the time a sweep (bench/complete_sketch_size.py). 16k took ALS's sweeps at k = 64 but was
# the slowest to the target at k = 128: its bucket sums cost a fifth more a sweep than 8k's.
SKETCH_RATIO = 8


def sketch_buckets(k: int, ratio: float | None = None) -> int:
    """Buckets of a row's CountSketch: ratio·k (default SKETCH_RATIO·k) rounded up to a
    multiple of the 32 bucket sums the GPU kernel stages at a time."""
    ratio = SKETCH_RATIO if ratio is None else ratio
    return rowsolve.CHUNK * max(1, -(-int(ratio * k) // rowsolve.CHUNK))


def entry_hash(rows, cols, seed: int):
    """A 64-bit mix of each entry's (row, column) and a seed (below 2³⁵), as uint64: the same
    on NumPy and CuPy, and the same bits as the sketch's GPU kernel computes."""
    u64 = np.uint64
    h = (rows.astype(u64) * u64(0x9E3779B97F4A7C15)) ^ \
        (cols.astype(u64) * u64(0xC2B2AE3D27D4EB4F)) ^ (u64(seed) * u64(0x165667B1) + u64(1))
    h ^= h >> u64(31)
    h *= u64(0x94D049BB133111EB)
    h ^= h >> u64(29)
    return h


def sketch_signs(xp, rows, cols, seed):
    """±1 for each entry (row, column): the top bit of its ``entry_hash``."""
    return 1.0 - 2.0 * (entry_hash(rows, cols, seed) >> np.uint64(63)).astype(np.float64)


def sketch_preconditioner(xp, y, indptr, cols, reg, rows_subset, seed=0, buckets=None):
    """For each row in ``rows_subset``: the inverse Gram matrix (+ reg I) of the row's
    CountSketch of Y_Ωi into ``buckets`` (default ``sketch_buckets(k)``); identity rows
    elsewhere. O(|Ω_i| k + s k² + k³)."""
    m = indptr.size - 1
    k = y.shape[1]
    s = buckets or sketch_buckets(k)
    pre = xp.broadcast_to(xp.eye(k, dtype=y.dtype), (m, k, k)).copy()
    if rows_subset.size == 0:
        return pre
    rows = row_ids(xp, indptr)
    heavy = xp.zeros(m, dtype=bool)
    heavy[rows_subset] = True
    keep = heavy[rows]
    entry_rows = rows[keep]
    entry_cols = cols[keep]
    bucket = (xp.arange(rows.size) - indptr[rows])[keep] % s
    sign = sketch_signs(xp, entry_rows, entry_cols, seed).astype(y.dtype)
    order = xp.cumsum(heavy) - 1  # rank of each heavy row among heavy rows
    sketch_rows = order[entry_rows] * s + bucket
    n_heavy = int(rows_subset.size)
    sk = sparse_module(xp).csr_matrix((sign, (sketch_rows, entry_cols)),
                                      shape=(n_heavy * s, y.shape[0])) @ y
    sk = sk.reshape(n_heavy, s, k)
    gram = xp.matmul(sk.transpose(0, 2, 1), sk) + reg * xp.eye(k, dtype=y.dtype)
    gram += 1e-12 * xp.trace(gram, axis1=1, axis2=2)[:, None, None] * xp.eye(k, dtype=y.dtype)
    pre[rows_subset] = xp.linalg.inv(gram)
    return pre


def solve_sketch(xp, x0, y, indptr, cols, values, reg, rows_subset, steps, seed=0,
                 buckets=None, top=None, r0=None):
    """Sketch-preconditioned CG for the rows ``rows_subset``: ``steps`` steps from x0 (other
    rows keep x0), with ``buckets`` per sketch (default ``sketch_buckets(k)``). On a GPU one
    fused kernel per row (where the fused exact kernel runs too); rows whose sketch is
    singular there (Y_Ωi of rank below k) get the exact solve. ``top``: max |Y| where the
    caller knows it (``solve_cg_groups``); ``r0``: x0's residual rows where the caller has
    them (``residual_and_error``), for the refined correction."""
    if rows_subset.size == 0:
        return x0.copy()
    buckets = buckets or sketch_buckets(y.shape[1])
    if rowsolve.supported(xp, y) and _refined(xp, y):
        delta, failed = _correction(xp, y, x0, indptr, cols, values, reg, rows_subset,
                                    lambda y32, d, r32: rowsolve.sketch_solve(
                                        xp, y32, None, indptr, cols, None, reg, rows_subset,
                                        steps, buckets, seed, d, r0=r32,
                                        storage=CORRECTION_STORAGE, top=top), r0)
        out = x0 + delta
        if failed.size:  # singular in float32: the exact float64 solve
            out[failed] = solve_exact(xp, y, indptr, cols, values, reg, rows_subset=failed)[failed]
        return out
    if rowsolve.supported(xp, y):
        out = x0.copy()
        failed = rowsolve.sketch_solve(xp, y, x0, indptr, cols, values, reg, rows_subset,
                                       steps, buckets, seed, out)
        if failed.size:
            out[failed] = solve_exact(xp, y, indptr, cols, values, reg, rows_subset=failed)[failed]
        return out
    pre = sketch_preconditioner(xp, y, indptr, cols, reg, rows_subset, seed, buckets)
    return solve_cg(xp, x0, y, indptr, cols, values, reg, iters=steps, precond=pre,
                    rows_subset=rows_subset)[0]


def _host(xp, a):
    return a if xp is np else a.get()
