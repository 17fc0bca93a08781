/* gemm_avx512.c -- the AVX-512F block kernel: a 12 x 32 register tile (24 zmm accumulators)
 * over two adjacent 16-column panels, and 12 x 16 on a lone last panel.
 *
 * Layouts and the meaning of cd_gemm_block: see gemm_kernels.h. Compiled for any x86-64: the
 * functions carry target("avx512f") and run only when cpu.c says the CPU and OS support it.
 */
#include "gemm_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#ifdef CD_AVX512_EMULATE   /* tests only: portable stand-ins, see csrc/tests/avx512_emu.h */
#include "tests/avx512_emu.h"
#define CD_AVX512_TARGET
#else
#include <immintrin.h>
#define CD_AVX512_TARGET __attribute__((target("avx512f")))
#endif

#define MR CD_GEMM_MR_AVX512
#define INL static inline __attribute__((always_inline)) CD_AVX512_TARGET

/* mask of the first n of 16 lanes (n clamped to 0..16) */
INL __mmask16 first_lanes16(int n) {
    if (n <= 0) return 0;
    if (n >= 16) return 0xFFFF;
    return (__mmask16)((1u << n) - 1u);
}

/* C tile (mr, nv) = alpha * A tile (mr, kc) @ B (kc, 16*np) [+ bias] [+ C]
 * a: element (r, k) at a[r * rsa + k * csa]; b: panel 0, b + psb: panel 1 (when np == 2),
 * row k of a panel at + k * blk->ldbk;
 * nv <= 16*np valid columns. mr and np are compile-time constants after inlining. */
INL void tile_12x32(int mr, int np, int kc, const float *a, ptrdiff_t rsa, ptrdiff_t csa,
                    const float *b, ptrdiff_t psb, float *c, const float *bias, int nv,
                    const cd_gemm_block *blk) {
    __m512 acc[MR][2];
    const float *ar[MR];
    const float *b1p = np == 2 ? b + psb : b;
    const ptrdiff_t ldbk = blk->ldbk;
    for (int r = 0; r < MR; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
        ar[r] = r < mr ? a + r * rsa : a;
        /* the C tile is read / written after the loop: fetch it now, while the FMAs run */
        if (r < mr) {
            const float *cr = c + r * blk->ldc;
            _mm_prefetch((const char *)cr, _MM_HINT_T0);
            _mm_prefetch((const char *)(cr + 15), _MM_HINT_T0);
            if (np == 2) _mm_prefetch((const char *)(cr + 31), _MM_HINT_T0);
        }
    }
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_loadu_ps(b + k * ldbk);
        const __m512 b1 = np == 2 ? _mm512_loadu_ps(b1p + k * ldbk) : _mm512_setzero_ps();
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                const __m512 x = _mm512_set1_ps(ar[r][k * csa]);
                acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
                if (np == 2) acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
            }
        }
    }
    __asm__ __volatile__("" ::: "memory");   /* keep alpha & co. out of the loop's registers */
    const __m512 va = _mm512_set1_ps(blk->alpha);
    const ptrdiff_t ldc = blk->ldc;
    const int load_c = blk->load_c;
    const __mmask16 m0 = first_lanes16(nv), m1 = np == 2 ? first_lanes16(nv - 16) : 0;
    const __m512 bb0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bb1 = bias && np == 2 ? _mm512_maskz_loadu_ps(m1, bias + 16)
                                       : _mm512_setzero_ps();
    for (int r = 0; r < MR; r++) {
        if (r < mr) {
            float *cr = c + r * ldc;
            __m512 v0 = _mm512_fmadd_ps(acc[r][0], va, bb0);
            if (load_c) v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
            _mm512_mask_storeu_ps(cr, m0, v0);
            if (np == 2) {
                __m512 v1 = _mm512_fmadd_ps(acc[r][1], va, bb1);
                if (load_c) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr + 16));
                _mm512_mask_storeu_ps(cr + 16, m1, v1);
            }
        }
    }
}

#define CD_TILE512(MRC, NPC) \
    tile_12x32(MRC, NPC, kc, a, rsa, csa, b, blk->psb, c, bias, nv, blk)
#define CD_ROWS512(NPC)                                   \
    switch (mr) {                                         \
    case 12: CD_TILE512(12, NPC); break;                  \
    case 11: CD_TILE512(11, NPC); break;                  \
    case 10: CD_TILE512(10, NPC); break;                  \
    case 9: CD_TILE512(9, NPC); break;                    \
    case 8: CD_TILE512(8, NPC); break;                    \
    case 7: CD_TILE512(7, NPC); break;                    \
    case 6: CD_TILE512(6, NPC); break;                    \
    case 5: CD_TILE512(5, NPC); break;                    \
    case 4: CD_TILE512(4, NPC); break;                    \
    case 3: CD_TILE512(3, NPC); break;                    \
    case 2: CD_TILE512(2, NPC); break;                    \
    default: CD_TILE512(1, NPC); break;                   \
    }

/* every (MR, 32) tile of the block: column pairs of panels outer, row tiles inner */
INL void block_avx512(const cd_gemm_block *blk, int packed) {
    const ptrdiff_t rsa = packed ? 1 : blk->rsa, csa = packed ? MR : 1;
    const int kc = blk->kc;
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += 32, p += 2) {
        const float *b = blk->b + p * blk->psb;
        const float *bias = blk->bias ? blk->bias + j0 : NULL;
        const int nv = blk->nc - j0 < 32 ? blk->nc - j0 : 32;
        for (int i0 = 0, t = 0; i0 < blk->mc; i0 += MR, t++) {
            const float *a = blk->a + t * blk->pa;
            float *c = blk->c + i0 * blk->ldc + j0;
            const int mr = blk->mc - i0 < MR ? blk->mc - i0 : MR;
            if (nv > 16) {
                CD_ROWS512(2)
            } else {
                CD_ROWS512(1)
            }
        }
    }
}

CD_AVX512_TARGET
void cd_gemm_block_avx512(const cd_gemm_block *blk) {
    if (blk->csa == 1) block_avx512(blk, 0);
    else block_avx512(blk, 1);
}

#else
typedef int cd_gemm_avx512_unused;   /* keeps the translation unit non-empty off x86 */
#endif
