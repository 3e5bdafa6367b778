"""Scaled dot-product attention softmax(q kᵀ / √d) v, on NumPy or CuPy.

On a GPU in float16, one fused kernel (flash-attention style, FlashAttention-2's register
layout): a block of 8 warps takes 128 queries, streams keys and values through shared memory
64 at a time, multiplies on the tensor cores (``mma.sync`` m16n8k16, float32 accumulation)
with the probabilities kept in registers, and keeps a running softmax, so the N×N scores
never reach GPU memory (at 16384 tokens they would be 8 GiB per layer). It reads q, k, v
through their strides, so the heads of a fused qkv projection need no copies, and writes
(tokens, heads, d), which is the layout the output projection wants.

Elsewhere (NumPy, float32 on CuPy) queries go in chunks so a chunk's score matrix stays
small; each chunk is two batched products around a float32 softmax. This is the reference
the GPU kernel is tested against.
"""

from __future__ import annotations

import math

import numpy as np

SCORE_BUDGET = 2**26  # scores (all heads) held at once per chunk: 256 MiB in float32
BLOCK_Q = 128  # queries per block of the fused kernel (8 warps, 16 each); BQ in the source
BLOCK_K = 64  # keys per shared-memory tile; BK in the source
MAX_HEAD_DIM = 128


