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
#include <string.h>

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
/* bf16 pairs on AMX tiles (AMX-BF16 tdpbf16ps): C tiles of 16 x 16 float32, A tiles of 16 rows
 * x 32 depth (bf16, row-major: 16 words of pairs per row), B tiles of 16 pair rows x 16
 * columns, which are 16 consecutive pair rows of a weight panel (64 bytes each) as packed.
 * Up to 2 x 2 C tiles (32 x 32) stay in tiles 0-3 over the depth; tiles 4, 5 hold A, 6, 7 B.
 * The left operand is packed row-major (cd_gemm_pack_rows_bf16_rm): word (i, kp) at
 * a[i * rsa + kp], row tiles at pa, rows past mc zero up to a multiple of 32. kc (pairs) is a
 * multiple of 16. tdpbf16ps treats bf16 denormals as zero and flushes denormal sums.        */

#ifndef CD_AVX512_EMULATE
#define CD_AMX_TARGET __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} cd_amx_cfg;

/* C tile (rows, cols) <- alpha * t [+ bias] [+ C] from a 16 x 16 buffer */
CD_AMX_TARGET static void amx_epilogue(const float *t, float *c, ptrdiff_t ldc, int rows,
                                       int cols, const float *bias, float alpha, int load_c) {
    const __mmask16 m = first_lanes16(cols);
    const __m512 va = _mm512_set1_ps(alpha);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(t + 16 * r), va, vb);
        if (load_c) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c + r * ldc));
        _mm512_mask_storeu_ps(c + r * ldc, m, v);
    }
}

/* a tile is "direct" when all its 16 x 16 values are wanted and C is read and written by the
 * tile unit itself: alpha 1 and, with a bias, no accumulation (the bias row is loaded into
 * every row of the tile with stride 0) */
#define AMX_DIRECT(rows, cols) ((rows) == 16 && (cols) == 16 && blk->alpha == 1.0f && \
                                !(blk->bias && blk->load_c))

#define AMX_INIT(T, ok, cc, bb)                                                         \
    do {                                                                                \
        if (!(ok)) _tile_zero(T);                                                       \
        else if (blk->bias) _tile_loadd(T, (bb), 0);                                    \
        else if (blk->load_c) _tile_loadd(T, (cc), ldcb);                               \
        else _tile_zero(T);                                                             \
    } while (0)

#define AMX_FINISH(T, ok, cc, rows, cols, bb)                                           \
    do {                                                                                \
        if (ok) {                                                                       \
            _tile_stored(T, (cc), ldcb);                                                \
        } else {                                                                        \
            _tile_stored(T, tbuf, 64);                                                  \
            amx_epilogue(tbuf, (cc), ldc, (rows), (cols), (bb), blk->alpha, blk->load_c); \
        }                                                                               \
    } while (0)

/* a constant in memory: GCC 12 does not count ldtilecfg as a read of its operand, and at -O2
 * drops the stores that fill a configuration on the stack */
static const cd_amx_cfg amx_16x64 = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

CD_AMX_TARGET
void cd_amx_config_16x64(void) { _tile_loadconfig(&amx_16x64); }

