"""Algorithm-based fault tolerance for GEMM (``params: {verify: abft}``).

A worker's C block carries running checksums: after products A_1·B_1 + ... + A_t·B_t, C·[e, w]
must equal the sum of A_s·(B_s·[e, w]) to within the rounding bound, row by row, where e is all
ones and w a second weight vector (1..7, cycling) that catches errors cancelling inside a row's
plain sum. Each product adds its share to the expected checksums, at the cost of one pass over
its B and one over its A, and is then accumulated into C in place by cuBLAS. C itself is checked
once, after its last product: one pass over C per block, however many rounds or panels made it.
(Checking C after every product cost a pass over C per product, 9–24% of a bf16 product.)

A row that fails has a corrupted element somewhere in its sum. Where C came from a single product
whose inputs are still at hand (one round, one panel), the failing rows are recomputed and
checked again. Otherwise a row of C cannot be rebuilt from the blocks at hand, which have moved
on to other workers: the check raises ``ChecksumError``, a ``DeviceFault``, and the job retries
the step from its stored inputs on fresh workers (``max_retries``). A row that fails again after
its recompute fails the task with a message naming the worker.

On CuPy the passes over the inputs and the check are RawKernels that read the stored precision
(bf16 bit patterns included) and accumulate in float32 (float64 for fp64). A product whose
blocks come straight from the host (a Cannon worker's first round, every streamed slab) takes
its share in ``to_device``: for bf16 the kernels that round A and B compute it from the values
they write, and the only pass ABFT adds is the check of C.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mx.errors import DeviceFault
from mx.kernels import gemm, precision as prec
from mx.kernels.precision import UNIT_ROUNDOFF, as_float, output_dtype

# For tests and drills: MX_FAULT="abft:<gang rank>:<round>" corrupts that product. With
# MX_FAULT_ONCE=<path> only the first process to create that file corrupts it (a retried step's
# fresh workers then compute correctly).
FAULT_ENV = "MX_FAULT"
FAULT_ONCE_ENV = "MX_FAULT_ONCE"
W_MAX = 7.0  # the largest weight in w


class ChecksumError(DeviceFault):
    pass


def planned_fault(rank: int) -> set[int]:
    spec = os.environ.get(FAULT_ENV, "")
    rounds = set()
    for item in filter(None, spec.split(",")):
        kind, who, when = item.split(":")
        if kind == "abft" and int(who) == rank:
            rounds.add(int(when))
    return rounds


def _claim_fault() -> bool:
    """Whether this planned fault may fire (always, unless a once-file is named and exists)."""
    marker = os.environ.get(FAULT_ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def weights(n: int, dtype=np.float64) -> np.ndarray:
    """The n×2 checksum weights [e, w], w_j = 1 + j mod 7 (exact in every precision)."""
    j = np.arange(n)
    return np.stack([np.ones(n), 1.0 + j % 7], axis=1).astype(dtype)


@dataclass
class Checks:
    """The running checksums of one C block that starts at zero (plain data)."""

    # rows×3 on the block's device: C·[e, w] as the inputs say it must be, and each row's
    # magnitude, the sum over products of |A|'s row abs-sum times B's largest row abs-sum (which
    # bounds the row of |A|·|B|): the rounding bound is per row, so a small row is checked as
    # tightly as its own size allows
    expect: object
    depth: int = 0  # sum of the products' inner lengths
    products: int = 0
    only: tuple | None = None  # (a, b) while C is a single product: its rows can be recomputed


def start(xp, c, precision: str) -> Checks:
    return Checks(expect=xp.zeros((c.shape[0], 3), dtype=output_dtype(precision)))


def row_checks(xp, x, v, precision: str):
    """(x·v, max row abs-sum of x as a 1-element array) for a block as stored (bf16 bits
    widened), v = None for the weights [e, w]; accumulated in the precision's float type."""
    if xp is not np:
        return _row_checks_cupy(x, v, precision)
    xf = np.asarray(as_float(np, x, precision))
    y = xf @ (weights(xf.shape[1], xf.dtype) if v is None else v)
    return y, np.array([np.abs(xf).sum(axis=1).max() if xf.size else 0.0], y.dtype)


def add_checks(xp, a, bv, b_abs, expect, precision: str) -> None:
    """A product's share of C's running checksums: ``expect[:, :2] += a·bv`` and
    ``expect[:, 2] += (row abs-sums of a)·b_abs``, in one pass over a."""
    if xp is not np:
        _row_checks_cupy(a, bv, precision, expect, b_abs)
        return
    af = np.asarray(as_float(np, a, precision))
    expect[:, :2] += af @ bv
    expect[:, 2] += np.abs(af).sum(axis=1) * b_abs[0]


