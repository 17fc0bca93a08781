/* gemm_avx2.c -- the AVX2 + FMA block kernel: a 6 x 16 register tile (12 ymm accumulators).
 *
 * Layouts and the meaning of cd_gemm_block: see gemm_kernels.h. Compiled for any x86-64: the
 * functions carry target("avx2,fma") and run only when cpu.c says the CPU and OS support it.
 */
#include "gemm_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define MR CD_GEMM_MR_AVX2
#define INL static inline __attribute__((always_inline, target("avx2,fma")))

/* lane masks for the first n of 8 lanes (n may be <= 0 or >= 8) */
INL __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* C tile (mr, nv) = alpha * A tile (mr, kc) @ B panel (kc, 16) [+ bias] [+ C]
 * a: element (r, k) at a[r * rsa + k * csa]; b: (kc, 16), row k at b + k * blk->ldbk;
 * nv <= 16 valid columns.
 * mr is a compile-time constant after inlining, so the accumulators live in registers. */
INL void tile_6x16(int mr, int kc, const float *a, ptrdiff_t rsa, ptrdiff_t csa,
                   const float *b, float *c, const float *bias, int nv, const cd_gemm_block *blk,
                   const float *pf) {
    __m256 acc[MR][2];
    const float *ar[MR];
    const ptrdiff_t ldbk = blk->ldbk;
    for (int r = 0; r < MR; r++) {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
        ar[r] = r < mr ? a + r * rsa : a;
        /* the C tile is read / written after the loop: fetch it now, while the FMAs run */
        if (r < mr) {
            _mm_prefetch((const char *)(c + r * blk->ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * blk->ldc + 15), _MM_HINT_T0);
        }
    }
    for (int k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * ldbk);
        const __m256 b1 = _mm256_loadu_ps(b + k * ldbk + 8);
        if (pf) _mm_prefetch((const char *)(pf + k * ldbk), _MM_HINT_T0);
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                const __m256 x = _mm256_broadcast_ss(ar[r] + k * csa);
                acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
            }
        }
    }
    /* a compiler barrier, so that alpha is not loaded (and a register held) across the loop */
    __asm__ __volatile__("" ::: "memory");
    const __m256 va = _mm256_set1_ps(blk->alpha);
    const ptrdiff_t ldc = blk->ldc;
    const int load_c = blk->load_c;
    if (nv == 16) {
        const __m256 bb0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        const __m256 bb1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                float *cr = c + r * ldc;
                __m256 v0 = _mm256_fmadd_ps(acc[r][0], va, bb0);
                __m256 v1 = _mm256_fmadd_ps(acc[r][1], va, bb1);
                if (load_c) {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
                }
                _mm256_storeu_ps(cr, v0);
                _mm256_storeu_ps(cr + 8, v1);
            }
        }
    } else {
        const __m256i m0 = first_lanes(nv), m1 = first_lanes(nv - 8);
        const __m256 bb0 = bias ? _mm256_maskload_ps(bias, m0) : _mm256_setzero_ps();
        const __m256 bb1 = bias ? _mm256_maskload_ps(bias + 8, m1) : _mm256_setzero_ps();
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                float *cr = c + r * ldc;
                __m256 v0 = _mm256_fmadd_ps(acc[r][0], va, bb0);
                __m256 v1 = _mm256_fmadd_ps(acc[r][1], va, bb1);
                if (load_c) {
                    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(cr, m0));
                    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(cr + 8, m1));
                }
                _mm256_maskstore_ps(cr, m0, v0);
                _mm256_maskstore_ps(cr + 8, m1, v1);
            }
        }
    }
}

/* every (MR, 16) tile of the block: panels outer (one B panel stays in L1 while the A tiles
 * stream past it from L2), row tiles inner. packed: A in MR-row K-major panels. */