CD_AMX_TARGET
void cd_gemm_block_bf16_amx(const cd_gemm_block *blk) {
    _Alignas(64) float tbuf[256];
    cd_amx_config_16x64();
    const uint32_t *A = (const uint32_t *)(const void *)blk->a;
    const uint32_t *Bw = (const uint32_t *)(const void *)blk->b;
    const ptrdiff_t ldc = blk->ldc, ldcb = ldc * (ptrdiff_t)sizeof(float);
    const ptrdiff_t rsb = blk->rsa * (ptrdiff_t)sizeof(uint32_t);   /* A row stride, bytes */
    const int kc = blk->kc;
    const int npanels = (blk->nc + 15) / 16;
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += 32, p += 2) {
        const uint32_t *b0 = Bw + p * blk->psb, *b1 = b0 + blk->psb;
        /* the next pair of panels (or the last lone one) is fetched into L2 while this pair
         * is multiplied, a few lines per depth step: from L3 it would stall the tile loads of
         * the first row tiles (up to 19% per layer, benchmarks/bench_gemm_ab.py) */
        const int pnext = p + 2 >= npanels ? 0 : (npanels - p - 2 < 2 ? npanels - p - 2 : 2);
        const char *pf = pnext ? (const char *)(const void *)(b0 + 2 * blk->psb) : NULL;
        ptrdiff_t pf_left = (ptrdiff_t)pnext * blk->psb * (ptrdiff_t)sizeof(uint32_t) / 64;
        const int steps = (blk->mc + 31) / 32 * (kc / 16);
        const ptrdiff_t pf_per_step = (pf_left + steps - 1) / steps;   /* lines */
        const int n0 = blk->nc - j0 < 16 ? blk->nc - j0 : 16;
        const int n1 = blk->nc - j0 - 16 < 16 ? blk->nc - j0 - 16 : 16;   /* <= 0: no panel */
        const float *bias0 = blk->bias ? blk->bias + j0 : NULL;
        const float *bias1 = blk->bias ? blk->bias + j0 + 16 : NULL;
        for (int i0 = 0, t = 0; i0 < blk->mc; i0 += 32, t += 2) {
            const uint32_t *a0 = A + t * blk->pa, *a1 = a0 + blk->pa;
            const int m0 = blk->mc - i0 < 16 ? blk->mc - i0 : 16;
            const int m1 = blk->mc - i0 - 16 < 16 ? blk->mc - i0 - 16 : 16;
            float *c00 = blk->c + i0 * ldc + j0, *c01 = c00 + 16;
            float *c10 = c00 + 16 * ldc, *c11 = c10 + 16;
            const int d00 = AMX_DIRECT(m0, n0), d01 = n1 > 0 && AMX_DIRECT(m0, n1);
            const int d10 = m1 > 0 && AMX_DIRECT(m1, n0);
            const int d11 = m1 > 0 && n1 > 0 && AMX_DIRECT(m1, n1);
            AMX_INIT(0, d00, c00, bias0);
            if (n1 > 0) AMX_INIT(1, d01, c01, bias1);
            if (m1 > 0) {
                AMX_INIT(2, d10, c10, bias0);
                if (n1 > 0) AMX_INIT(3, d11, c11, bias1);
            }
            if (n1 > 0 && m1 > 0) {
                for (int k = 0; k < kc; k += 16) {
                    for (ptrdiff_t l = 0; l < pf_per_step && pf_left > 0; l++, pf_left--) {
                        _mm_prefetch(pf, _MM_HINT_T1);
                        pf += 64;
                    }
                    _tile_loadd(4, a0 + k, rsb);
                    _tile_loadd(6, b0 + (ptrdiff_t)k * 16, 64);
                    _tile_loadd(7, b1 + (ptrdiff_t)k * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(5, a1 + k, rsb);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            } else {
                for (int k = 0; k < kc; k += 16) {
                    _tile_loadd(4, a0 + k, rsb);
                    _tile_loadd(6, b0 + (ptrdiff_t)k * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (n1 > 0) {
                        _tile_loadd(7, b1 + (ptrdiff_t)k * 16, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (m1 > 0) {
                        _tile_loadd(5, a1 + k, rsb);
                        _tile_dpbf16ps(2, 5, 6);
                    }
                }
            }
            AMX_FINISH(0, d00, c00, m0, n0, bias0);
            if (n1 > 0) AMX_FINISH(1, d01, c01, m0, n1, bias1);
            if (m1 > 0) {
                AMX_FINISH(2, d10, c10, m1, n0, bias0);
                if (n1 > 0) AMX_FINISH(3, d11, c11, m1, n1, bias1);
            }
        }
    }
    _tile_release();
}

/* rows [0, mc) x depth [0, kc) of a into bf16, row-major (word (i, kp) = pair of a[i, 2 kp],
 * a[i, 2 kp + 1]) at row stride kc / 2 words; kc a multiple of 32; rows mc .. mpad - 1 zero.
 * The rounding is cd_bf16_from_f32's (to nearest even, NaN kept quiet), lane by lane. */
CD_AMX_TARGET
void cd_gemm_pack_rows_bf16_rm(uint32_t *dst, const float *a, ptrdiff_t lda, int mc, int kc,
                               int mpad) {
    const int kw = kc / 2;
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i expm = _mm512_set1_epi32(0x7F800000), manm = _mm512_set1_epi32(0x007FFFFF);
    const __m512i qnan = _mm512_set1_epi32(0x0040);
    for (int i = 0; i < mc; i++) {
        const float *src = a + (ptrdiff_t)i * lda;
        uint16_t *d = (uint16_t *)(void *)(dst + (size_t)i * kw);
        for (int k = 0; k < kc; k += 16) {
            const __m512i u = _mm512_loadu_si512((const void *)(src + k));
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), lsb), 16);
            const __mmask16 isnan =
                _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, expm), expm) &
                _mm512_test_epi32_mask(u, manm);
            r = _mm512_mask_or_epi32(r, isnan, _mm512_srli_epi32(u, 16), qnan);
            _mm256_storeu_si256((__m256i *)(void *)(d + k), _mm512_cvtepi32_epi16(r));
        }
    }
    for (int i = mc; i < mpad; i++) memset(dst + (size_t)i * kw, 0, (size_t)kw * sizeof(uint32_t));
}
#else   /* the emulated build has no AMX (cpu.c never reports it there): never called */
void cd_amx_config_16x64(void) {}
void cd_gemm_block_bf16_amx(const cd_gemm_block *blk) { (void)blk; }
void cd_gemm_pack_rows_bf16_rm(uint32_t *dst, const float *a, ptrdiff_t lda, int mc, int kc,
                               int mpad) {
    (void)dst; (void)a; (void)lda; (void)mc; (void)kc; (void)mpad;
}
#endif

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
