"""Scaled dot-product attention softmax(q kᵀ / √d) v, on NumPy or CuPy.

On a GPU in float16, one fused kernel (flash-attention style, FlashAttention-2's register
layout): a block takes 128 queries, each warp 16 or 32 of them, and streams keys and values
through shared memory in tiles (``tiling``), the next tile copied in by ``cp.async`` while
the current one is multiplied. Products run on the tensor cores (``mma.sync`` m16n8k16,
float32 accumulation) with fragments loaded by ``ldmatrix`` (transposing for v), the
probabilities kept in registers and a running softmax, so the N×N scores never reach GPU
memory (at 16384 tokens they would be 8 GiB per layer). It reads q, k, v through their
strides, so the heads of a fused qkv projection need no copies (odd head dims are copied
into zero-padded rows), and writes (tokens, heads, d), the layout the output projection
wants.

Elsewhere (NumPy, float32 on CuPy) queries go in chunks so a chunk's score matrix stays
small; each chunk is two batched products around a float32 softmax. This is the reference
the GPU kernel is tested against.
"""

from __future__ import annotations

import math

import numpy as np

SCORE_BUDGET = 2**26  # scores (all heads) held at once per chunk: 256 MiB in float32
BLOCK_Q = 128  # queries per block of the fused kernel; BQ in the source
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
#define BQ 128           // queries per block; BK (keys per tile) and MT come from the host
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
// the same with k = 8: the half step of a head dim that is an odd multiple of 8
__device__ __forceinline__ void mma1688(float* c, const unsigned* a, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
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
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned* r, const h16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
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
// 2^x on the special-function unit; exp2(-inf) = 0
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
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

// MT: 16-row m tiles per warp, so each k / v fragment feeds MT products. D8: the head dim
// rounded up to 8; products cover D8 dims, not DP (72 takes 4.5 k-steps and 9 n-tiles, not 5
// and 10)
#define NT8 (D8 / 8)     // 8-dim output tiles
#define K16 (D8 / 16)    // whole k16 steps over the head dim; a k8 step follows when D8 % 16
#define THREADS (32 * BQ / (16 * MT))

extern "C" __global__ void __launch_bounds__(THREADS) mx_flash_attention(
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

    // this warp's 16·MT queries as mma A fragments, kept in registers for the whole block
    load_tile(tiles, q, qt, q0, BQ, nq, dl);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qa[MT][DP / 16][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk)
            ldmatrix_x4(qa[mt][kk], tiles + ((warp * MT + mt) * 16 + (lane & 15)) * DPS
                                          + kk * 16 + (lane >> 4) * 8);
    __syncthreads();

    float acc[MT][NT8][4];
    float m0[MT], m1[MT], l0[MT], l1[MT];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int t = 0; t < NT8; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.f;
        m0[mt] = m1[mt] = NEG_INF;
        l0[mt] = l1[mt] = 0.f;
    }

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

        float s[MT][BK / 8][4];
        #pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < K16; ++kk) {
                unsigned b[2];  // keys nt*8.., dims kk*16.. and kk*16+8..
                ldmatrix_x2(b, ks + (nt * 8 + (lane & 7)) * DPS + kk * 16 + ((lane >> 3) & 1) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma16816(s[mt][nt], qa[mt][kk], b[0], b[1]);
            }
#if D8 % 16
            {
                unsigned b[2];  // keys nt*8.., the last 8 dims (the second matrix unused)
                ldmatrix_x2(b, ks + (nt * 8 + (lane & 7)) * DPS + K16 * 16);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma1688(s[mt][nt], qa[mt][K16], b[0]);
            }
#endif
        }
        unsigned pa[MT][BK / 16][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (k0 + BK > nk) {  // the last tile: keys past the end get no weight
                #pragma unroll
                for (int nt = 0; nt < BK / 8; ++nt)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (k0 + nt * 8 + tig * 2 + (e & 1) >= nk) s[mt][nt][e] = NEG_INF;
            }
            float top0 = NEG_INF, top1 = NEG_INF;
            #pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt) {
                top0 = fmaxf(top0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                top1 = fmaxf(top1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 1));
            top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 2));
            top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 1));
            top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 2));
            // running maxima in log2 units; scores scaled inside the exponent's FMA
            float n0 = fmaxf(m0[mt], top0 * scale_log2), n1 = fmaxf(m1[mt], top1 * scale_log2);
            float a0 = fast_exp2(m0[mt] - n0), a1 = fast_exp2(m1[mt] - n1);
            float sum0 = 0.f, sum1 = 0.f;
            #pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt) {
                float p0 = fast_exp2(fmaf(s[mt][nt][0], scale_log2, -n0));
                float p1 = fast_exp2(fmaf(s[mt][nt][1], scale_log2, -n0));
                float p2 = fast_exp2(fmaf(s[mt][nt][2], scale_log2, -n1));
                float p3 = fast_exp2(fmaf(s[mt][nt][3], scale_log2, -n1));
                sum0 += p0 + p1;
                sum1 += p2 + p3;
                // probabilities as the A fragment of the next product: two 8-key tiles per k16
                pa[mt][nt >> 1][(nt & 1) * 2] = pack(p0, p1);
                pa[mt][nt >> 1][(nt & 1) * 2 + 1] = pack(p2, p3);
            }
            sum0 += __shfl_xor_sync(0xffffffff, sum0, 1);
            sum0 += __shfl_xor_sync(0xffffffff, sum0, 2);
            sum1 += __shfl_xor_sync(0xffffffff, sum1, 1);
            sum1 += __shfl_xor_sync(0xffffffff, sum1, 2);
            l0[mt] = l0[mt] * a0 + sum0; l1[mt] = l1[mt] * a1 + sum1;
            m0[mt] = n0; m1[mt] = n1;
            #pragma unroll
            for (int t = 0; t < NT8; ++t) {
                acc[mt][t][0] *= a0; acc[mt][t][1] *= a0; acc[mt][t][2] *= a1; acc[mt][t][3] *= a1;
            }
        }
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            #pragma unroll
            for (int t = 0; t + 1 < NT8; t += 2) {
                // v is stored row-major (keys x dims); the transposing load gives the
                // (keys x dims) B fragments for dims t*8.. and (t+1)*8..
                unsigned b[4];
                const int m = lane >> 3;
                ldmatrix_x4_trans(b, vs + (kk * 16 + (m & 1) * 8 + (lane & 7)) * DPS + (t + (m >> 1)) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(acc[mt][t], pa[mt][kk], b[0], b[1]);
                    mma16816(acc[mt][t + 1], pa[mt][kk], b[2], b[3]);
                }
            }
