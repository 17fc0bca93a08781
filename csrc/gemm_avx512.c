/* gemm_avx512.c -- the AVX-512F block kernels: a 12 x 32 register tile (24 zmm accumulators)
 * over two adjacent 16-column panels, and 12 x 16 on a lone last panel; in float32 (vfmadd) and
 * on bf16 pairs (AVX512_BF16 vdpbf16ps: two products per lane and instruction, float32 sums).
 *
 * Layouts and the meaning of cd_gemm_block: see gemm_kernels.h. Compiled for any x86-64: the
 * functions carry target("avx512f") (and "avx512bf16") and run only when cpu.c says the CPU and
 * OS support them.
 */
#include "gemm_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#ifdef CD_AVX512_EMULATE   /* tests only: portable stand-ins, see csrc/tests/avx512_emu.h */
#include "tests/avx512_emu.h"
#define CD_AVX512_TARGET
#define CD_BF16_TARGET
#else
#include <immintrin.h>
#define CD_AVX512_TARGET __attribute__((target("avx512f")))
#define CD_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
#endif
#include <stdint.h>

#define MR CD_GEMM_MR_AVX512
#define INL static inline __attribute__((always_inline)) CD_AVX512_TARGET
#define INL_BF16 static inline __attribute__((always_inline)) CD_BF16_TARGET

/* mask of the first n of 16 lanes (n clamped to 0..16) */
INL __mmask16 first_lanes16(int n) {
    if (n <= 0) return 0;
    if (n >= 16) return 0xFFFF;
    return (__mmask16)((1u << n) - 1u);
}

/* C tile (mr, nv) = alpha * acc [+ bias] [+ C]: the end of every 12 x 32 tile */
INL void store_12x32(int mr, int np, __m512 acc[MR][2], float *c, const float *bias, int nv,
                     const cd_gemm_block *blk) {
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
    store_12x32(mr, np, acc, c, bias, nv, blk);
}

/* ---------------------------------------------------------------------------------------- */
/* bf16 pairs (gemm_kernels.h): words of two bf16 values, kc counted in pairs                 */

#ifndef CD_AVX512_EMULATE
INL_BF16 __m512bh bh_load(const uint32_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
INL_BF16 __m512bh bh_set1(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int)pair); }
#endif

/* C tile (mr, nv) = alpha * A tile (mr, 2 kc) @ B (2 kc, 16*np) [+ bias] [+ C] on bf16 pairs:
 * a: pair (r, kp) at a[r * rsa + kp * csa]; b: panel 0, b + psb: panel 1; pair row kp of a
 * panel at + kp * blk->ldbk. vdpbf16ps adds both products of a pair to each float32 lane. */
INL_BF16 void tile_12x32_bf16(int mr, int np, int kc, const uint32_t *a, ptrdiff_t rsa,
                              ptrdiff_t csa, const uint32_t *b, ptrdiff_t psb, float *c,
                              const float *bias, int nv, const cd_gemm_block *blk) {
    __m512 acc[MR][2];
    const uint32_t *ar[MR];
    const uint32_t *b1p = np == 2 ? b + psb : b;
    const ptrdiff_t ldbk = blk->ldbk;
    for (int r = 0; r < MR; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
        ar[r] = r < mr ? a + r * rsa : a;
    }
    for (int k = 0; k < kc; k++) {
        const __m512bh b0 = bh_load(b + k * ldbk);
        const __m512bh b1 = bh_load(b1p + k * ldbk);   /* (panel 0 again when np == 1) */
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                const __m512bh x = bh_set1(ar[r][k * csa]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
                if (np == 2) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
            }
        }
    }
    __asm__ __volatile__("" ::: "memory");
    store_12x32(mr, np, acc, c, bias, nv, blk);
}

/* ---------------------------------------------------------------------------------------- */
/* the walk over a block, shared by both kernels                                              */

#define CD_ROWS512(TILE, NPC)                             \
    switch (mr) {                                         \
    case 12: TILE(12, NPC); break;                        \
    case 11: TILE(11, NPC); break;                        \
    case 10: TILE(10, NPC); break;                        \
    case 9: TILE(9, NPC); break;                          \
    case 8: TILE(8, NPC); break;                          \
    case 7: TILE(7, NPC); break;                          \
    case 6: TILE(6, NPC); break;                          \
    case 5: TILE(5, NPC); break;                          \
    case 4: TILE(4, NPC); break;                          \
    case 3: TILE(3, NPC); break;                          \
    case 2: TILE(2, NPC); break;                          \
    default: TILE(1, NPC); break;                         \
    }

/* every (MR, 32) tile of the block: column pairs of panels outer, row tiles inner. ELEM is the
 * element type of a and b (float, or uint32_t for bf16 pairs), TILE the tile to run. */
#define CD_BLOCK512(ELEM, TILE, packed)                                            \
    do {                                                                           \
        const ptrdiff_t rsa = (packed) ? 1 : blk->rsa, csa = (packed) ? MR : 1;    \
        const int kc = blk->kc;                                                    \
        for (int j0 = 0, p = 0; j0 < blk->nc; j0 += 32, p += 2) {                  \
            const ELEM *b = (const ELEM *)(const void *)blk->b + p * blk->psb;     \
            const float *bias = blk->bias ? blk->bias + j0 : NULL;                 \
            const int nv = blk->nc - j0 < 32 ? blk->nc - j0 : 32;                  \
            for (int i0 = 0, t = 0; i0 < blk->mc; i0 += MR, t++) {                 \
                const ELEM *a = (const ELEM *)(const void *)blk->a + t * blk->pa;  \
                float *c = blk->c + i0 * blk->ldc + j0;                            \
                const int mr = blk->mc - i0 < MR ? blk->mc - i0 : MR;              \
                if (nv > 16) {                                                     \
                    CD_ROWS512(TILE, 2)                                            \
                } else {                                                           \
                    CD_ROWS512(TILE, 1)                                            \
                }                                                                  \
            }                                                                      \
        }                                                                          \
    } while (0)

#define CD_TILE_F32(MRC, NPC) \
    tile_12x32(MRC, NPC, kc, a, rsa, csa, b, blk->psb, c, bias, nv, blk)
#define CD_TILE_BF16(MRC, NPC) \
    tile_12x32_bf16(MRC, NPC, kc, a, rsa, csa, b, blk->psb, c, bias, nv, blk)

CD_AVX512_TARGET
void cd_gemm_block_avx512(const cd_gemm_block *blk) {
    if (blk->csa == 1) CD_BLOCK512(float, CD_TILE_F32, 0);
    else CD_BLOCK512(float, CD_TILE_F32, 1);
}

/* bf16 pairs; the left operand always packed (gemm.c packs it while rounding to bf16) */
CD_BF16_TARGET
void cd_gemm_block_bf16_avx512(const cd_gemm_block *blk) {
    CD_BLOCK512(uint32_t, CD_TILE_BF16, 1);
}

#else
typedef int cd_gemm_avx512_unused;   /* keeps the translation unit non-empty off x86 */
#endif