INL void block_avx2(const cd_gemm_block *blk, int packed) {
    const ptrdiff_t rsa = packed ? 1 : blk->rsa, csa = packed ? MR : 1;
    const int kc = blk->kc;
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += 16, p++) {
        const float *b = blk->b + p * blk->psb;
        const float *bias = blk->bias ? blk->bias + j0 : NULL;
        const int nv = blk->nc - j0 < 16 ? blk->nc - j0 : 16;
        for (int i0 = 0, t = 0; i0 < blk->mc; i0 += MR, t++) {
            const float *a = blk->a + t * blk->pa;
            float *c = blk->c + i0 * blk->ldc + j0;
            const int mr = blk->mc - i0 < MR ? blk->mc - i0 : MR;
            /* the last row tile of a panel brings the next panel's slice into L1 */
            const float *pf = i0 + MR >= blk->mc && j0 + 16 < blk->nc ? b + blk->psb : NULL;
            switch (mr) {
            case 6: tile_6x16(6, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            case 5: tile_6x16(5, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            case 4: tile_6x16(4, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            case 3: tile_6x16(3, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            case 2: tile_6x16(2, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            default: tile_6x16(1, kc, a, rsa, csa, b, c, bias, nv, blk, pf); break;
            }
        }
    }
}

__attribute__((target("avx2,fma")))
void cd_gemm_block_avx2(const cd_gemm_block *blk) {
    if (blk->csa == 1) block_avx2(blk, 0);
    else block_avx2(blk, 1);
}

/* 8 x 8 transpose of eight rows r[0..7] (8 floats each) in place: r[i][j] <- r[j][i] */
INL void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

__attribute__((target("avx2,fma")))
void cd_gemm_pack_t16_avx2(float *panel, const float *src, ptrdiff_t ld, int nv, int kc) {
    if (nv < 16) {   /* a last, partial panel: the plain loop (zero rows past nv) */
        cd_gemm_pack_t16_generic(panel, src, ld, nv, kc);
        return;
    }
    const int k8 = kc & ~7;
    for (int k = 0; k < k8; k += 8) {          /* both halves of each 64-byte output row */
        for (int h = 0; h < 16; h += 8) {
            const float *s = src + h * ld;
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(s + i * ld + k);
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(panel + (ptrdiff_t)(k + i) * 16 + h, r[i]);
        }
    }
    for (int k = k8; k < kc; k++)
        for (int j = 0; j < 16; j++) panel[(ptrdiff_t)k * 16 + j] = src[j * ld + k];
}

/* one tile of mr (6 or 12) rows: d[k * mr + r] = src[r][k]; rows past `rows` are zero.
 * Rows go through 8 x 8 transposes in groups of 8. With mr = 6 the 8-wide stores of the
 * transposed columns overlap: each writes 2 floats past its 6, which the next one (or the
 * next tile, or the tail loop) overwrites; the last may write 2 floats past the tile.
 * next: the next tile's rows (or NULL), prefetched while this one is copied. */
INL void pack_tile(float *d, const float *const *src, int rows, int kc, int mr,
                   const float *const *next) {
    const int k8 = kc & ~7;
    for (int k = 0; k < k8; k += 8) {
        for (int g = 0; g < mr; g += 8) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) {
                const int row = g + r;
                v[r] = row < mr && row < rows ? _mm256_loadu_ps(src[row] + k)
                                              : _mm256_setzero_ps();
                if (row < mr && next && (k & 15) == 0)
                    _mm_prefetch((const char *)(next[row] + k), _MM_HINT_T0);
            }
            transpose8(v);
            for (int i = 0; i < 8; i++) {
                float *o = d + (ptrdiff_t)(k + i) * mr + g;
                if (mr - g >= 8 || mr == 6) _mm256_storeu_ps(o, v[i]);   /* 8, or 6 + overlap */
                else _mm_storeu_ps(o, _mm256_castps256_ps128(v[i]));     /* 12 = 8 + 4 */
            }
        }
    }
    for (int k = k8; k < kc; k++)
        for (int r = 0; r < mr; r++) d[(ptrdiff_t)k * mr + r] = r < rows ? src[r][k] : 0.0f;
}

INL void pack_rows_mr(float *dst, const float *a, ptrdiff_t lda, int mc, int kc, int mr) {
    for (int i0 = 0; i0 < mc; i0 += mr) {
        const int rows = mc - i0 < mr ? mc - i0 : mr;
        const float *src[16], *nxt[16];
        for (int r = 0; r < mr; r++) {
            src[r] = a + (ptrdiff_t)(i0 + (r < rows ? r : 0)) * lda;
            /* the next tile's rows, clamped to the last row of the block */
            const int rn = i0 + mr + r < mc ? i0 + mr + r : mc - 1;
            nxt[r] = a + (ptrdiff_t)rn * lda;
        }
        float *d = dst + (ptrdiff_t)i0 * kc;
        if (rows == mr) pack_tile(d, src, mr, kc, mr, i0 + mr < mc ? nxt : NULL);
        else pack_tile(d, src, rows, kc, mr, NULL);
    }
}

__attribute__((target("avx2,fma")))
void cd_gemm_pack_rows_avx2(float *dst, const float *a, ptrdiff_t lda, int mc, int kc, int mr) {
    if (mr == 6) pack_rows_mr(dst, a, lda, mc, kc, 6);
    else if (mr == 12) pack_rows_mr(dst, a, lda, mc, kc, 12);
    else cd_gemm_pack_rows_generic(dst, a, lda, mc, kc, mr);
}

#else
typedef int cd_gemm_avx2_unused;   /* keeps the translation unit non-empty off x86 */
#endif