def attend(xp, q, k, v):
    """q: (heads, n, d); k, v: (heads, N, d). Returns (heads, n, d) in q's dtype."""
    if fused(xp, q):
        return _attend_fused(xp, q, k, v)
    heads, n, d = q.shape
    total = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    chunk = max(1, min(n, SCORE_BUDGET // max(1, heads * total)))
    kt = k.transpose(0, 2, 1)
    out = xp.empty_like(q)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = (q[:, start:stop] @ kt).astype(np.float32, copy=False)
        s *= scale
        s -= s.max(axis=-1, keepdims=True)
        e = xp.exp(s, out=s)
        e /= e.sum(axis=-1, keepdims=True)
        out[:, start:stop] = e.astype(q.dtype, copy=False) @ v
    return out


def fused(xp, q) -> bool:
    return xp.__name__ == "cupy" and q.dtype == np.float16 and q.shape[-1] <= MAX_HEAD_DIM


_SOURCE = r"""
// halves travel as raw 16-bit patterns (unsigned short): NVRTC here has no cuda_fp16.h/mma.h
#define BQ 128
#define BK 64
#define DPS (DP + 8)     // padded row of a q / k / v tile: ldmatrix rows fall in distinct banks
#define TILE (BK * DPS)  // halves in one k or v tile
typedef unsigned short h16;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
// four 8x8 matrices of halves from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const h16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const h16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const h16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
// 16 bytes global -> shared without passing through registers; zero-filled when !valid
__device__ __forceinline__ void cp_async16(h16* dst, const h16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N));
}
__device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ h16 to_half(float x) {
    h16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// rows [r0, r0 + rows) of a (tokens, dl) matrix read through its row stride into a tile of
// DPS-wide rows; rows past n and columns past dl (up to DP) are zero
__device__ __forceinline__ void load_tile(h16* tile, const h16* x, long long stride, int r0,
                                          int rows, int n, int dl) {
    for (int i = threadIdx.x; i < rows * (DP / 8); i += blockDim.x) {
        int r = i / (DP / 8), c = (i % (DP / 8)) * 8;
        bool valid = r0 + r < n && c < dl;
        cp_async16(tile + r * DPS + c, valid ? x + (long long)(r0 + r) * stride + c : x, valid);
    }
}

extern "C" __global__ void __launch_bounds__(256) mx_flash_attention(
    const h16* __restrict__ q, const h16* __restrict__ k, const h16* __restrict__ v,
    h16* __restrict__ o, int nq, int nk, int d, int dl,
    long long qh, long long qt, long long kh, long long kt, long long vh, long long vt,
    long long oh, long long ot, float scale_log2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    h16* tiles = (h16*)smem;  // [k0 | v0 | k1 | v1], two stages; holds the q tile first
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int q0 = blockIdx.x * BQ;
    q += blockIdx.y * qh; k += blockIdx.y * kh; v += blockIdx.y * vh; o += blockIdx.y * oh;

    // this warp's 16 queries as mma A fragments, kept in registers for the whole block
    load_tile(tiles, q, qt, q0, BQ, nq, dl);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qa[DP / 16][4];
    #pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk)
        ldmatrix_x4(qa[kk], tiles + (warp * 16 + (lane & 15)) * DPS + kk * 16 + (lane >> 4) * 8);
    __syncthreads();

    float acc[DP / 8][4];
    #pragma unroll
    for (int t = 0; t < DP / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    const int tiles_k = (nk + BK - 1) / BK;
    load_tile(tiles, k, kt, 0, BK, nk, dl);
    load_tile(tiles + TILE, v, vt, 0, BK, nk, dl);
    cp_async_commit();
    for (int it = 0; it < tiles_k; ++it) {
        const int k0 = it * BK;
        // the next tile streams in while this one is multiplied
        if (it + 1 < tiles_k) {
            h16* next = tiles + ((it + 1) & 1) * 2 * TILE;
            load_tile(next, k, kt, k0 + BK, BK, nk, dl);
            load_tile(next + TILE, v, vt, k0 + BK, BK, nk, dl);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const h16* ks = tiles + (it & 1) * 2 * TILE;
        const h16* vs = ks + TILE;

        float s[BK / 8][4];
        #pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                unsigned b[2];  // keys nt*8.., dims kk*16.. and kk*16+8..
                ldmatrix_x2(b, ks + (nt * 8 + (lane & 7)) * DPS + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(s[nt], qa[kk], b[0], b[1]);
            }
        }
        float top0 = NEG_INF, top1 = NEG_INF;
        #pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int col = k0 + nt * 8 + tig * 2 + (e & 1);
                s[nt][e] = col < nk ? s[nt][e] * scale_log2 : NEG_INF;
            }
            top0 = fmaxf(top0, fmaxf(s[nt][0], s[nt][1]));
            top1 = fmaxf(top1, fmaxf(s[nt][2], s[nt][3]));
        }
        top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 1));
        top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 2));
        top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 1));
        top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 2));
        float n0 = fmaxf(m0, top0), n1 = fmaxf(m1, top1);
        float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
        float sum0 = 0.f, sum1 = 0.f;
        #pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - n0); s[nt][1] = exp2f(s[nt][1] - n0);
            s[nt][2] = exp2f(s[nt][2] - n1); s[nt][3] = exp2f(s[nt][3] - n1);
            sum0 += s[nt][0] + s[nt][1];
            sum1 += s[nt][2] + s[nt][3];
        }
        sum0 += __shfl_xor_sync(0xffffffff, sum0, 1);
        sum0 += __shfl_xor_sync(0xffffffff, sum0, 2);
        sum1 += __shfl_xor_sync(0xffffffff, sum1, 1);
        sum1 += __shfl_xor_sync(0xffffffff, sum1, 2);
        l0 = l0 * a0 + sum0; l1 = l1 * a1 + sum1;
        m0 = n0; m1 = n1;
        #pragma unroll
        for (int t = 0; t < DP / 8; ++t) { acc[t][0] *= a0; acc[t][1] *= a0; acc[t][2] *= a1; acc[t][3] *= a1; }
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned pa[4] = {pack(s[2 * kk][0], s[2 * kk][1]), pack(s[2 * kk][2], s[2 * kk][3]),
                              pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            #pragma unroll
            for (int t = 0; t < DP / 8; t += 2) {
                // v is stored row-major (keys x dims); the transposing load gives the
                // (keys x dims) B fragments for dims t*8.. and (t+1)*8..
                unsigned b[4];
                const int m = lane >> 3;
                ldmatrix_x4_trans(b, vs + (kk * 16 + (m & 1) * 8 + (lane & 7)) * DPS + (t + (m >> 1)) * 8);
                mma16816(acc[t], pa, b[0], b[1]);
                mma16816(acc[t + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's loads
    }
    int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    float i0 = 1.f / l0, i1 = 1.f / l1;
    #pragma unroll
    for (int t = 0; t < DP / 8; ++t) {
        int c = t * 8 + tig * 2;
        if (r0 < nq) {
            if (c < d) o[(long long)r0 * ot + c] = to_half(acc[t][0] * i0);
            if (c + 1 < d) o[(long long)r0 * ot + c + 1] = to_half(acc[t][1] * i0);
        }
        if (r1 < nq) {
            if (c < d) o[(long long)r1 * ot + c] = to_half(acc[t][2] * i1);
            if (c + 1 < d) o[(long long)r1 * ot + c + 1] = to_half(acc[t][3] * i1);
        }
    }
}
"""

_KERNELS: dict[tuple, object] = {}


def _kernel(padded: int):
    kernel = _KERNELS.get(padded)
    if kernel is None:
        import cupy

        kernel = cupy.RawKernel(_SOURCE, "mx_flash_attention", options=(f"-DDP={padded}",))
        if _shared_bytes(padded) > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = _shared_bytes(padded)
        _KERNELS[padded] = kernel
    return kernel


def _shared_bytes(padded: int) -> int:
    # two stages of a k and a v tile, padded rows; the q tile is loaded into the same space
    return max(4 * BLOCK_K, BLOCK_Q) * (padded + 8) * 2


def _loadable(xp, a, d8: int):
    """``a`` as the kernel reads it: rows of whole 16-byte vectors at 16-byte-aligned
    addresses, through its strides when they allow, else a copy with zero-padded rows."""
    e = a.itemsize
    if a.strides[2] == e and a.strides[0] % 16 == 0 and a.strides[1] % 16 == 0 \
            and a.data.ptr % 16 == 0 and a.shape[2] % 8 == 0:
        return a
    padded = xp.zeros(a.shape[:2] + (d8,), dtype=a.dtype)
    padded[..., :a.shape[2]] = a
    return padded


def _attend_fused(xp, q, k, v):
    heads, n, d = q.shape
    total = k.shape[1]
    padded = -(-d // 16) * 16
    d8 = -(-d // 8) * 8
    out = xp.empty((n, heads, d), dtype=q.dtype)
    q, k, v = (_loadable(xp, a, d8) for a in (q, k, v))
    e = q.itemsize
    strides = [q.strides[0] // e, q.strides[1] // e, k.strides[0] // e, k.strides[1] // e,
               v.strides[0] // e, v.strides[1] // e, d, heads * d]
    grid = (-(-n // BLOCK_Q), heads)
    _kernel(padded)(grid, (256,), (q, k, v, out, np.int32(n), np.int32(total), np.int32(d),
                                   np.int32(d8), *[np.int64(s) for s in strides],
                                   np.float32(math.log2(math.e) / math.sqrt(d))),
                    shared_mem=_shared_bytes(padded))
    return out.transpose(1, 0, 2)