def to_device(xp, a_host, b_host, precision: str, checks: Checks | None,
              counters: dict | None = None):
    """A product's host blocks as the device arrays it multiplies (``precision.to_device``),
    with the product's share of C's running checksums added to ``checks`` (when given) on the
    way: ``accumulate`` then takes no checks for this product. Where the blocks are rounded to
    bf16 on the GPU, the rounding kernels compute the share from the values they write, so the
    passes over A and B cost no reads beyond the conversion itself (as separate passes they
    cost 4–5% of a bf16 product at 16384³)."""
    if checks is not None and xp is not np and precision == "bf16":
        b, bv, b_abs = _convert_checks_cupy(b_host, None, None, None)
        a, _, _ = _convert_checks_cupy(a_host, bv, checks.expect, b_abs)
        _counted(checks, a, b, counters)
        return a, b
    a, b = prec.to_device(xp, a_host, precision), prec.to_device(xp, b_host, precision)
    if checks is not None:
        _add_product(xp, a, b, precision, checks, counters)
    return a, b


def _add_product(xp, a, b, precision: str, checks: Checks, counters: dict | None) -> None:
    """A product's share of C's running checksums, by a pass over B and one over A."""
    bv, b_abs = row_checks(xp, b, None, precision)
    add_checks(xp, a, bv, b_abs, checks.expect, precision)
    _counted(checks, a, b, counters)


def _counted(checks: Checks, a, b, counters: dict | None) -> None:
    checks.depth += a.shape[1]
    checks.products += 1
    checks.only = (a, b) if checks.products == 1 else None
    if counters is not None:
        counters["abft-products"] = counters.get("abft-products", 0) + 1


def accumulate(xp, c, a, b, precision: str, checks: Checks | None, counters: dict | None = None,
               corrupt: bool = False) -> None:
    """``c += a @ b`` in place; with ``checks`` (ABFT on), the product's share of C's checksums
    is added to them first. ``corrupt`` (drills) spoils one element of the product."""
    if checks is not None:
        _add_product(xp, a, b, precision, checks, counters)
    gemm.accumulate(xp, c, a, b, precision)
    if corrupt and c.size and _claim_fault():
        # well past any rounding bound: 1e3 × the largest row of |A|·|B|
        a_abs, b_abs = (float(xp.abs(as_float(xp, x, precision)).sum(axis=1).max()) for x in (a, b))
        c[(0,) * c.ndim] += 1e3 * (a_abs * b_abs + 1.0)


def tolerance(checks: Checks, n: int, precision: str) -> tuple[float, float]:
    """(factor, floor): a row's weighted sums may miss by factor × its magnitude + floor. The
    factor covers each product's k-term sums, the additions into C and the checksums' own sums;
    the floor, the same count of roundings among subnormal numbers."""
    terms = 4.0 * (checks.depth + n + checks.products + 2) * W_MAX
    floor = terms * float(np.finfo(output_dtype(precision)).smallest_subnormal)
    return terms * UNIT_ROUNDOFF[precision], floor


def verify(xp, c, checks: Checks, precision: str, counters: dict, label: str) -> int:
    """Check C against its running checksums once its products are all in; returns the number of
    rows recomputed. Raises ``ChecksumError`` where failing rows cannot be rebuilt here."""
    counters["abft-checked"] = counters.get("abft-checked", 0) + 1
    tol, floor = tolerance(checks, c.shape[1], precision)
    bad = failing_rows(xp, c, checks.expect, tol, floor)
    if bad.size == 0:
        return 0
    if checks.only is None:
        raise ChecksumError(
            f"{label}: {int(bad.size)} of {c.shape[0]} rows of its C block failed their ABFT "
            f"checksums after {checks.products} products: a product was corrupted (the inputs may "
            f"hold NaN/Inf, or the device is faulty)")
    # a single product into a zero block: recompute only the failing rows and check them again
    a, b = checks.only
    redo = xp.empty((bad.size, c.shape[1]), dtype=c.dtype)
    gemm.accumulate(xp, redo, xp.ascontiguousarray(a[bad]), b, precision, beta=0.0)
    still = failing_rows(xp, redo, checks.expect[bad], tol, floor)
    if still.size:
        raise ChecksumError(f"{label}: block product failed its checksums twice "
                            f"({int(still.size)} of {c.shape[0]} rows off); "
                            f"the inputs may hold NaN/Inf or the device is faulty")
    c[bad] = redo
    counters["abft-recomputed"] = counters.get("abft-recomputed", 0) + 1
    return int(bad.size)