#if NT8 % 2
            {
                unsigned b[2];  // the last 8-dim tile alone
                ldmatrix_x2_trans(b, vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * DPS + (NT8 - 1) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma16816(acc[mt][NT8 - 1], pa[mt][kk], b[0], b[1]);
            }
#endif
        }
        __syncthreads();  // this stage is refilled by the next iteration's loads
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        int r0 = q0 + (warp * MT + mt) * 16 + g, r1 = r0 + 8;
        float i0 = 1.f / l0[mt], i1 = 1.f / l1[mt];
        #pragma unroll
        for (int t = 0; t < NT8; ++t) {
            int c = t * 8 + tig * 2;
            if (r0 < nq) {
                if (c < d) o[(long long)r0 * ot + c] = to_half(acc[mt][t][0] * i0);
                if (c + 1 < d) o[(long long)r0 * ot + c + 1] = to_half(acc[mt][t][1] * i0);
            }
            if (r1 < nq) {
                if (c < d) o[(long long)r1 * ot + c] = to_half(acc[mt][t][2] * i1);
                if (c + 1 < d) o[(long long)r1 * ot + c + 1] = to_half(acc[mt][t][3] * i1);
            }
        }
    }
}
"""

_KERNELS: dict[int, object] = {}


def tiling(padded: int) -> tuple[int, int]:
    """(16-query tiles per warp, keys per tile) for a padded head dim; MT and BK in the source.
    Measured on an H100 (bench/attention.py): two query tiles per warp halve the shared-memory
    reads of k and v per product; at head dim 128 a 128-key tile with one query tile wins
    (251 against 227 TFLOP/s), below it two query tiles and 64 keys (219 against 196 at 72)."""
    return (1, 128) if padded >= 128 else (2, 64)


def _kernel(padded: int, d8: int):
    kernel = _KERNELS.get(d8)  # d8 decides padded
    if kernel is None:
        import cupy

        mt, bk = tiling(padded)
        kernel = cupy.RawKernel(_SOURCE, "mx_flash_attention",
                                options=(f"-DDP={padded}", f"-DD8={d8}", f"-DBK={bk}", f"-DMT={mt}"))
        if _shared_bytes(padded) > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = _shared_bytes(padded)
        _KERNELS[d8] = kernel
    return kernel


def _shared_bytes(padded: int) -> int:
    # two stages of a k and a v tile, padded rows; the q tile is loaded into the same space
    return max(4 * tiling(padded)[1], BLOCK_Q) * (padded + 8) * 2


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
    d8 = -(-d // 8) * 8
    padded = -(-d8 // 16) * 16
    out = xp.empty((n, heads, d), dtype=q.dtype)
    q, k, v = (_loadable(xp, a, d8) for a in (q, k, v))
    e = q.itemsize
    strides = [q.strides[0] // e, q.strides[1] // e, k.strides[0] // e, k.strides[1] // e,
               v.strides[0] // e, v.strides[1] // e, d, heads * d]
    grid = (-(-n // BLOCK_Q), heads)
    threads = 32 * BLOCK_Q // (16 * tiling(padded)[0])  # THREADS in the source
    _kernel(padded, d8)(grid, (threads,),
                        (q, k, v, out, np.int32(n), np.int32(total), np.int32(d), np.int32(d8),
                         *[np.int64(s) for s in strides],
                         np.float32(math.log2(math.e) / math.sqrt(d))),
                        shared_mem=_shared_bytes(padded))
    return out.transpose(1, 0, 2)
