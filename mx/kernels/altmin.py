"""Low-rank matrix completion by alternating minimisation: the SPMD program of a gang.

Each worker owns a block of U's rows and a block of V's rows, and the observed entries Ω of
its U rows (stored by rows) and of its V rows (stored by columns). It gets the latter once,
at setup, from the workers that read those entries. Each half-sweep solves this worker's rows
locally against the whole other factor. The factor is all-gathered first; it is k wide, so
only factor blocks move between workers, never Ω.

- **Initialisation** is as in the paper: the top-k subspace of the rescaled observed matrix,
  from a randomized SVD that only multiplies the sparse matrix (two power iterations,
  CholeskyQR across workers). Rows of U that are too heavy are clipped, for incoherence.
  The first V solve is against U's orthonormal basis; the two factors are then balanced.
- **Sweeps** then alternate V and U. Row solves are batched: ``exact`` (ALS), ``cg`` (a few
  CG steps, like GPU ALS libraries), or, for ``altmin-sketch``, on heavy rows plain CG where
  the other factor is so well conditioned that the sketch cannot help, else
  sketch-preconditioned CG (on a GPU at rank <= 32 only on rows of 64k observations or
  more: below that the exact solve is cheaper there); on light rows exact solves, but CG on
  thin ones, and on a GPU on all of them: plain, or, against an ill-conditioned factor,
  preconditioned by its Gram matrix, except where they are barely determined; but at rank
  <= 32 a GPU solves the light rows that are not thin exactly against an ill-conditioned
  factor (``_solve``, ``light_rows_iterative``, ``mx.kernels.lsq``). Heavy rows' plain
  steps stop early once their residual is small against the sweeps' own progress
  (``cg_stop``). The log counts the row solves of each kind.
- **Held-out entries** (a deterministic hash of (i, j, seed)) measure the relative error each
  sweep. The run stops below ``tol``, when the error stagnates, or at ``max_iters``. A
  sweep's training error comes with the next sweep's residual pass (``iterate``); the
  corrections start from float32 residuals while the error is far above float32's floor
  (``lsq.LOW_RESIDUAL``).
- **Checkpoints:** U and V go to one of two checkpoint slots, the one not committed last,
  written in the background while the sweeps go on (``Checkpoints``); a new one starts after
  the first sweep that finds the last one done everywhere. A job stopped anywhere resumes from
  the last committed slot, a sweep or more back, and repeats those sweeps exactly.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import numpy as np
import zarr

from mx.cluster.comm import GangContext
from mx.kernels import lsq, rowsolve
from mx.storage import dense, sparse

# Rows with at least HEAVY_DEGREE·k observations get sketch-preconditioned CG; lighter rows
# are solved exactly. On an H100 the fused sketch solve (8k buckets, 3 steps) costs what the
# fused exact one does at 8k to 16k observations for k = 48 to 64, and 0.6 to 0.75 of it
# from 32k; at k = 128 0.6 from 16k (bench/complete_profile.py --crossover).
HEAVY_DEGREE = 16
# Where the fused GPU kernels run at rank <= 32 (a 32-wide Gram matrix), the exact solve is
# cheap enough that the sketch pays only on rows well past 16k observations: there rows get
# the sketch from SMALL_RANK_SKETCH_DEGREE·k on, and the exact solve below it. H100, one
# half-sweep over every row (bench/rowsolve_passes.py, refined): 10⁵ rows of 3000 (187k at
# k = 16) took 35 ms sketched against 85 exact, and at k = 32 (94k) 50 against 89; 10⁶ rows
# of 300 (19k at k = 16) took 109 against 99, and there the sketch took 11 sweeps to 1e-4
# where exact solves took 9 (κ = 100). Plain CG steps cost a fourth of the exact solve (10
# against 85 ms), so heavy rows against a well-conditioned factor get those from 16k.
FUSED_EXACT_MAX_RANK = 32
SMALL_RANK_SKETCH_DEGREE = 64
# CG steps per row and half-sweep, by method and row solver, unless the job sets cg_iters.
# 3 sketch-preconditioned steps reached a held-out error of 1e-4 in the fewest seconds on
# planted matrices (k = 64 and 128; 2 steps take more sweeps). Against a well-conditioned
# factor heavy rows take 3 plain steps: on planted matrices 2 cut the error as fast per
# second (at k = 64 and 128, κ = 1, as much a sweep for 0.8 of the time; at k = 64, κ = 2,
# 10× a sweep against 17× in 0.8 of the time), but where the heavy rows are popular films
# (MovieLens-20M-sized with popularity skew, k = 64) 2 steps ended 12 sweeps at 4.37e-2
# where 3 ended at 4.10e-2 and als-cg's 4 at 4.09e-2, for 3% more time a sweep
# (bench/complete_rules.py). 4 plain steps are what GPU ALS libraries run.
CG_STEPS = {("altmin-sketch", "sketch"): 3, ("altmin-sketch", "plain-cg"): 3,
            ("altmin-sketch", "plain-cg-light"): 4, ("als-cg", "plain-cg"): 4}
# (firm, cap): after ``firm`` of those steps a row takes no more once its residual has fallen
# below a ratio of its start's (``lsq.solve_cg``'s stop), by method and row solver. The ratio
# follows the sweeps (``cg_stop``): FORCING times the held-out error's last contraction, at
# most ``cap``, and no stop before two sweeps have measured one. A row's start is off by about
# the last sweep's error, so a residual cut by a fraction of what the sweeps cut the error
# by costs them nothing (an inexact Newton method's forcing term), where more steps cost a
# pass over the row each. H100, planted n = 10⁵, 3000 a row (bench/complete_rules.py): at
# k = 64 the stopped sweeps took 92 to 98 against 105 ms and ended lower (2.4e-8 against
# 3.4e-8 after 6), at k = 16 25 against 29 ms; a stop at 3 % from the first sweep left the
# second 8 to 17 % higher (k = 16: 1.06e-4 against 9.8e-5, a sweep more to 1e-4).
CG_STOP = {("altmin-sketch", "plain-cg"): (2, 0.03)}
FORCING = 0.5
# The sketch's own distortion leaves its preconditioned rows a condition number of about 3 to
# 4.5 (8k buckets; 6 to 10 with the 4k this threshold was chosen against). Where the other
# factor is better conditioned than that (cond(YᵀY) at most WELL_CONDITIONED; a heavy row's
# Gram is then about (d_i/n)·YᵀY, if its columns are sampled evenly) plain CG steps converge
# as fast as preconditioned ones and cost no sketch: on planted matrices they took the sweeps
# exact ALS takes, one fewer than the 4k sketch, and at cond(YᵀY) of 4 to 15 they took two
# to three times as many.
WELL_CONDITIONED = 3.0
# Rows with fewer than THIN_DEGREE·k observations get plain CG steps from the last sweep's value
# (CG_STEPS' "plain-cg-light"), whatever the factor's conditioning: an exact solve of a d × k
# least-squares problem at d/k < 4 multiplies the other factor's error by up to
# 1/(1 − √(k/d))² (4 and more), while a few CG steps move only where the data pin the row
# down. NumPy, 12 sweeps (bench/complete_light_rows.py): on MovieLens-shaped data with
# MovieLens-like skew at k = 64 it reached 3.5e-2 (als-cg: 3.5e-2), where exact solves of
# those rows stalled at 0.24 or stopped at 0.79, as exact ALS did; at κ = 100 4.8e-2 (als-cg:
# 7.7e-2); without skew at κ = 2.5, 7.3e-3 against 9.1e-3.
THIN_DEGREE = 4
# Against an ill-conditioned factor (cond(YᵀY) > WELL_CONDITIONED), thin rows of at least
# GRAM_CG_DEGREE·k observations (and on a GPU the other light rows: ``light_rows_iterative``)
# take those steps preconditioned by the inverse of
# (d/n)·YᵀY + reg·I ("gram-cg", ``gram_preconditioner``): plain steps leave the factor's weak
# directions unsolved, exact solves amplify its error, and this one k × k matrix is what
# every evenly sampled row's Gram matrix is near, up to the sampling's own distortion. Below
# GRAM_CG_DEGREE·k a row's problem is barely determined, and plain steps, which move only
# where the data pin it down, did best. NumPy, MovieLens's shape at a tenth, k = 64, held-out
# error after 12 sweeps (bench/complete_light_rows.py), against plain steps and exact
# solves: uniform at κ = 5, 1.1e-2 against 1.6e-2 and 1.3e-2; at κ = 10, 2.4e-2 against
# 5.0e-2 and 1.6e-2; skewed at κ = 100, 4.2e-2 against 4.8e-2 (exact solves diverge there).
GRAM_CG_DEGREE = 1.5
# On the H100 the light rows' exact solves were half of an ill-conditioned sweep: with these
# steps for them too, MovieLens-20M-sized at k = 64 (films of 750) took 13.0 against 26.0 ms
# a sweep at κ = 5 for the same error after 12 sweeps (6.8e-2), at κ = 10 12.8 against 26.2
# (1.12e-1 against 1.10e-1), and, skewed at κ = 100, 20.2 against 34.0 ms and 6.0e-2 against
# 6.3e-2 (bench/complete_rules.py). On a GPU the steps are plain ones against the whitened
# factor (``gram_whitening``): 10.9 ms at κ = 5.
STAGNATION = 1e-3  # relative improvement of the held-out error below which a sweep is "no gain"


def holdout_mask(xp, rows, cols, fraction: float, seed: int):
    """True for held-out entries: a hash of (row, column, seed), the same on every worker and
    on NumPy and CuPy alike."""
    if fraction <= 0:
        return xp.zeros(rows.shape, dtype=bool)
    h = lsq.entry_hash(rows, cols, seed)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def run(row_block, col_block, *, row_blocks, col_blocks, path, shape, rank, method, tol,
        max_iters, reg, holdout, seed, cg_iters, out_path, checkpoint, signature,
        ctx: GangContext) -> dict:
    xp, me = ctx.xp, ctx.control.rank
    m, n = shape
    k = rank
    r0, r1 = row_block
    c0, c1 = col_block
    R, C, H = _load_omega(ctx, path, row_block, col_block, col_blocks, shape, holdout, seed)

    state = save = None
    if checkpoint:
        _prepare_checkpoint(ctx, checkpoint, signature)
        state = _resume(checkpoint, signature, row_block, col_block)
        if not all(_gather(ctx, state is not None, "resume")):  # all resume, or none
            state = None
        save = Checkpoints(ctx, checkpoint, signature, row_block, col_block)
    try:
        u, v, history, reason = iterate(ctx, R, C, H, (m, n), k, row_blocks, col_blocks,
                                        method, tol, max_iters, reg, cg_iters, seed, state, save)
    except BaseException:
        if save is not None:
            save.close(raise_errors=False)
        raise
    if save is not None:
        with ctx.timed_host("checkpoint"):
            save.close()
    ctx.finish()
    with ctx.timed_host("write"):
        group = zarr.open_group(store=out_path, mode="r+")
        group["u"][r0:r1] = _host(xp, u)
        group["v"][c0:c1] = _host(xp, v)
    ctx.control.barrier(("written", seed))
    if me == 0:
        group.attrs["history"] = history
        group.attrs["stopped"] = reason
        if checkpoint:
            import shutil

            shutil.rmtree(checkpoint, ignore_errors=True)
    return {"sweeps": len(history), "stopped": reason, "history": history if me == 0 else []}


def iterate(ctx, R, C, held, shape, k, row_blocks, col_blocks, method, tol, max_iters, reg,
            cg_iters, seed, state=None, save=None):
    """The sweeps, on device arrays already in place: R (this worker's rows of Ω, by rows),
    C (its columns, by columns), ``held`` (its rows' held-out entries, by rows, as R). Starts
    from the randomized-SVD estimate, or from ``state`` (a checkpoint); ``save`` (``Checkpoints``)
    is called after a sweep where every worker's last checkpoint write is done. Returns
    (u, v, history, why it stopped)."""
    xp = ctx.xp
    # entries and squared norms of the training and held-out values, summed over the workers
    t_count, t_norm, h_count, h_norm = sum(_gather(ctx, np.array(
        [float(R[2].size), float((R[2] * R[2]).sum()), float(held[2].size),
         float((held[2] * held[2]).sum())]), "norms"))
    if state is None:
        with ctx.timed("init"):
            u, v = _initialise(ctx, R, C, shape, k, row_blocks, col_blocks, seed)
        start, history = 0, []
    else:
        u, v = xp.asarray(state["u"]), xp.asarray(state["v"])
        start, history = state["iteration"], state["history"]
        if ctx.control.rank == 0:  # counters are summed over the workers
            ctx.count("resumed-at-sweep", start)
        # a run killed after its last checkpoint but before its output was written has already
        # met its stopping rule: it stops where the uninterrupted run stopped
        reason = _stop_reason(history, tol)
        if reason is not None:
            _settle_training_error(ctx, history, u, v, R, col_blocks, k, t_count)
            return u, v, history, reason
    plan_v = plan_u = None
    if method != "als":
        plan_v, plan_u = row_plan(xp, C[0], k, method), row_plan(xp, R[0], k, method)
    # UᵀU of u as the last sweep left it, where the V half-sweep needs it
    carry_gram_u = plan_v is not None and conditioning_matters(plan_v)
    stats_u = None  # ``_stats_of`` u as the last sweep left it, from its metrics
    cond_u = cond_v = None  # cond(UᵀU), cond(VᵀV) when last solved against (``_solve``)
    # with entries held out (which measure the error), a sweep's training error comes with
    # the next sweep's V half, whose residual pass reads every training entry against the
    # factors as this sweep left them: the pass the row solves start from gives it (on a
    # GPU; elsewhere a pass of its own). A pass over Ω less a sweep, a fifth of one at k = 64.
    # The last sweep's is then a pass of its own (``_settle_training_error``). Where that
    # residual is float32's (``_low_residual``), so are the predictions the error is of:
    # the RMSE is then good to about 1e-7 of the entries' scale, far below its value
    deferred = h_norm > 0
    v_full = None
    t0 = time.perf_counter()
    reason = "max_iters reached"
    for sweep in range(start, max_iters):
        t_sweep = time.perf_counter()
        contraction = _contraction(history)
        pending = deferred and bool(history) and history[-1]["train_rmse"] is None
        low = _low_residual(history)
        # "sweep" encloses its row solves and the factors' all-gathers, each timed apart so
        # a job's record shows what of a sweep does not shrink with more workers
        with ctx.timed("sweep"):
            with ctx.timed("factor-allgather"):
                u_full = _allgather_rows(ctx, u, row_blocks, k, ("u", sweep))
            with ctx.timed("row-solves"):
                every_r0 = last_error = None
                if pending:  # the last sweep's training error, from C's entries
                    every_r0, last_error = lsq.residual_and_error(
                        xp, v, u_full, *C, reg, low, plan_v and plan_v["every"])
                v, used_v, cond_u = _solve(xp, method, v, u_full, C, reg, cg_iters, k,
                                           seed + 2 * sweep, plan_v, stats_u, cond_u,
                                           contraction, every_r0, low)
            with ctx.timed("factor-allgather"):
                v_full = _allgather_rows(ctx, v, col_blocks, k, ("v", sweep))
            if sweep == 0:  # solved against U's orthonormal basis (``_initialise``)
                u, v, v_full = _balance(ctx, u, v, v_full, ("balance", sweep))
                # whose cond(UᵀU) of 1 says nothing of the balanced U's: no guess from it
                cond_u = None
            with ctx.timed("row-solves"):
                u, used_u, cond_v = _solve(xp, method, u, v_full, R, reg, cg_iters, k,
                                           seed + 2 * sweep + 1, plan_u, last=cond_v,
                                           contraction=contraction, low=low)
        for used in (used_v, used_u):  # the log says how rows were solved, summed over sweeps
            for solver, count in used.items():
                ctx.count(f"row-solves-{solver}", count)
        # with the errors, summed over the workers: whether each one's checkpoint write is done
        with ctx.timed("errors"):
            # and max |u| and UᵀU, as reading the errors syncs the device anyway: the next
            # V half-sweep's choice of solvers and its float16 operand then need no sync
            nothing = xp.zeros(())
            parts = [nothing if deferred else lsq.squared_error(xp, u, v_full, *R),
                     lsq.squared_error(xp, u, v_full, *held),
                     xp.asarray(float(save is None or save.ready())), _top(xp, u),
                     last_error if pending else nothing]
            if carry_gram_u:
                parts.append((u.T @ u).ravel())
            metrics = xp.concatenate([xp.ravel(part).astype(np.float64) for part in parts])
        with ctx.timed("metrics-exchange"):
            every = _host(xp, _exchange_small(ctx, metrics, ("metrics", sweep)))
        # each worker's row, in rank order: every worker adds the same numbers in the same
        # order, so all take the same stopping and solver decisions
        totals = every.sum(axis=0)
        t_err, h_err, ready = totals[:3]
        stats_u = {"top": float(every[:, 3].max())}
        if carry_gram_u:
            stats_u["gram"] = totals[5:].reshape(k, k)
        if pending:
            history[-1]["train_rmse"] = _rmse(totals[4], t_count)
        train_rmse = None if deferred else _rmse(t_err, t_count)
        held_rmse = float(np.sqrt(h_err / h_count)) if h_count else None
        # relative error on held-out entries (on the training entries when none are held out)
        rel = float(np.sqrt(h_err / h_norm)) if h_norm else float(np.sqrt(t_err / max(t_norm, 1e-300)))
        history.append({"sweep": sweep + 1, "train_rmse": train_rmse, "holdout_rmse": held_rmse,
                        "holdout_rel_error": rel, "seconds": round(time.perf_counter() - t0, 4),
                        # this sweep alone, its errors included and its checkpoint not
                        "sweep_seconds": round(time.perf_counter() - t_sweep, 4)})
        if save is not None and ready == ctx.control.size:
            save(sweep + 1, history, u, v)
        ctx.advance(1)
        # the newest training RMSE known: the last sweep's, where this one's is deferred
        known = train_rmse if not pending else history[-2]["train_rmse"]
        ctx.report({"iteration": sweep + 1, "holdout_error": rel, "train_rmse": known})
        stop = _stop_reason(history, tol)
        if stop is not None:
            reason = stop
            break
    ran = bool(history) and history[-1]["sweep"] > start  # the last sweep was this call's
    t_settle = time.perf_counter()
    if _settle_training_error(ctx, history, u, v, R, col_blocks, k, t_count,
                              v_full if ran else None) and ran:
        spent = time.perf_counter() - t_settle  # a pass of the last sweep's, timed as one
        history[-1]["seconds"] = round(history[-1]["seconds"] + spent, 4)
        history[-1]["sweep_seconds"] = round(history[-1]["sweep_seconds"] + spent, 4)
        ctx.report({"train_rmse": history[-1]["train_rmse"]})
    return u, v, history, reason


def _low_residual(history: list) -> bool:
    """Whether a sweep's solves may start from float32 residuals (``lsq.LOW_RESIDUAL``): while
    the held-out error is above LOW_RESIDUAL, and before the first sweep has measured it (a
    randomized-SVD start is rarely that close; where it is, the sweeps after the first take
    float64's residuals, whose accuracy the sweeps then reach). Never where LOW_RESIDUAL is
    None."""
    if lsq.LOW_RESIDUAL is None:
        return False
    return not history or history[-1]["holdout_rel_error"] > lsq.LOW_RESIDUAL


def _rmse(squared: float, count: float) -> float:
    return float(np.sqrt(squared / max(count, 1)))


def _settle_training_error(ctx, history, u, v, R, col_blocks, k, t_count, v_full=None) -> bool:
    """Fills in the training RMSE of the last sweep of ``history`` where it is still to come
    (``iterate`` defers it to the next sweep), by a pass over R, this worker's training
    entries by rows, against the factors that sweep left: u and v (this worker's rows), and
    all of V (v_full, where the caller has it gathered). Every worker takes part, or none:
    they share the history. Returns whether it made the pass."""
    if not history or history[-1]["train_rmse"] is not None:
        return False
    xp = ctx.xp
    if v_full is None:
        v_full = _allgather_rows(ctx, v, col_blocks, k, ("v", "settle"))
    local = lsq.squared_error(xp, u, v_full, *R).reshape(1)
    total = _host(xp, _exchange_small(ctx, local.astype(np.float64), "train-error")).sum()
    history[-1]["train_rmse"] = _rmse(float(total), t_count)
    return True


def _contraction(history: list):
    """The held-out error's ratio over the last sweep of ``history`` (None before two)."""
    if len(history) < 2 or not history[-2]["holdout_rel_error"] > 0:
        return None
    return history[-1]["holdout_rel_error"] / history[-2]["holdout_rel_error"]


def _stop_reason(history: list, tol: float) -> str | None:
    """Why the sweeps stop after the last one in ``history``, or None to go on."""
    if not history:
        return None
    rel = history[-1]["holdout_rel_error"]
    # with no entry held out, the error is measured on the training entries (``iterate``)
    which = "held-out" if history[-1].get("holdout_rmse") is not None else "training"
    if rel < tol:
        return f"{which} relative error {rel:.3g} < tol {tol:g}"
    if len(history) >= 4 and history[-4]["holdout_rel_error"] - rel < STAGNATION * rel:
        return f"no progress over 3 sweeps ({which} relative error {rel:.3g})"
    return None


# ------------------------------------------------------------------------------ solving
def _solve(xp, method, x, y, omega, reg, cg_iters, k, seed, plan=None, stats=None, last=None,
           contraction=None, every_r0=None, low=False):
    """One half-sweep: every row of x solved against the whole other factor y (``cg_iters``:
    the job's CG steps, or None for CG_STEPS; ``plan``: ``row_plan`` of omega, made here if
    not given; ``stats``: what of ``_stats_of`` y the caller has read already, the rest
    read here where needed; ``last``: cond(YᵀY) as the last half-sweep on this side found
    it, or None; ``contraction``: the held-out error's ratio over the last sweep, or None,
    for the CG rows' stop: ``cg_stop``; ``every_r0``: x's residual rows, every row's
    (``lsq.residual_and_error``), where the caller has them, else made here where the solves
    start from them, in float32 where ``low``: ``lsq.LOW_RESIDUAL``).
    Returns the new x, how many rows each solver took ({solver: rows}; "again": rows solved a
    second time after a wrong guess), and cond(YᵀY) (None where the solvers do not depend on
    it).

    Where they do, and the last half-sweep's factor was far from WELL_CONDITIONED, the rows
    are launched under its regime before cond(YᵀY) is known (``_guess``): the host's
    eigensolve (0.15 ms at k = 64, 0.65 ms at k = 128 on the H100's host, twice a sweep)
    then runs while the device solves, where it left the device idle
    (bench/complete_trace.py). A wrong guess is solved again under the right regime from
    the same x: the answer is the one an eigensolve first gives."""
    indptr, cols, vals = omega
    rows = int(indptr.size) - 1
    if method == "als":
        if every_r0 is None and lsq.refines_exact(xp, y):
            every_r0 = lsq.residual_and_error(xp, x, y, indptr, cols, vals, reg, low)[0]
        return (lsq.solve_exact(xp, y, indptr, cols, vals, reg, x0=x, r0=every_r0),
                {"exact": rows}, None)
    plan = row_plan(xp, indptr, k, method) if plan is None else plan
    stats = stats or {}
    started = None
    if conditioning_matters(plan) and "gram" not in stats:
        started = _stats_start(xp, y)
    # every row's residual, which the solves of either regime start from: the device runs
    # it while the host waits for YᵀY and eigensolves it. At rank <= 32 the light rows'
    # exact solves do not take it (``lsq.refines_exact``), and its pass over their entries
    # is lost, a pass over few entries (light rows)
    if every_r0 is None and lsq.starts_from_residual(xp, y):
        every_r0 = lsq.residual_and_error(xp, x, y, indptr, cols, vals, reg, low,
                                          plan["every"])[0]

    def solve(well, eig=None):  # the rows under one regime, with stats as they are then
        return _solve_rows(xp, method, x, y, omega, reg, cg_iters, k, seed, plan, well, stats,
                           eig, contraction, every_r0)

    if not conditioning_matters(plan):
        return (*solve(True), None)
    if started is not None:
        stats = _stats_of(started)
    guess = _guess(last)
    if guess is False and _needs_preconditioner(plan[False]):
        # the preconditioner needs YᵀY's eigendecomposition, which gives cond(YᵀY) too
        eig = np.linalg.eigh(stats["gram"])
        cond = _condition_of_eigenvalues(eig[0])
        return (*solve(cond <= WELL_CONDITIONED, eig), cond)
    if guess is None:
        cond = _condition_of(stats["gram"])
        return (*solve(cond <= WELL_CONDITIONED), cond)
    out, used = solve(guess)
    cond = _condition_of(stats["gram"])  # on the host, while the device solves
    if (cond <= WELL_CONDITIONED) != guess:
        out, used = solve(not guess)
        used["again"] = rows
    return out, used, cond


# A half-sweep guesses its factor's regime only where the last one on its side found
# cond(YᵀY) more than GUESS_MARGIN times from WELL_CONDITIONED. A wrong guess costs a
# half-sweep's solves (4 ms on MovieLens-sized data, H100), the eigensolve it hides 0.15 ms:
# guessing pays only if it is wrong less than once in 25. On the skewed MovieLens-sized
# problem one side's cond(YᵀY) stayed between 2 and 5.1 for ten sweeps and moved by up to
# 36% from one of its half-sweeps to the next (bench/complete_trace.py).
GUESS_MARGIN = 1.5


def _guess(last):
    """Whether to launch a half-sweep's rows as if its factor were well conditioned (True),
    or not (False), before knowing, from ``last``: None to know first."""
    if last is None or WELL_CONDITIONED / GUESS_MARGIN < last < WELL_CONDITIONED * GUESS_MARGIN:
        return None
    return last <= WELL_CONDITIONED


def _solve_rows(xp, method, x, y, omega, reg, cg_iters, k, seed, plan, well, stats, eig=None,
                contraction=None, every_r0=None):
    """The row solves of ``_solve`` under the row plan's regime ``well`` (``eig``: YᵀY's
    eigendecomposition, ``every_r0``: every row's residual, where the caller has them;
    ``contraction``: as ``_solve``'s). Returns the new x and {solver: rows}."""
    indptr, cols, vals = omega
    rows = int(indptr.size) - 1
    parts, splits = plan[well], plan["splits"][well]
    out, used = x, {}
    exact_rows = parts.get("exact")
    if exact_rows is not None and exact_rows.size:
        everything = exact_rows.size == rows
        solved = lsq.solve_exact(xp, y, indptr, cols, vals, reg,
                                 rows_subset=None if everything else exact_rows, x0=x,
                                 r0=every_r0)
        if everything:
            out = solved
        else:
            out = x.copy()
            out[exact_rows] = solved[exact_rows]
        used["exact"] = int(exact_rows.size)
    # the CG rows in one call: they share its preparation of y (lsq.solve_cg_groups)
    groups = []
    for solver in ("plain-cg-light", "plain-cg", "gram-cg"):
        subset = parts.get(solver)
        if subset is None or not subset.size:
            continue
        precond = whitening = None
        if solver == "gram-cg":
            whitening = gram_whitening(stats["gram"], y.shape[0], k, reg, eig)
            # on the host: a GPU that whitens never reads it
            precond = whitening[0] @ whitening[0].T
        # gram-cg rows are light rows: they take the light rows' steps
        steps = cg_steps(method, "plain-cg-light" if solver == "gram-cg" else solver, cg_iters)
        groups.append(lsq.cg_group(subset, steps, precond, splits.get(solver), whitening,
                                   cg_stop(method, solver, contraction)))
        name = "gram-cg" if solver == "gram-cg" else "plain-cg"
        used[name] = used.get(name, 0) + int(subset.size)
    if groups:
        out = lsq.solve_cg_groups(xp, out, y, indptr, cols, vals, reg, groups, stats.get("top"),
                                  every_r0)
    heavy_rows = parts.get("sketch")
    if heavy_rows is not None and heavy_rows.size:
        out = lsq.solve_sketch(xp, out, y, indptr, cols, vals, reg, heavy_rows,
                               cg_steps(method, "sketch", cg_iters), seed, top=stats.get("top"),
                               r0=every_r0)
        used["sketch"] = int(heavy_rows.size)
    return out, used


def _needs_preconditioner(parts) -> bool:
    """Whether a row plan's solvers of one regime include gram-cg (YᵀY's preconditioner)."""
    return "gram-cg" in parts and bool(parts["gram-cg"].size)


def _stats_start(xp, y):
    """What a half-sweep against the factor y needs to know of it on the host, in one device
    read, enqueued and not waited for: ``_stats_of`` waits and gives {"gram": YᵀY (its
    conditioning picks the solvers; gram-cg's preconditioner), "top": max |Y| (the float16
    operand's scale, ``rowsolve.operand``)}. The device work enqueued after it runs
    meanwhile."""
    packed = xp.concatenate([(y.T @ y).ravel(), _top(xp, y)])
    if xp is np:
        return packed, None, y.shape[1]
    host = dense.pooled_pinned(packed.shape, np.float64)
    stream = xp.cuda.get_current_stream()
    xp.cuda.runtime.memcpyAsync(host.ctypes.data, packed.data.ptr, packed.nbytes,
                                xp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
    return host, (stream.record(), packed), y.shape[1]


def _stats_of(started) -> dict:
    host, pending, k = started
    if pending is not None:
        pending[0].synchronize()  # the copy's event, not the work enqueued after it
    return {"gram": host[:k * k].reshape(k, k).copy(), "top": float(host[-1])}


def _top(xp, a):
    """max |a| as a 1-element array on a's device (0 for an empty a)."""
    return xp.abs(a).max().reshape(1) if a.size else xp.zeros(1, dtype=a.dtype)


# the solvers whose rows a row plan keeps a launch split for (``rowsolve.split_rows``)
CG_SOLVERS = ("plain-cg-light", "plain-cg", "gram-cg")


def row_plan(xp, indptr, k, method: str = "altmin-sketch") -> dict:
    """Which rows each solver of altmin-sketch takes, for a well-conditioned other factor
    (cond(YᵀY) <= WELL_CONDITIONED: key True) and for any other (False): {solver: row ids},
    the solvers "exact", "plain-cg-light" (light rows' CG steps), "gram-cg" (thin rows' steps
    preconditioned by YᵀY, ill conditioned only), and "plain-cg" (heavy rows, well
    conditioned) or "sketch" (heavy rows, otherwise). A row's degree does not change
    between sweeps, so ``iterate`` makes this once for each form of Ω: each half-sweep then
    only decides which of the two applies (three row selections, each a device sync, were
    a sixth of a MovieLens-sized sweep on an H100: bench/complete_bookkeeping.py). ``xp``
    decides the device, whose kernels set some thresholds. Under als-cg every row is
    "plain-cg". On a GPU the plan keeps each CG set's launch split too ("splits": {well:
    {solver: split}}), and every row's ("every"), which finding anew would cost a device
    sync a launch."""
    degree = xp.diff(indptr)
    gpu = xp is not np
    if method == "als-cg":
        every = xp.arange(degree.size)
        plan = {True: {"plain-cg": every}, False: {"plain-cg": every}}
    else:
        plan = _altmin_plan(xp, degree, k, gpu)
    plan["splits"] = {well: {solver: rowsolve.split_rows(xp, indptr, ids)
                             for solver, ids in plan[well].items()
                             if gpu and solver in CG_SOLVERS and ids.size}
                      for well in (True, False)}
    # every row's split, for the residual pass the solves start from (``_solve``)
    plan["every"] = rowsolve.split_rows(xp, indptr, xp.arange(degree.size)) if gpu else None
    return plan


def _altmin_plan(xp, degree, k, gpu) -> dict:
    plan = {}
    for well in (True, False):
        heavy = degree >= (heavy_degree(k) if well else sketch_degree(gpu, k))
        # rows below heavy_degree take CG steps where they are thin (exact solves there
        # amplify the other factor's error), or where the device makes them cheaper (against
        # a factor that is not well conditioned, rows up to sketch_degree are not heavy
        # either: from heavy_degree on those are solved exactly, as the sketch would cost more)
        light = degree < heavy_degree(k)
        iterated = ~heavy & ((degree < THIN_DEGREE * k)
                             | (light & light_rows_iterative(gpu, k, well)))
        # against an ill-conditioned factor, plain steps leave its weak directions unsolved:
        # rows the data determine well enough take steps preconditioned by its Gram
        whitened = iterated & (degree >= GRAM_CG_DEGREE * k) & (not well)
        plan[well] = {"exact": xp.nonzero(~heavy & ~iterated)[0],
                      "plain-cg-light": xp.nonzero(iterated & ~whitened)[0],
                      "gram-cg": xp.nonzero(whitened)[0],
                      "plain-cg" if well else "sketch": xp.nonzero(heavy)[0]}
    return plan


def gram_preconditioner(gram, n: int, k: int, reg: float, eig=None):
    """The preconditioner of "gram-cg" rows: the inverse of what such a row's Gram matrix
    would be if its columns were sampled evenly, (d/n)·YᵀY + reg·I (``gram``: YᵀY, Y n × k;
    ``eig``: its ``np.linalg.eigh``, where the caller has it), at d halfway through their
    degrees. Eigenvalues below 1e-12 of the largest are raised to it: a factor of lower rank
    still gets a positive definite preconditioner."""
    w, _ = gram_whitening(gram, n, k, reg, eig)
    return w @ w.T


def gram_whitening(gram, n: int, k: int, reg: float, eig=None):
    """``gram_preconditioner`` as W·Wᵀ, with WᵀW = diag(s): (W, s), W = Q·D^-½ from the
    eigendecomposition Q·D·Qᵀ of (d/n)·YᵀY + reg·I. Against Y·W the preconditioned steps
    are plain ones (``lsq.solve_cg_groups``)."""
    degree = (GRAM_CG_DEGREE + THIN_DEGREE) / 2 * k
    evals, evecs = np.linalg.eigh(np.asarray(gram)) if eig is None else eig
    evals = np.asarray(evals) * (degree / n) + reg
    evals = np.maximum(evals, evals[-1] * 1e-12 if evals[-1] > 0 else 1.0)
    return evecs / np.sqrt(evals), 1.0 / evals


def conditioning_matters(plan) -> bool:
    """Whether a ``row_plan`` gives any row another solver against an ill-conditioned factor
    than against a well-conditioned one: where it does not (all rows thin, say: MovieLens's
    users at k = 64), a half-sweep need not know cond(YᵀY). The plan's sets are cut by degree
    at thresholds that only move one way, so equal sizes are equal sets."""
    def sizes(parts):
        return {solver: int(rows.size) for solver, rows in parts.items() if rows.size}
    return sizes(plan[True]) != sizes(plan[False])


def cg_steps(method: str, solver: str, asked: int | None = None) -> int:
    """CG steps a row solved by ``solver`` takes under ``method``: the job's cg_iters if it
    set one, else CG_STEPS."""
    return asked or CG_STEPS[(method, solver)]


def cg_stop(method: str, solver: str, contraction) -> tuple | None:
    """The stop (firm, ratio) of the CG rows ``solver`` takes under ``method`` (CG_STOP), or
    None: all their steps. ``contraction``: the held-out error's ratio over the last sweep
    (None before two sweeps)."""
    rule = CG_STOP.get((method, solver))
    if rule is None or contraction is None:
        return None
    firm, cap = rule
    return firm, min(cap, FORCING * contraction)


def heavy_degree(k: int) -> int:
    """Observations from which a row is heavy (solved iteratively) at rank k. The job's plan
    states the same rule."""
    return HEAVY_DEGREE * k


def sketch_degree(gpu: bool, k: int) -> int:
    """Observations from which a row gets the sketch (where plain CG would not do):
    heavy_degree(k), but SMALL_RANK_SKETCH_DEGREE·k where the fused exact solve runs at rank
    <= FUSED_EXACT_MAX_RANK. The job's plan calls this too."""
    if rowsolve.runs(gpu, k) and k <= FUSED_EXACT_MAX_RANK:
        return SMALL_RANK_SKETCH_DEGREE * k
    return heavy_degree(k)


def light_rows_iterative(gpu: bool, k: int, well: bool = True) -> bool:
    """Whether light rows (below heavy_degree, and not thin: THIN_DEGREE) get CG steps, not
    the exact solve, in a half-sweep whose other factor is well conditioned (``well``: plain
    ones) or not ("gram-cg"): on a GPU with the warp-row kernels, and against an
    ill-conditioned factor only past rank FUSED_EXACT_MAX_RANK.
    There CG_STEPS' 4 steps from the last sweep's value cost a seventh of the exact solve
    (MovieLens-20M-sized rows of 145 and 750 at k = 64, H100: 0.009 against 0.064 s a sweep)
    and, on planted matrices of 2 to 11k observations a row (NumPy, 12 sweeps), left a held-out
    error as low as exact solves did or lower (6.5e-3 against 7.6e-3 at MovieLens's shape,
    k = 64); with 2 steps a row of 4k lost two sweeps in twelve. On the CPU the batched exact
    solve costs less than the CG steps' gathers. Against an ill-conditioned factor, a row the
    sampling gave a weak direction of its own that the factor's Gram matrix does not have
    is not helped by that preconditioner: on a planted κ = 100 matrix (10⁶ rows of 300,
    k = 16, H100) one such column of 253 observations (its Y_Ωi of condition 125) stayed
    4.5 from its solution sweep after sweep, and the held-out error stalled at 1.2e-3 where
    exact solves reached 1e-4 in 9 sweeps. At rank <= 32 the fused exact solve is cheap:
    those rows get it. The job's plan calls this too."""
    return rowsolve.warp_runs(gpu, k) and (well or k > FUSED_EXACT_MAX_RANK)


def _condition_of(gram) -> float:
    """Condition number of a symmetric positive semidefinite matrix on the host."""
    return _condition_of_eigenvalues(np.linalg.eigvalsh(gram))


def _condition_of_eigenvalues(evals) -> float:
    """Condition number from a symmetric positive semidefinite matrix's eigenvalues, ascending."""
    return float(evals[-1] / evals[0]) if evals[0] > 0 else float("inf")


# ---------------------------------------------------------------------- initialisation
# The randomized SVD's power iterations, each two sparse products. One instead of two saved
# a quarter of the start (57 against 82 ms at n = 10⁵, k = 64, 3000 a row, H100) but cost a
# sweep to 1e-4 on planted matrices at κ = 1 (k = 16, 64, 128; n = 10⁶), and on a
# MovieLens-sized one the sweeps from it made no progress (bench/complete_rules.py
# --variants power2,power1; BENCHMARKS.md, twenty-first session).
POWER_ITERATIONS = 2


def _initialise(ctx, R, C, shape, k, row_blocks, col_blocks, seed):
    """Top-k subspaces of the rescaled observed matrix by a randomized SVD (sparse products
    only); returns this worker's rows of U·s, clipped for incoherence, and of V·Σ/s (the
    warm start of the first V solve, for the methods that take one), s² the geometric mean
    of Σ. The first V solve is against U's orthonormal basis, as the paper's: an exact solve
    gets the same product from any basis, and an iterative one converges fastest against
    this one. The estimate's Σ is spread by sampling noise: with U·Σ^½, cond(YᵀY) = σ₁/σ_k
    was past WELL_CONDITIONED on a planted κ = 1 matrix (10⁶ rows of 300, k = 16): its first
    half-sweep was solved exactly, and the first sweep cost what two later ones do.
    ``_balance`` then splits the product's scale evenly between the factors."""
    xp = ctx.xp
    m, n = shape
    width = min(k + 8, m, n)
    counts = sum(_gather(ctx, np.array([float(R[2].size)]), "init-count"))
    scale = (m * n) / max(counts[0], 1.0)  # 1 / observed fraction
    rows_shape, cols_shape = (int(R[0].size) - 1, n), (int(C[0].size) - 1, m)
    # The products in float32, each passing half the bytes of float64: this is only the start
    # of the sweeps, and it is orthonormalised in float64 after every two products, across
    # which a direction falls by at most κ² against the strongest (1e-4 at κ = 100), against
    # float32's 6e-8.
    low = np.float32
    rows_vals, cols_vals = (R[2] * scale).astype(low), (C[2] * scale).astype(low)

    def rows_mat(x):
        return lsq.spmm(xp, R[0], R[1], rows_vals, x.astype(low), rows_shape).astype(np.float64)

    def cols_mat(x):
        return lsq.spmm(xp, C[0], C[1], cols_vals, x.astype(low), cols_shape).astype(np.float64)

    # drawn where it is used: 10⁵ × 72 normals cost 0.13 s on the host and its upload 0.04 s,
    # against 1 ms on an H100 (every worker draws the same ones from the seed)
    gauss = xp.random.default_rng(seed).standard_normal((n, width))
    y = rows_mat(gauss)
    for power in range(POWER_ITERATIONS):
        y = _cholesky_qr(ctx, y, ("init-qr", power))
        z = cols_mat(_allgather_rows(ctx, y, row_blocks, width, ("init-y", power)))
        y = rows_mat(_allgather_rows(ctx, z, col_blocks, width, ("init-z", power)))
    q = _cholesky_qr(ctx, y, "init-qr-final")
    bt = cols_mat(_allgather_rows(ctx, q, row_blocks, width, "init-q"))  # this worker's rows of Bᵀ
    gram = sum(_gather(ctx, _host(xp, bt.T @ bt), "init-gram"))
    evals, evecs = np.linalg.eigh(gram)
    top = np.argsort(evals)[::-1][:k]
    sigma = np.sqrt(np.maximum(evals[top], 0))
    s = float(np.exp(0.5 * np.mean(np.log(np.maximum(sigma, 1e-300)))))
    u = q @ xp.asarray(evecs[:, top] * s)  # U·s of the estimate
    # M ≈ Q·B with B = E Σ Wᵀ (Bᵀ = bt): V·Σ/s = W Σ / s = Bᵀ E / s
    v = bt @ xp.asarray(evecs[:, top] / s)
    # clip rows heavier than twice the root-mean-square row norm (incoherence)
    norms = xp.sqrt((u * u).sum(axis=1))
    total = sum(_gather(ctx, np.array([float((norms * norms).sum())]), "init-norm"))
    limit = 2.0 * np.sqrt(total[0] / m)
    factor = xp.minimum(1.0, limit / xp.maximum(norms, 1e-300))
    ctx.count("init-rows-clipped", int((factor < 1).sum()))
    return u * factor[:, None], v


def _balance(ctx, u, v, v_full, tag):
    """u, v (this worker's rows) and v_full times k×k matrices that leave U·Vᵀ as it is and
    make UᵀU = VᵀV = S, the product's singular values: each factor then carries the square
    root of its scale, and cond(YᵀY) is σ₁/σ_k in either half-sweep. From the Cholesky
    factors R_u, R_v of the two Gram matrices and the SVD R_u R_vᵀ = P S Qᵀ: U R_u⁻¹ P S^½
    and V R_v⁻¹ Q S^½. Left as they are where a Gram matrix is singular."""
    xp = ctx.xp
    gu = sum(_gather(ctx, _host(xp, u.T @ u), tag))
    gv = _host(xp, v_full.T @ v_full)
    try:
        ru = np.linalg.cholesky(gu + 1e-14 * np.trace(gu) * np.eye(len(gu))).T
        rv = np.linalg.cholesky(gv + 1e-14 * np.trace(gv) * np.eye(len(gv))).T
    except np.linalg.LinAlgError:
        return u, v, v_full
    p, s, qt = np.linalg.svd(ru @ rv.T)
    tu = xp.asarray(np.linalg.solve(ru, p) * np.sqrt(s)[None, :])
    tv = xp.asarray(np.linalg.solve(rv, qt.T) * np.sqrt(s)[None, :])
    return u @ tu, v @ tv, v_full @ tv


def _cholesky_qr(ctx, y, tag):
    """Orthonormal columns for a tall matrix split by rows over the workers (CholeskyQR2)."""
    xp = ctx.xp
    for step in range(2):
        gram = sum(_gather(ctx, _host(xp, y.T @ y), (tag, step)))
        gram += 1e-14 * np.trace(gram) * np.eye(gram.shape[0])
        chol = np.linalg.cholesky(gram)
        y = y @ xp.asarray(np.linalg.inv(chol).T)
    return y


# ------------------------------------------------------------------------- moving data
def _load_omega(ctx, path, row_block, col_block, col_blocks, shape, holdout, seed):
    """This worker's training entries by rows (R) and by columns (C), and its held-out entries
    by rows (H), as (indptr, indices, values) on its device. Only the decoding is done on the
    host: splitting and sorting there took 17 s of a 27 s job at 3.4e7 entries (2× H200)."""
    xp = ctx.xp
    (r0, r1), (c0, c1), (m, n) = row_block, col_block, shape
    with ctx.timed_host("read"):
        local = sparse.read_csr(path, rows=(r0, r1))
        _check_finite(path, local, r0)
    with ctx.timed_host("exchange-omega"):
        indptr = dense.upload(xp, local.indptr, np.int64)
        cols = dense.upload(xp, local.indices, np.int64)
        vals = dense.upload(xp, local.data, np.float64)
        del local
        rows = lsq.row_ids(xp, indptr) + r0
        held = holdout_mask(xp, rows, cols, holdout, seed)
        H = sorted_csr(xp, rows[held] - r0, cols[held], vals[held], r1 - r0, n)
        keep = ~held
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        del held, keep
        R = sorted_csr(xp, rows - r0, cols, vals, r1 - r0, n)
        mine = _scatter_by_columns(ctx, rows, cols, vals, col_blocks)
        del rows, cols, vals
        C = sorted_csr(xp, mine[1] - c0, mine[0], mine[2], c1 - c0, m)  # (column, row) pairs
    _check_nonempty(xp, R, r0, "row")
    _check_nonempty(xp, C, c0, "column")
    return R, C, H


def _allgather_rows(ctx, block, blocks, width, tag):
    """The whole factor (all workers' row blocks stacked), k (or width) columns wide."""
    comm, xp = ctx.comm, ctx.xp
    block = xp.ascontiguousarray(block)
    if comm.size == 1:  # the block is the whole: no copy of it (a factor, twice a sweep)
        return block
    peers = [p for p in range(comm.size) if p != comm.rank]
    got = comm.start([(block, p, ("factor", tag)) for p in peers],
                     [(p, ("factor", tag), (blocks[p][1] - blocks[p][0], width), block.dtype)
                      for p in peers]).wait()
    parts = dict(zip(peers, got))
    parts[comm.rank] = block
    return xp.concatenate([xp.asarray(parts[p]) for p in range(comm.size)], axis=0)


def _scatter_by_columns(ctx, rows, cols, vals, col_blocks):
    """Send each worker the (row, column, value) triples of its column block, device to device;
    returns this worker's, from everyone (once, at setup)."""
    xp, comm = ctx.xp, ctx.comm
    ends = xp.asarray(np.array([b[1] for b in col_blocks], dtype=np.int64))
    owner = xp.searchsorted(ends, cols, side="right")
    picks = {p: xp.nonzero(owner == p)[0] for p in range(comm.size)}
    del owner
    # how many each worker sends each other: the receives must name their shapes
    counts = _gather(ctx, [int(picks[p].size) for p in range(comm.size)], "omega-counts")
    peers = [p for p in range(comm.size) if p != comm.rank]
    sends, recvs = [], []
    for p in peers:
        for name, part in (("rows", rows), ("cols", cols), ("vals", vals)):
            if picks[p].size:
                sends.append((part[picks[p]], p, ("omega-by-columns", name)))
            if counts[p][comm.rank]:
                recvs.append((p, ("omega-by-columns", name), (counts[p][comm.rank],), part.dtype))
    got = iter(comm.start(sends, recvs).wait())
    parts = [tuple(part[picks[comm.rank]] for part in (rows, cols, vals))]
    parts += [tuple(xp.asarray(next(got)) for _ in range(3)) for p in peers
              if counts[p][comm.rank]]
    return tuple(xp.concatenate([part[i] for part in parts]) for i in range(3))


def sorted_csr(xp, rows, cols, vals, nrows, ncols):
    """(indptr, indices, values) on ``xp``'s device, rows sorted and columns sorted within
    rows. Sorted there, by one key (NumPy's lexsort of two keys took 8 s for 3.4e7 entries)."""
    rows, cols, vals = (dense.upload(xp, a) for a in (rows, cols, vals))
    key = rows * ncols + cols  # below 2⁶³ while m·n is
    if key.size > 1 and not bool((key[1:] >= key[:-1]).all()):
        order = xp.argsort(key)
        rows, cols, vals = rows[order], cols[order], vals[order]
    del key
    indptr = xp.searchsorted(rows, xp.arange(nrows + 1, dtype=rows.dtype)).astype(np.int64)
    return indptr, cols.astype(np.int64, copy=False), vals


def _check_finite(path, local, r0):
    # one NaN spreads through every factor it touches, and the solves then fail far from it
    # (an eigensolver that does not converge)
    bad = np.flatnonzero(~np.isfinite(local.data))
    if bad.size:
        i = int(bad[0])
        row = r0 + int(np.searchsorted(local.indptr[1:], i, side="right"))
        raise ValueError(f"{path}: the observed entry at row {row}, column "
                         f"{int(local.indices[i])} is {local.data[i]} ({bad.size} non-finite "
                         f"entries here); observed values must be finite numbers: drop or fix "
                         f"those entries")


def _check_nonempty(xp, omega, base, what):
    empty = xp.nonzero(xp.diff(omega[0]) == 0)[0]
    if empty.size:
        raise ValueError(f"{what} {base + int(empty[0])} of the observed matrix has no observed "
                         f"entries left for training ({empty.size} such {what}s here); its factor "
                         f"is undetermined: drop those {what}s, observe more entries, or lower "
                         f"params.holdout")


def _host(xp, a):
    return a if xp is np else xp.asnumpy(a)


def _exchange_small(ctx, a, tag):
    """Every worker's 1-d array ``a`` (same length everywhere) as the rows of one array, in
    rank order, on the data transport: device to device on GPUs, where the host transport
    (the Ray object store) took 3.4 ms a sweep on two GPUs for a few numbers
    (bench/complete_gpus.py)."""
    # each worker's array is a one-row block of a factor-like matrix, gathered as the factors
    one_row_each = [(p, p + 1) for p in range(ctx.comm.size)]
    return _allgather_rows(ctx, a.reshape(1, -1), one_row_each, a.size, tag)


def _gather(ctx, value, tag) -> list:
    """Every worker's ``value`` (a small host object), in rank order."""
    control = ctx.control
    peers = [p for p in range(control.size) if p != control.rank]
    # boxed: an array sent bare would go as a typed buffer, which a shapeless receive refuses
    got = control.start([([value], p, ("gather", tag)) for p in peers],
                        [(p, ("gather", tag), None, None) for p in peers]).wait()
    out = {p: box[0] for p, box in zip(peers, got)}
    out[control.rank] = value
    return [out[p] for p in range(control.size)]


# --------------------------------------------------------------------------- checkpoints
def _prepare_checkpoint(ctx, path, signature) -> None:
    """Rank 0 makes a fresh checkpoint unless one of this very job (same signature) exists:
    a Zarr group whose attributes say which slot was committed last, and beside them each
    worker's blocks of U and V in each slot (``_block_file``)."""
    if ctx.control.rank == 0:
        try:
            fresh = zarr.open_group(store=path, mode="r").attrs.get("signature") != signature
        except Exception:
            fresh = True
        if fresh:
            group = zarr.open_group(store=path, mode="w")
            group.attrs["signature"] = signature
    ctx.control.barrier(("checkpoint-ready", str(path)))


def _block_file(path, name, slot, block) -> str:
    """A worker's block of factor ``name`` in a checkpoint slot: its rows' float64 values, raw.
    Raw, not a Zarr array: the write runs beside the sweeps (``Checkpoints``), and Zarr's chunk
    encoding holds the GIL (a 128 MB array's copies: the sweeps ran at half speed); a file's
    write releases it. A resumed job has the same blocks (they are in its signature)."""
    return os.path.join(path, f"{name}{slot}-{block[0]}-{block[1]}.f8")


class Checkpoints:
    """Each checkpoint written in a background thread while the next sweeps run: at n = 10⁶
    a checkpoint took several sweeps' time. A write goes to the slot not committed last, and
    is committed (made the state a resume reads, by rank 0's one write of the attributes) when
    the next one starts. ``iterate`` starts one after a sweep only once every worker's last
    write is done (``ready``), so a checkpoint lags the sweeps by one or more; a resumed run
    repeats those sweeps, which are deterministic, and ends as the uninterrupted one would.
    The factors are copied into host buffers of this object's own before the write starts."""

    def __init__(self, ctx, path, signature, row_block, col_block):
        self.ctx, self.path, self.signature = ctx, path, signature
        self.row_block, self.col_block = row_block, col_block
        self.slot = 1 - int(zarr.open_group(store=path, mode="r").attrs.get("latest", 1))
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mx-checkpoint")
        self.pending = None  # (iteration, history, slot, future) of the write in flight
        self.buffers = None

    def ready(self) -> bool:
        """Whether this worker has no write in flight."""
        return self.pending is None or self.pending[3].done()

    def __call__(self, iteration, history, u, v):
        """Commit the last write (every worker's is done: ``ready`` on all of them) and start
        writing u and v, the state after sweep ``iteration``."""
        with self.ctx.timed_host("checkpoint"):
            self._commit()
            if self.buffers is None:
                self.buffers = tuple(dense.empty_host(a.shape, np.float64, pinned=self.ctx.gpu)
                                     for a in (u, v))
            for block, buffer in zip((u, v), self.buffers):
                _copy_to_host(self.ctx.xp, block, buffer)
            future = self.pool.submit(self._write, self.slot, *self.buffers)
            if self.ctx.control.rank == 0:  # counters are summed over the workers
                self.ctx.count("checkpoints-started")
            self.pending = (iteration, list(history), self.slot, future)
            self.slot = 1 - self.slot

    def close(self, raise_errors=True):
        """Wait for the write in flight, which stays uncommitted (the sweeps have ended: the
        output is written next and the checkpoint removed), and stop the thread."""
        try:
            if self.pending is not None and raise_errors:
                self.pending[3].result()
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, slot, u, v):
        for name, block, values in (("u", self.row_block, u), ("v", self.col_block, v)):
            with open(_block_file(self.path, name, slot, block), "wb") as f:
                f.write(memoryview(values).cast("B"))

    def _commit(self):
        if self.pending is None:
            return
        iteration, history, slot, future = self.pending
        self.pending = None
        future.result()  # this worker's write, done: its error, if any, is raised here
        control = self.ctx.control
        if control.rank == 0:
            # one write of zarr.json: attrs.update writes once per key, and a kill between
            # those writes left "iteration" ahead of "history"
            zarr.open_group(store=self.path, mode="r+").update_attributes(
                {"latest": slot, "iteration": iteration, "history": history,
                 "signature": self.signature})
        # the next write goes to the slot committed before this one: not before it is superseded
        control.barrier(("checkpointed", iteration))


def _copy_to_host(xp, block, buffer):
    if xp is np:
        np.copyto(buffer, block)
    else:
        xp.ascontiguousarray(block, dtype=np.float64).get(out=buffer)


def _resume(path, signature, row_block, col_block):
    try:
        group = zarr.open_group(store=path, mode="r")
        attrs = dict(group.attrs)
    except Exception:
        return None
    if attrs.get("signature") != signature or "latest" not in attrs:
        return None
    slot, k = attrs["latest"], signature["rank"]
    try:
        u, v = (np.fromfile(_block_file(path, name, slot, block), dtype=np.float64)
                .reshape(block[1] - block[0], k)
                for name, block in (("u", row_block), ("v", col_block)))
    except (OSError, ValueError):  # a committed slot is whole: this one was damaged since
        return None
    return {"u": u, "v": v, "iteration": int(attrs["iteration"]), "history": list(attrs["history"])}