def failing_rows(xp, p, expect, tol: float, floor: float = 0.0):
    """Rows of p whose weighted sums miss ``expect[:, :2]`` by more than tol × ``expect[:, 2]``
    (the row's magnitude) + floor, as an index array."""
    if xp is not np:
        return _failing_rows_cupy(p, expect, tol, floor)
    got = p @ weights(p.shape[1], p.dtype)
    bound = tol * expect[:, 2:].astype(np.float64) + floor
    ok = (np.abs(got.astype(np.float64) - expect[:, :2]) <= bound).all(axis=1)  # NaN fails
    return np.flatnonzero(~ok)


# ---------------------------------------------------------------------------------- CuPy
# One kernel makes every pass (over B, over A, the check of C): blocks of THREADS take ROWS rows
# each, in 16-byte loads where rows allow. X is the stored block (bf16 bit patterns, float or
# double), A the accumulator type. The weights [e, w] are made from the column index, so the
# passes over B and C read nothing but the block; the pass over A reads the k×2 vector B·[e, w]
# from L2. Measured on an H100 (scratch probes, 2026-11-23), 64–512 threads and 4–16 rows a
# block moved bandwidth by under 10%; issuing a block's ROWS loads together gained 10%.
THREADS = 256
ROWS = 8
_SOURCE = r"""
#define VEC ((int)(16 / sizeof(X)))

// y[r] = x[r,:]·v (v = [e, w] when null) and absmax = max over rows of sum |x[r,:]|; or, with
// scale, the running checksums y[r] (3 wide) += (x[r,:]·v, scale · sum |x[r,:]|). A block
// takes ROWS rows, so each chunk of v is loaded once for all of them. Compiled with CONVERT
// (X float), x is also rounded to bf16 into out, and the sums are of the rounded values.
extern "C" __global__ void mx_abft_row_checks(const X* x, long long rows, int cols, int vector,
                                              const A* v, A* y, A* absmax, const A* scale,
                                              unsigned short* out) {
    __shared__ A shared[THREADS / 32][3 * ROWS];
    long long r0 = (long long)blockIdx.x * ROWS;
    int nr = (int)min((long long)ROWS, rows - r0);
    A s[3 * ROWS];
#pragma unroll
    for (int i = 0; i < 3 * ROWS; ++i) s[i] = 0;
    const X* base = x + (size_t)r0 * cols;
    int step = vector ? VEC : 1;
    for (int j0 = threadIdx.x * step; j0 < cols; j0 += THREADS * step) {
        A v0[VEC], v1[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            int j = j0 + e;
            bool in = e < step;
            v0[e] = !in ? (A)0 : v ? v[2 * j] : (A)1;
            v1[e] = !in ? (A)0 : v ? v[2 * j + 1] : (A)(1 + j % 7);
        }
        // all ROWS loads issued before any is used, so they are in flight together
        union { uint4 raw; X vals[VEC]; } chunk[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const X* row = base + (size_t)i * cols;
            chunk[i].raw = make_uint4(0, 0, 0, 0);
            if (i < nr) {
                if (vector) chunk[i].raw = *(const uint4*)(row + j0);
                else chunk[i].vals[0] = row[j0];
            }
        }
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
#ifdef CONVERT
            union { uint2 raw; unsigned short bits[VEC]; } rounded;
#endif
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                if (e >= step) break;
#ifdef CONVERT
                rounded.bits[e] = to_bf16(chunk[i].vals[e]);
                A value = __uint_as_float(((unsigned int)rounded.bits[e]) << 16);
#else
                A value = TO_A(chunk[i].vals[e]);
#endif
                s[3 * i] += value * v0[e]; s[3 * i + 1] += value * v1[e]; s[3 * i + 2] += fabs(value);
            }
#ifdef CONVERT
            if (i < nr) {
                unsigned short* to = out + (size_t)(r0 + i) * cols + j0;
                if (vector) *(uint2*)to = rounded.raw;
                else *to = rounded.bits[0];
            }
#endif
        }
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 3 * ROWS; ++i) {
        for (int o = 16; o > 0; o >>= 1) s[i] += __shfl_down_sync(0xffffffffu, s[i], o);
        if (lane == 0) shared[warp][i] = s[i];
    }
    __syncthreads();
    if (threadIdx.x < 3 * nr) {
        A total = 0;
        for (int w = 0; w < THREADS / 32; ++w) total += shared[w][threadIdx.x];
        int i = threadIdx.x / 3, which = threadIdx.x % 3;
        if (scale) y[3 * (r0 + i) + which] += which < 2 ? total : total * scale[0];
        else if (which < 2) y[2 * (r0 + i) + which] = total;
        // non-negative floats order as their bit patterns: an integer atomicMax
        else if (sizeof(A) == 8) atomicMax((unsigned long long*)absmax, (unsigned long long)__double_as_longlong((double)total));
        else atomicMax((unsigned int*)absmax, __float_as_uint((float)total));
    }
}
"""

_MODULES: dict = {}


def _module(stored, acc, convert: bool = False):
    """The kernels for blocks stored as ``stored``, summed in ``acc``; with ``convert``, float32
    blocks rounded to bf16 on the way."""
    import cupy

    key = (np.dtype(stored).str, np.dtype(acc).str, convert)
    if key not in _MODULES:
        a = "double" if acc == np.float64 else "float"
        if stored == np.uint16:  # bf16 bit patterns
            x, to_a = "unsigned short", "(A)__uint_as_float(((unsigned int)(V)) << 16)"
        else:
            x, to_a = ("double" if stored == np.float64 else "float"), "(A)(V)"
        code = (f"typedef {a} A;\ntypedef {x} X;\n#define TO_A(V) {to_a}\n"
                f"#define THREADS {THREADS}\n#define ROWS {ROWS}\n"
                + ("#define CONVERT\n" + prec.BF16_DEVICE if convert else "") + _SOURCE)
        _MODULES[key] = cupy.RawModule(code=code, options=("-std=c++14",))
    return _MODULES[key]


def _vector(x) -> np.int32:
    """Whether every row of a contiguous block starts on a 16-byte boundary."""
    return np.int32(x.data.ptr % 16 == 0 and (x.shape[1] * x.itemsize) % 16 == 0)


def _row_checks_cupy(x, v, precision: str, expect=None, scale=None):
    import cupy

    acc = output_dtype(precision)
    return _launch_row_checks(cupy.ascontiguousarray(x), _module(x.dtype, acc), acc, v, expect,
                              scale, None)


def _convert_checks_cupy(host, v, expect, scale):
    """A float block rounded to bf16 on the GPU (as ``precision.to_device`` rounds it) with
    ``_row_checks_cupy``'s sums of the rounded values, as ``(bits, y, absmax)``."""
    import cupy

    x = cupy.ascontiguousarray(cupy.asarray(host, dtype=np.float32))
    out = cupy.empty(x.shape, dtype=np.uint16)
    acc = np.dtype(np.float32)
    y, absmax = _launch_row_checks(x, _module(np.float32, acc, convert=True), acc, v, expect,
                                   scale, out)
    return out, y, absmax


def _launch_row_checks(x, module, acc, v, expect, scale, out):
    """``mx_abft_row_checks`` over a contiguous block: fresh ``(y, absmax)`` without ``expect``;
    with it, the product's share added into ``expect`` (``(expect, None)`` returned)."""
    import cupy

    rows, cols = x.shape
    y = cupy.zeros((rows, 2), dtype=acc) if expect is None else expect
    absmax = cupy.zeros(1, dtype=acc) if expect is None else None
    if rows and cols:
        module.get_function("mx_abft_row_checks")(
            (-(-rows // ROWS),), (THREADS,),
            (x, np.int64(rows), np.int32(cols), _vector(x),
             0 if v is None else cupy.ascontiguousarray(v, dtype=acc), y,
             0 if absmax is None else absmax, 0 if scale is None else scale,
             0 if out is None else out))
    return y, absmax


_BAD = None


def _failing_rows_cupy(p, expect, tol: float, floor: float):
    """The check of C: its weighted row sums by the input passes' kernel (ROWS rows a block
    streams C at 10–15% more bandwidth than a row a block did), then compared row by row."""
    import cupy

    global _BAD
    if _BAD is None:
        _BAD = cupy.ElementwiseKernel(
            "raw T got, raw T expect, float64 tol, float64 floor", "bool bad",
            """
            // written so that NaN fails
            double bound = tol * (double)expect[3 * i + 2] + floor;
            bad = !((fabs((double)got[2 * i] - (double)expect[3 * i]) <= bound)
                    && (fabs((double)got[2 * i + 1] - (double)expect[3 * i + 1]) <= bound));
            """,
            "mx_abft_bad")
    got, _ = _launch_row_checks(cupy.ascontiguousarray(p), _module(p.dtype, p.dtype), p.dtype,
                                None, None, None, None)
    bad = cupy.empty(p.shape[0], dtype=bool)
    if p.shape[0]:
        _BAD(got, cupy.ascontiguousarray(expect, dtype=p.dtype), np.float64(tol),
             np.float64(floor), bad)
    return cupy.flatnonzero(bad)
