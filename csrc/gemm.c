/* gemm.c -- the matrix products of the core: naive references, weight packing, and the
 * cache-blocked, register-tiled drivers that run the per-instruction-set block kernels.
 *
 * Shapes: out (M, OC) = inp (M, K) @ W^T + bias, W (OC, K) as in nn.Linear.
 *
 * Blocking (BLIS style). The weight is packed once, at load, into depth slices of K-major
 * panels of 16 output columns (gemm_kernels.h): one slice of one panel, (ks, 16), is contiguous
 * and the panels of a slice follow each other. cd_matmul gives each OpenMP thread a contiguous
 * share of the rows of C (or of the panels, when rows are few). A thread walks its rows in
 * blocks of MC; for each depth block kc it packs those rows of inp into MR-row K-major tiles
 * (MC x kc: stays in L2) and runs the block kernel, which walks the panels (a (kc, 16) panel
 * slice is reused by every row tile from L1/L2) and, inside, the row tiles (MR x 16
 * accumulators in registers; bias and accumulate fused in the store). Inside an enclosing
 * parallel region everything runs on the calling thread.
 *
 * cd_sgemm_nt / cd_sgemm_nn pack B (32 columns x kc) onto the stack and read A in place;
 * outside a parallel region the (column block, row block) jobs are shared among the threads.
 */
#include "gemm.h"
#include "gemm_kernels.h"
#include "cpu.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* naive references                                                                           */

/* out (M, OC) = inp @ weight^T + bias, plain loops; bf16: both operands rounded first */
static void matmul_naive(float *out, const float *inp, const float *weight, const float *bias,
                         int M, int K, int OC, int accumulate, int bf16) {
    cd_mark_omp_used();
    #pragma omp parallel for schedule(static) if (M > 1 && !cd_forked_child())
    for (int m = 0; m < M; m++) {
        const float *x = inp + (size_t)m * K;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * K;
            float s = 0.0f;
            for (int k = 0; k < K; k++)
                s += bf16 ? cd_bf16_round(x[k]) * cd_bf16_round(w[k]) : x[k] * w[k];
            s += bias ? bias[o] : 0.0f;
            float *y = out + (size_t)m * OC + o;
            *y = accumulate ? *y + s : s;
        }
    }
}

void cd_matmul_naive(float *out, const float *inp, const float *weight, const float *bias,
                     int M, int K, int OC, int accumulate) {
    matmul_naive(out, inp, weight, bias, M, K, OC, accumulate, 0);
}

void cd_matmul_bf16_naive(float *out, const float *inp, const float *weight, const float *bias,
                          int M, int K, int OC, int accumulate) {
    matmul_naive(out, inp, weight, bias, M, K, OC, accumulate, 1);
}

void cd_sgemm_nt_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)i * lda + k] * B[(size_t)j * ldb + k];
            float *c = C + (size_t)i * ldc + j;
            *c = accumulate ? *c + alpha * s : alpha * s;
        }
}

void cd_sgemm_nn_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        if (!accumulate) for (int j = 0; j < N; j++) c[j] = 0.0f;
        for (int k = 0; k < K; k++) {
            float a = alpha * A[(size_t)i * lda + k];
            const float *b = B + (size_t)k * ldb;
            for (int j = 0; j < N; j++) c[j] += a * b[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the portable block kernel: a 4 x 16 tile, in two 4 x 8 halves, on 4-float vectors of the
 * GNU C vector extension (SSE2 on baseline x86-64, NEON on Arm): 8 accumulators fit the 16
 * registers of either. Left to itself the compiler vectorises the depth loop instead. */

#define MRG CD_GEMM_MR_GENERIC
typedef float cd_v4f __attribute__((vector_size(16)));

static inline cd_v4f v4_load(const float *p) { cd_v4f v; memcpy(&v, p, sizeof v); return v; }

static inline void tile_generic(int mr, int kc, const float *a, ptrdiff_t rsa, ptrdiff_t csa,
                                const float *b, float *c, const float *bias, int nv,
                                const cd_gemm_block *blk) {
    for (int h = 0; h < CD_GEMM_NR && h < nv; h += 8) {
        cd_v4f acc[MRG][2];
        for (int r = 0; r < MRG; r++) acc[r][0] = acc[r][1] = (cd_v4f){0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < kc; k++) {
            const cd_v4f b0 = v4_load(b + k * blk->ldbk + h);
            const cd_v4f b1 = v4_load(b + k * blk->ldbk + h + 4);
            for (int r = 0; r < mr; r++) {
                const float x = a[r * rsa + k * csa];
                acc[r][0] += x * b0;
                acc[r][1] += x * b1;
            }
        }
        const int jn = nv - h < 8 ? nv - h : 8;
        for (int r = 0; r < mr; r++) {
            float t[8], *cr = c + r * blk->ldc + h;
            memcpy(t, &acc[r][0], sizeof(cd_v4f));
            memcpy(t + 4, &acc[r][1], sizeof(cd_v4f));
            for (int j = 0; j < jn; j++) {
                float v = blk->alpha * t[j] + (bias ? bias[h + j] : 0.0f);
                cr[j] = blk->load_c ? cr[j] + v : v;
            }
        }
    }
}

/* packed: A in MRG-row K-major tiles (rsa = 1, csa = MRG), else strided (csa = 1); as
 * constants after inlining, with constant row counts, they let the compiler keep the tile in
 * registers */
static inline void block_generic(const cd_gemm_block *blk, int packed) {
    const ptrdiff_t rsa = packed ? 1 : blk->rsa, csa = packed ? MRG : 1;
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += CD_GEMM_NR, p++) {
        const float *b = blk->b + p * blk->psb;
        const float *bias = blk->bias ? blk->bias + j0 : NULL;
        const int nv = blk->nc - j0 < CD_GEMM_NR ? blk->nc - j0 : CD_GEMM_NR;
        for (int i0 = 0, t = 0; i0 < blk->mc; i0 += MRG, t++) {
            const float *a = blk->a + t * blk->pa;
            float *c = blk->c + i0 * blk->ldc + j0;
            const int mr = blk->mc - i0 < MRG ? blk->mc - i0 : MRG;
            switch (mr) {
            case 4: tile_generic(4, blk->kc, a, rsa, csa, b, c, bias, nv, blk); break;
            case 3: tile_generic(3, blk->kc, a, rsa, csa, b, c, bias, nv, blk); break;
            case 2: tile_generic(2, blk->kc, a, rsa, csa, b, c, bias, nv, blk); break;
            default: tile_generic(1, blk->kc, a, rsa, csa, b, c, bias, nv, blk); break;
            }
        }
    }
}

void cd_gemm_block_generic(const cd_gemm_block *blk) {
    if (blk->csa == 1) block_generic(blk, 0);
    else block_generic(blk, 1);
}

/* the portable kernel on bf16 pairs (gemm_kernels.h; a always packed): each pair widened to two
 * float32 values, the products summed in float32 in the order of vdpbf16ps (odd, then even).
 * It runs a bf16 weight where the CPU has no AVX512_BF16 (e.g. under CLIPDECOMP_ISA=avx2). */
void cd_gemm_block_bf16_generic(const cd_gemm_block *blk) {
    const uint32_t *A = (const uint32_t *)(const void *)blk->a;
    const uint32_t *Bw = (const uint32_t *)(const void *)blk->b;
    const int mr = (int)blk->csa;   /* packed: csa = MR, the row tile */
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += CD_GEMM_NR, p++) {
        const uint32_t *b = Bw + p * blk->psb;
        const int nv = blk->nc - j0 < CD_GEMM_NR ? blk->nc - j0 : CD_GEMM_NR;
        for (int i = 0; i < blk->mc; i++) {
            const uint32_t *a = A + (i / mr) * blk->pa + (i % mr);
            float acc[CD_GEMM_NR] = {0};
            for (int k = 0; k < blk->kc; k++) {
                const uint32_t x = a[(ptrdiff_t)k * mr];
                const float x0 = cd_bf16_to_f32((uint16_t)(x & 0xFFFFu));
                const float x1 = cd_bf16_to_f32((uint16_t)(x >> 16));
                const uint32_t *bk = b + k * blk->ldbk;
                for (int j = 0; j < CD_GEMM_NR; j++) {
                    acc[j] = fmaf(x1, cd_bf16_to_f32((uint16_t)(bk[j] >> 16)), acc[j]);
                    acc[j] = fmaf(x0, cd_bf16_to_f32((uint16_t)(bk[j] & 0xFFFFu)), acc[j]);
                }
            }
            float *c = blk->c + (ptrdiff_t)i * blk->ldc + j0;
            for (int j = 0; j < nv; j++) {
                const float v = blk->alpha * acc[j] + (blk->bias ? blk->bias[j0 + j] : 0.0f);
                c[j] = blk->load_c ? c[j] + v : v;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* dispatch and blocking parameters                                                           */

#define CD_GEMM_MAX_ROWS (1 << 30)   /* larger sizes are split (or refused by the packer), so
                                      * the int arithmetic of rows, columns, depth cannot overflow */

typedef void (*block_fn)(const cd_gemm_block *blk);

typedef struct {
    block_fn fn;
    int bf16;      /* the kernel reads bf16 pairs (CD_GEMM_BF16 weights) */
    int amx;       /* ... on AMX tiles: A packed row-major (cd_gemm_pack_rows_bf16_rm) */
    int mr;        /* row tile of the micro-kernel */
    int mc;        /* rows of a matmul job (multiple of mr): mc x kc floats of A stay in L2 */
    int kc;        /* largest depth block (<= CD_GEMM_KS): a (kc, 16) panel slice stays near L1 */
} gemm_path;

/* bf16 pairs: the AVX512_BF16 kernel, or the portable one; both read 12-row tiles of A. Depth
 * blocks of 256 (128 pairs) keep a pair panel slice in L1 like the float32 paths. */
static gemm_path path_for_bf16_dp(void) {
    gemm_path p = {cd_gemm_block_bf16_generic, 1, 0, CD_GEMM_MR_AVX512, 96, 256};
#if defined(__x86_64__) || defined(_M_X64)
    if (cd_cpu_has_bf16()) p.fn = cd_gemm_block_bf16_avx512;
#endif
    return p;
}

/* On AMX (where the CPU has it and the depth K is a multiple of 32, so that every depth block
 * is whole A and B tiles): 16-row tiles, the kernel called per 512-deep slice (a pair of
 * panels of the slice, 32 KiB, in L1); jobs as matmul_part_amx walks them (mc unused). */
static gemm_path path_for_bf16(int K) {
#if defined(__x86_64__) || defined(_M_X64)
    if (K % 32 == 0 && cd_cpu_has_amx()) {
        gemm_path p = {cd_gemm_block_bf16_amx, 1, 1, 16, 128, CD_GEMM_KS};
        return p;
    }
#endif
    (void)K;
    return path_for_bf16_dp();
}

static gemm_path path_for(int isa) {
    gemm_path p = {cd_gemm_block_generic, 0, 0, CD_GEMM_MR_GENERIC, 64, 256};
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == CD_ISA_AVX512) {
        p.fn = cd_gemm_block_avx512; p.mr = CD_GEMM_MR_AVX512; p.mc = 96; p.kc = 256;
    } else if (isa == CD_ISA_AVX2) {
        p.fn = cd_gemm_block_avx2; p.mr = CD_GEMM_MR_AVX2; p.mc = 144; p.kc = 512;
    }
#else
    (void)isa;
#endif
    return p;
}

/* threads to use for `jobs` jobs worth `flops` in all: 1 inside any parallel region (also a
 * one-thread team: its caller chose the threads), 1 for small products */
static int gemm_threads(long long jobs, double flops) {
#ifdef _OPENMP
    if (omp_get_level() > 0 || omp_in_parallel() || jobs < 2 || flops < 2e6 ||
        cd_forked_child())
        return 1;
    cd_mark_omp_used();
    int nt = omp_get_max_threads();
    return nt < jobs ? nt : (int)jobs;
#else
    (void)jobs; (void)flops;
    return 1;
#endif
}

/* K split into slices of at most kcmax, as equal as possible */
static int depth_slice(int K, int kcmax) {
    int nk = (K + kcmax - 1) / kcmax;
    return (K + nk - 1) / nk;
}

/* ------------------------------------------------------------------------------------------ */
/* packing                                                                                    */

void cd_gemm_pack_t16_generic(float *panel, const float *src, ptrdiff_t ld, int nv, int kc) {
    if (nv < CD_GEMM_NR) memset(panel, 0, (size_t)kc * CD_GEMM_NR * sizeof(float));
    for (int j = 0; j < nv; j++) {
        const float *row = src + j * ld;
        for (int k = 0; k < kc; k++) panel[(size_t)k * CD_GEMM_NR + j] = row[k];
    }
}

typedef void (*pack_fn)(float *panel, const float *src, ptrdiff_t ld, int nv, int kc);

static pack_fn pack_for(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
    if (isa >= CD_ISA_AVX2) return cd_gemm_pack_t16_avx2;   /* AVX-512 CPUs have AVX2 */
#else
    (void)isa;
#endif
    return cd_gemm_pack_t16_generic;
}

int cd_gemm_pack(cd_gemm_weight *pw, const float *weight, int OC, int K) {
    if (!pw) return -1;
    memset(pw, 0, sizeof(*pw));
    /* (OC and K near INT_MAX would overflow the int arithmetic of the kernels' loops) */
    if (!weight || OC <= 0 || K <= 0 || OC > CD_GEMM_MAX_ROWS || K > CD_GEMM_MAX_ROWS) return -1;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;   /* panels */
    const size_t per_panel = (size_t)K * CD_GEMM_NR;                  /* floats per panel */
    if (per_panel / CD_GEMM_NR != (size_t)K || np > SIZE_MAX / per_panel) return -1;
    const size_t n = np * per_panel;
    /* the kernels index with ptrdiff_t: stay below PTRDIFF_MAX bytes */
    if (n > ((size_t)PTRDIFF_MAX - 63) / sizeof(float)) return -1;
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;   /* aligned_alloc wants a multiple */
    float *dst = (float *)aligned_alloc(64, bytes);
    if (!dst) return -1;
    /* slice from depth k0, panel p: (k, j) at dst[16*np*k0 + ks*16*p + (k - k0)*16 + j]
     *                                      = weight[16 p + j, k], zero past OC (gemm_kernels.h) */
    const int isa = cd_cpu_isa();
    const pack_fn pack = pack_for(isa);
    for (int k0 = 0; k0 < K; k0 += CD_GEMM_KS) {
        const int ks = K - k0 < CD_GEMM_KS ? K - k0 : CD_GEMM_KS;
        float *slice = dst + (size_t)k0 * CD_GEMM_NR * np;
        for (size_t p = 0; p < np; p++) {
            const int j0 = (int)p * CD_GEMM_NR;
            const int nv = OC - j0 < CD_GEMM_NR ? OC - j0 : CD_GEMM_NR;
            pack(slice + p * (size_t)ks * CD_GEMM_NR, weight + (size_t)j0 * K + k0, K, nv, ks);
        }
    }
    pw->OC = OC; pw->K = K; pw->packed = dst; pw->packed_len = n;
    pw->isa = isa;
    pw->panel = CD_GEMM_NR;
    pw->slice = CD_GEMM_KS;
    return 0;
}

void cd_gemm_weight_free(cd_gemm_weight *pw) {
    if (!pw) return;
    free(pw->packed);
    free(pw->packed_bf16);
    memset(pw, 0, sizeof(*pw));
}

int cd_gemm_pack_bf16(cd_gemm_weight *pw, const float *weight, int OC, int K) {
    if (!pw) return -1;
    memset(pw, 0, sizeof(*pw));
    if (!weight || OC <= 0 || K <= 0 || OC > CD_GEMM_MAX_ROWS || K > CD_GEMM_MAX_ROWS) return -1;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const size_t pairs = ((size_t)K + 1) / 2;
    if (np > SIZE_MAX / CD_GEMM_NR / pairs) return -1;
    const size_t words = np * CD_GEMM_NR * pairs;
    if (words > ((size_t)PTRDIFF_MAX - 63) / sizeof(uint32_t)) return -1;
    const size_t bytes = (words * sizeof(uint32_t) + 63) / 64 * 64;
    uint32_t *dst = (uint32_t *)aligned_alloc(64, bytes);
    if (!dst) return -1;
    /* the layout cd_gemm_to_bf16 makes from cd_gemm_pack's, straight from the (OC, K) rows */
    for (int s0 = 0; s0 < K; s0 += CD_GEMM_KS) {
        const int ks = K - s0 < CD_GEMM_KS ? K - s0 : CD_GEMM_KS, ks2 = (ks + 1) / 2;
        uint32_t *bs = dst + (size_t)(s0 / 2) * CD_GEMM_NR * np;
        for (size_t p = 0; p < np; p++) {
            uint32_t *out = bs + p * (size_t)ks2 * CD_GEMM_NR;
            for (int j = 0; j < CD_GEMM_NR; j++) {
                const size_t o = p * CD_GEMM_NR + (size_t)j;
                const float *row = weight + o * (size_t)K + s0;
                for (int kp = 0; kp < ks2; kp++) {
                    uint32_t lo = 0, hi = 0;
                    if (o < (size_t)OC) {
                        lo = cd_bf16_from_f32(row[2 * kp]);
                        if (2 * kp + 1 < ks) hi = cd_bf16_from_f32(row[2 * kp + 1]);
                    }
                    out[(size_t)kp * CD_GEMM_NR + j] = lo | hi << 16;
                }
            }
        }
    }
    pw->OC = OC; pw->K = K;
    pw->packed_bf16 = dst; pw->packed_bf16_len = words;
    pw->precision = CD_GEMM_BF16;
    pw->isa = cd_cpu_isa();
    pw->panel = CD_GEMM_NR;
    pw->slice = CD_GEMM_KS;
    return 0;
}

int cd_gemm_unpack(const cd_gemm_weight *pw, float *dst) {
    if (!pw || !dst || pw->panel != CD_GEMM_NR || pw->slice != CD_GEMM_KS) return -1;
    const int OC = pw->OC, K = pw->K;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int bf16 = pw->precision == CD_GEMM_BF16;
    if (bf16 ? !pw->packed_bf16 : !pw->packed) return -1;
    /* the inverse of the layouts of cd_gemm_pack and cd_gemm_to_bf16 above */
    for (int k0 = 0; k0 < K; k0 += CD_GEMM_KS) {
        const int ks = K - k0 < CD_GEMM_KS ? K - k0 : CD_GEMM_KS, ks2 = (ks + 1) / 2;
        for (size_t p = 0; p < np; p++) {
            const int j0 = (int)p * CD_GEMM_NR;
            const int nv = OC - j0 < CD_GEMM_NR ? OC - j0 : CD_GEMM_NR;
            if (!bf16) {
                const float *src = pw->packed + (size_t)k0 * CD_GEMM_NR * np +
                                   p * (size_t)ks * CD_GEMM_NR;
                for (int k = 0; k < ks; k++)
                    for (int j = 0; j < nv; j++)
                        dst[(size_t)(j0 + j) * K + k0 + k] = src[(size_t)k * CD_GEMM_NR + j];
            } else {
                const uint32_t *src = pw->packed_bf16 + (size_t)(k0 / 2) * CD_GEMM_NR * np +
                                      p * (size_t)ks2 * CD_GEMM_NR;
                for (int k = 0; k < ks; k++)
                    for (int j = 0; j < nv; j++) {
                        const uint32_t pair = src[(size_t)(k / 2) * CD_GEMM_NR + j];
                        dst[(size_t)(j0 + j) * K + k0 + k] =
                            cd_bf16_to_f32((uint16_t)(k % 2 ? pair >> 16 : pair & 0xffffu));
                    }
            }
        }
    }
    return 0;
}

int cd_gemm_to_bf16(cd_gemm_weight *pw, int precision) {
    if (!pw || !pw->packed || pw->precision != CD_GEMM_FP32) return -1;
    if (precision == CD_GEMM_BF16_EMULATED) {   /* round in place: same layout, fp32 kernels */
        for (size_t i = 0; i < pw->packed_len; i++) pw->packed[i] = cd_bf16_round(pw->packed[i]);
        pw->precision = CD_GEMM_BF16_EMULATED;
        return 0;
    }
    if (precision != CD_GEMM_BF16) return -1;
    const int K = pw->K;
    const size_t np = ((size_t)pw->OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    /* every slice but the last has an even depth (512), so the pair rows add up to ceil(K/2) */
    const size_t words = np * CD_GEMM_NR * (((size_t)K + 1) / 2);   /* <= packed_len: no overflow */
    const size_t bytes = (words * sizeof(uint32_t) + 63) / 64 * 64;
    uint32_t *dst = (uint32_t *)aligned_alloc(64, bytes);
    if (!dst) return -1;
    for (int s0 = 0; s0 < K; s0 += CD_GEMM_KS) {
        const int ks = K - s0 < CD_GEMM_KS ? K - s0 : CD_GEMM_KS, ks2 = (ks + 1) / 2;
        const float *fs = pw->packed + (size_t)s0 * CD_GEMM_NR * np;
        uint32_t *bs = dst + (size_t)(s0 / 2) * CD_GEMM_NR * np;
        for (size_t p = 0; p < np; p++) {
            const float *src = fs + p * (size_t)ks * CD_GEMM_NR;     /* (ks, 16) */
            uint32_t *out = bs + p * (size_t)ks2 * CD_GEMM_NR;        /* (ks2, 16) pairs */
            for (int kp = 0; kp < ks2; kp++)
                for (int j = 0; j < CD_GEMM_NR; j++) {
                    const uint32_t lo = cd_bf16_from_f32(src[(size_t)(2 * kp) * CD_GEMM_NR + j]);
                    const uint32_t hi = 2 * kp + 1 < ks
                        ? cd_bf16_from_f32(src[(size_t)(2 * kp + 1) * CD_GEMM_NR + j]) : 0u;
                    out[(size_t)kp * CD_GEMM_NR + j] = lo | hi << 16;
                }
        }
    }
    free(pw->packed);
    pw->packed = NULL;
    pw->packed_len = 0;
    pw->packed_bf16 = dst;
    pw->packed_bf16_len = words;
    pw->precision = CD_GEMM_BF16;
    return 0;
}

/* rows [0, mc) x depth [0, kc) of a into mr-row tiles of bf16 pairs (gemm_kernels.h):
 *     dst[t * mr * kc2 + kp * mr + r] = pair(a[t mr + r, 2 kp], a[t mr + r, 2 kp + 1]),
 * kc2 = ceil(kc / 2); zero past the depth and in rows past mc */
static void pack_rows_bf16(uint32_t *dst, const float *a, ptrdiff_t lda, int mc, int kc, int mr) {
    const int kc2 = (kc + 1) / 2;
    for (int i0 = 0; i0 < mc; i0 += mr) {
        const int rows = mc - i0 < mr ? mc - i0 : mr;
        uint32_t *d = dst + (size_t)i0 * kc2;
        for (int r = 0; r < mr; r++) {
            const float *src = a + (ptrdiff_t)(i0 + r) * lda;
            for (int kp = 0; kp < kc2; kp++) {
                uint32_t v = 0;
                if (r < rows) {
                    v = cd_bf16_from_f32(src[2 * kp]);
                    if (2 * kp + 1 < kc) v |= (uint32_t)cd_bf16_from_f32(src[2 * kp + 1]) << 16;
                }
                d[(size_t)kp * mr + r] = v;
            }
        }
    }
}

void cd_gemm_pack_rows_generic(float *dst, const float *a, ptrdiff_t lda, int mc, int kc,
                               int mr) {
    for (int i0 = 0; i0 < mc; i0 += mr) {
        const int rows = mc - i0 < mr ? mc - i0 : mr;
        float *d = dst + (size_t)i0 * kc;
        const float *src = a + (ptrdiff_t)i0 * lda;
        for (int k = 0; k < kc; k++) {   /* contiguous stores, mr read streams */
            for (int r = 0; r < rows; r++) d[(size_t)k * mr + r] = src[r * lda + k];
            for (int r = rows; r < mr; r++) d[(size_t)k * mr + r] = 0.0f;
        }
    }
}

/* rows of A into the path's row tiles (gemm_kernels.h) */
static void pack_rows(const gemm_path *P, float *dst, const float *a, size_t lda, int mc,
                      int kc) {
#if defined(__x86_64__) || defined(_M_X64)
    if (P->fn == cd_gemm_block_avx2 || P->fn == cd_gemm_block_avx512) {   /* both have AVX2 */
        cd_gemm_pack_rows_avx2(dst, a, (ptrdiff_t)lda, mc, kc, P->mr);
        return;
    }
#endif
    cd_gemm_pack_rows_generic(dst, a, (ptrdiff_t)lda, mc, kc, P->mr);
}

/* ------------------------------------------------------------------------------------------ */
/* out (M, OC) = inp (M, K) @ W^T + bias                                                      */

#define BF16_STACK_WORDS (96 * 128 + CD_GEMM_PACK_SLACK)

/* the right-hand side and the output of a block: panels of a packed weight slice (ksw depth
 * rows, or words of pairs, per panel) from b; C at c (row stride ldc), the bias added by the
 * first depth block (depth k0 == 0) and C's values kept by the later ones or when accumulating */
static void block_bc(cd_gemm_block *blk, const float *b, int ksw, float *c, int ldc,
                     const float *bias, int k0, int accumulate) {
    blk->b = b;
    blk->psb = (ptrdiff_t)ksw * CD_GEMM_NR;
    blk->ldbk = CD_GEMM_NR;
    blk->c = c;
    blk->ldc = ldc;
    blk->bias = k0 == 0 ? bias : NULL;
    blk->alpha = 1.0f;
    blk->load_c = accumulate || k0 > 0;
}

/* AMX: the rows of a job are packed once over the whole depth (row-major bf16, rows to a
 * multiple of 32), at most AMX_A_BYTES of them, so a job has 128 rows up to K = 3072. The
 * columns are walked in blocks of AMX_NB, each over every depth slice before the next: the
 * job's C block (rows x AMX_NB floats) and one slice of the block's weights (512 x AMX_NB
 * bf16) stay in L2 while the slices add into C, where a walk over all columns per slice sends
 * C out to L3 and back (ViT-B/16's MLP: 1.5 MiB of C per 128 rows). */
#define AMX_A_BYTES (768 * 1024)
#define AMX_NB 768

static int amx_rows(int K) {
    int mc = (int)(AMX_A_BYTES / ((size_t)K * 2)) / 32 * 32;
    return mc < 32 ? 32 : (mc > 128 ? 128 : mc);
}

/* bytes of the packed rows of an AMX job (amx_rows(K) rows, padded) */
static size_t amx_abytes(int K) {
    const size_t words = (size_t)amx_rows(K) * (size_t)(K / 2) + CD_GEMM_PACK_SLACK;
    return (words * sizeof(uint32_t) + 63) / 64 * 64;
}

static void matmul_part_amx(const gemm_path *P, float *out, const float *inp,
                            const cd_gemm_weight *w, const float *bias, int accumulate,
                            int i0, int i1, int p0, int p1, uint32_t *abuf) {
    const int K = w->K, OC = w->OC, kw = K / 2, mcmax = amx_rows(K);
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int prof = cd_prof_on();
    const uint32_t *packed = w->packed_bf16;
    for (int ib = i0; ib < i1; ib += mcmax) {
        const int mc = i1 - ib < mcmax ? i1 - ib : mcmax;
        const double t0 = prof ? cd_prof_now() : 0.0;
#if defined(__x86_64__) || defined(_M_X64)
        cd_gemm_pack_rows_bf16_rm(abuf, inp + (size_t)ib * K, (ptrdiff_t)K, mc, K,
                                  (mc + 31) / 32 * 32);
#endif
        if (prof) cd_prof_add(CD_PROF_PACK_BF16, cd_prof_now() - t0);
        for (int q0 = p0; q0 < p1; q0 += AMX_NB / CD_GEMM_NR) {
            const int q1 = p1 - q0 < AMX_NB / CD_GEMM_NR ? p1 : q0 + AMX_NB / CD_GEMM_NR;
            const int jb0 = q0 * CD_GEMM_NR;
            const int jb1 = q1 * CD_GEMM_NR < OC ? q1 * CD_GEMM_NR : OC;
            for (int s0 = 0; s0 < K; s0 += CD_GEMM_KS) {   /* one kernel call per slice */
                const int ksw = (K - s0 < CD_GEMM_KS ? K - s0 : CD_GEMM_KS) / 2;
                const uint32_t *slice = packed + (size_t)(s0 / 2) * CD_GEMM_NR * np;
                cd_gemm_block blk;
                blk.mc = mc; blk.nc = jb1 - jb0; blk.kc = ksw;
                blk.a = (const float *)(const void *)(abuf + s0 / 2);
                blk.pa = (ptrdiff_t)16 * kw; blk.rsa = kw; blk.csa = 1;
                block_bc(&blk, (const float *)(const void *)(slice + (size_t)q0 * ksw * CD_GEMM_NR),
                         ksw, out + (size_t)ib * OC + jb0, OC, bias ? bias + jb0 : NULL, s0,
                         accumulate);
                P->fn(&blk);
            }
        }
    }
}

/* rows [i0, i1) x panels [p0, p1) of out, on the calling thread; abuf: mc x kc floats or NULL.
 * On a CD_GEMM_BF16 weight (P->bf16) the same walk runs over the pair layout, counted in
 * 32-bit words of two depth rows, with A always packed into pairs (into abuf, or a buffer on
 * the stack when there is none). */
static void matmul_part(const gemm_path *P, float *out, const float *inp,
                        const cd_gemm_weight *w, const float *bias, int accumulate,
                        int i0, int i1, int p0, int p1, float *abuf) {
    if (P->amx) {
        if (abuf) {
            matmul_part_amx(P, out, inp, w, bias, accumulate, i0, i1, p0, p1,
                            (uint32_t *)(void *)abuf);
        } else {   /* no scratch for the row-major A: the vdpbf16ps kernel */
            const gemm_path Q = path_for_bf16_dp();
            matmul_part(&Q, out, inp, w, bias, accumulate, i0, i1, p0, p1, abuf);
        }
        return;
    }
    const int K = w->K, OC = w->OC;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int kcb = P->kc < CD_GEMM_KS ? P->kc : CD_GEMM_KS;   /* even */
    const int j0 = p0 * CD_GEMM_NR;
    const int j1 = p1 * CD_GEMM_NR < OC ? p1 * CD_GEMM_NR : OC;
    if (i0 >= i1 || j0 >= j1) return;
    const int pairs = P->bf16;   /* 1: depth rows two to a word, so depths shift right by one */
    const int emulate = w->precision == CD_GEMM_BF16_EMULATED;
    const int prof = pairs && cd_prof_on();
    /* both layouts hold 4-byte words; the kernels read them as their layout says */
    const float *packed = pairs ? (const float *)(const void *)w->packed_bf16 : w->packed;
    _Alignas(64) uint32_t sbuf[pairs && !abuf ? BF16_STACK_WORDS : 1];
    uint32_t *apairs = abuf ? (uint32_t *)(void *)abuf : sbuf;   /* mc x kc/2 words fit */
    for (int ib = i0; ib < i1; ib += P->mc) {
        const int mc = i1 - ib < P->mc ? i1 - ib : P->mc;
        const float *arows = inp + (size_t)ib * K;
        for (int s0 = 0; s0 < K; s0 += CD_GEMM_KS) {          /* slices of the packed weight */
            const int ks = K - s0 < CD_GEMM_KS ? K - s0 : CD_GEMM_KS;
            const int ksw = (ks + pairs) >> pairs;             /* its depth rows in words */
            const float *slice = packed + (size_t)(s0 >> pairs) * CD_GEMM_NR * np;
            for (int k0 = s0; k0 < s0 + ks; k0 += kcb) {      /* the kernel's depth blocks */
                const int kc = s0 + ks - k0 < kcb ? s0 + ks - k0 : kcb;
                const int kcw = (kc + pairs) >> pairs;
                cd_gemm_block blk;
                blk.mc = mc; blk.nc = j1 - j0; blk.kc = kcw;
                if (pairs) {
                    const double t0 = prof ? cd_prof_now() : 0.0;
                    pack_rows_bf16(apairs, arows + k0, (ptrdiff_t)K, mc, kc, P->mr);
                    if (prof) cd_prof_add(CD_PROF_PACK_BF16, cd_prof_now() - t0);
                    blk.a = (const float *)(const void *)apairs;
                    blk.pa = (ptrdiff_t)P->mr * kcw; blk.rsa = 1; blk.csa = P->mr;
                } else if (abuf) {
                    pack_rows(P, abuf, arows + k0, (size_t)K, mc, kc);
                    if (emulate) {   /* the bf16 rounding of the left operand */
                        const size_t n = (size_t)((mc + P->mr - 1) / P->mr) * P->mr * kc;
                        for (size_t i = 0; i < n; i++) abuf[i] = cd_bf16_round(abuf[i]);
                    }
                    blk.a = abuf; blk.pa = (ptrdiff_t)P->mr * kc; blk.rsa = 1; blk.csa = P->mr;
                } else {   /* no scratch: read inp in place (slower, same sums; when
                            * emulating bf16, the left operand then goes unrounded) */
                    blk.a = arows + k0; blk.pa = (ptrdiff_t)P->mr * K; blk.rsa = K; blk.csa = 1;
                }
                block_bc(&blk, slice + (size_t)p0 * ksw * CD_GEMM_NR +
                                   (size_t)((k0 - s0) >> pairs) * CD_GEMM_NR,
                         ksw, out + (size_t)ib * OC + j0, OC, bias ? bias + j0 : NULL, k0,
                         accumulate);
                P->fn(&blk);
            }
        }
    }
}

void cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
               int M, int accumulate) {
    if (!out || !inp || !w || M <= 0) return;
    if (w->precision == CD_GEMM_BF16 ? !w->packed_bf16 : !w->packed) return;
    if (w->panel != CD_GEMM_NR || w->slice != CD_GEMM_KS) return;   /* not from cd_gemm_pack */
    if (M > CD_GEMM_MAX_ROWS) {   /* keep every row count below int overflow: halves */
        const int h = M / 2;
        cd_matmul(out, inp, w, bias, h, accumulate);
        cd_matmul(out + (size_t)h * w->OC, inp + (size_t)h * w->K, w, bias, M - h, accumulate);
        return;
    }
    const double prof_t0 = cd_prof_begin();
    /* every path reads the same panel layout, whatever path was active at pack time */
    const gemm_path P =
        w->precision == CD_GEMM_BF16 ? path_for_bf16(w->K) : path_for(cd_cpu_isa());
    const int np = (w->OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int mt = (M + P.mr - 1) / P.mr;                      /* row tiles */
    int nt = gemm_threads((long long)mt * np, 2.0 * M * (double)w->K * w->OC);
    /* rows when there are enough of them (each thread packs only its own rows), else panels */
    const int by_rows = mt >= 8 * nt;
    if (!by_rows && nt > np) nt = np;
    const int kcb = P.kc < CD_GEMM_KS ? P.kc : CD_GEMM_KS;
    const size_t abytes = P.amx ? amx_abytes(w->K) :
        (((size_t)P.mc * kcb + CD_GEMM_PACK_SLACK) * sizeof(float) + 63) / 64 * 64;
    int next = 0;   /* by rows: the first row tile nobody has taken yet */
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *abuf = (float *)aligned_alloc(64, abytes);
        if (nt == 1) {
            matmul_part(&P, out, inp, w, bias, accumulate, 0, M, 0, np, abuf);
        } else if (by_rows) {
            /* guided self-scheduling: chunks of (remaining / threads) row tiles, at least 4,
             * so that a thread slowed by other work on its core does not hold up the rest */
            for (;;) {
                int t0, len;
                #pragma omp critical(cd_matmul_rows)
                {
                    t0 = next;
                    len = (mt - t0 + nt - 1) / nt;
                    if (len < 4) len = 4;
                    if (len > mt - t0) len = mt - t0;
                    next = t0 + len;
                }
                if (len <= 0) break;
                const long long i1 = (long long)(t0 + len) * P.mr;
                matmul_part(&P, out, inp, w, bias, accumulate, t0 * P.mr, i1 < M ? (int)i1 : M, 0,
                            np, abuf);
            }
        } else {
            /* few rows: contiguous, near-equal shares of the panels */
            int t = 0, nth = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            nth = omp_get_num_threads();   /* the team may be smaller than asked for */
#endif
            const int p0 = (int)((long long)np * t / nth);
            const int p1 = (int)((long long)np * (t + 1) / nth);
            matmul_part(&P, out, inp, w, bias, accumulate, 0, M, p0, p1, abuf);
        }
        free(abuf);
    }
    cd_prof_end(w->precision == CD_GEMM_BF16 ? CD_PROF_GEMM_BF16 : CD_PROF_GEMM_F32, prof_t0);
}

/* ------------------------------------------------------------------------------------------ */
/* C (M, N) (+)= alpha * A (M, K) @ op(B) on strided operands                                 */

#define SG_KC 256              /* depth slice of a packed B block */
#define SG_NP 2                /* panels (16 columns) per packed B block: 32 columns */

/* B block for columns [j0, j0 + nc) and depth [k0, k0 + kc) into SG_NP panels (kc, 16),
 * zero past nc. trans: B is (N, K) (the "nt" product), else (K, N). */
static void pack_b_block(pack_fn pack, float *dst, const float *B, int ldb, int trans, int j0,
                         int nc, int k0, int kc) {
    for (int q = 0; q < SG_NP; q++) {
        float *panel = dst + (size_t)q * kc * CD_GEMM_NR;
        const int jq = q * CD_GEMM_NR;
        const int nv = nc - jq < 0 ? 0 : (nc - jq < CD_GEMM_NR ? nc - jq : CD_GEMM_NR);
        if (nv <= 0) break;   /* the kernels read no panel without columns */
        if (trans) {
            pack(panel, B + (size_t)(j0 + jq) * ldb + k0, ldb, nv, kc);
            continue;
        }
        for (int k = 0; k < kc; k++) {
            const float *src = B + (size_t)(k0 + k) * ldb + j0 + jq;
            float *dst_k = panel + k * CD_GEMM_NR;
            if (nv == CD_GEMM_NR) {
                for (int j = 0; j < CD_GEMM_NR; j++) dst_k[j] = src[j];
            } else {
                for (int j = 0; j < nv; j++) dst_k[j] = src[j];
                for (int j = nv; j < CD_GEMM_NR; j++) dst_k[j] = 0.0f;
            }
        }
    }
}

typedef struct {
    int trans, M, N, K, lda, ldb, ldc, accumulate;
    float alpha;
    const float *A, *B;
    float *C;
    gemm_path P;
    pack_fn pack;
    int mch, nb, kcb;   /* rows per job, column blocks, depth block */
} sgemm_plan;

/* one job: column block jb (32 columns) x row block ib (mch rows) of C */
static void sgemm_job(const sgemm_plan *S, int jb, int ib) {
    _Alignas(64) float bp[SG_NP * SG_KC * CD_GEMM_NR];   /* 32 KiB: B block, (kc, 32) */
    const int cols = SG_NP * CD_GEMM_NR;
    const int j0 = jb * cols, i0 = ib * S->mch;
    const int nc = S->N - j0 < cols ? S->N - j0 : cols;
    const int mc = S->M - i0 < S->mch ? S->M - i0 : S->mch;
    /* B (K, N) whose columns here fill whole panels is read in place (no copy): its rows are
     * already 16-column panel rows, at stride ldb */
    const int in_place = !S->trans && nc % CD_GEMM_NR == 0;
    for (int k0 = 0; k0 < S->K; k0 += S->kcb) {
        const int kc = S->K - k0 < S->kcb ? S->K - k0 : S->kcb;
        cd_gemm_block blk;
        if (in_place) {
            blk.b = S->B + (size_t)k0 * S->ldb + j0; blk.psb = CD_GEMM_NR; blk.ldbk = S->ldb;
        } else {
            pack_b_block(S->pack, bp, S->B, S->ldb, S->trans, j0, nc, k0, kc);
            blk.b = bp; blk.psb = (ptrdiff_t)kc * CD_GEMM_NR; blk.ldbk = CD_GEMM_NR;
        }
        blk.mc = mc; blk.nc = nc; blk.kc = kc;
        blk.a = S->A + (size_t)i0 * S->lda + k0;
        blk.pa = (ptrdiff_t)S->P.mr * S->lda; blk.rsa = S->lda; blk.csa = 1;
        blk.c = S->C + (size_t)i0 * S->ldc + j0; blk.ldc = S->ldc;
        blk.bias = NULL;
        blk.alpha = S->alpha;
        blk.load_c = S->accumulate || k0 > 0;
        S->P.fn(&blk);
    }
}

static void sgemm_driver(int trans, int M, int N, int K, float alpha, const float *A, int lda,
                         const float *B, int ldb, float *C, int ldc, int accumulate) {
    if (M <= 0 || N <= 0) return;
    /* keep every size below int overflow in the arithmetic below: halves */
    if (M > CD_GEMM_MAX_ROWS) {
        const int h = M / 2;
        sgemm_driver(trans, h, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
        sgemm_driver(trans, M - h, N, K, alpha, A + (size_t)h * lda, lda, B, ldb,
                     C + (size_t)h * ldc, ldc, accumulate);
        return;
    }
    if (N > CD_GEMM_MAX_ROWS) {
        const int h = N / 2;
        sgemm_driver(trans, M, h, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
        sgemm_driver(trans, M, N - h, K, alpha, A, lda, trans ? B + (size_t)h * ldb : B + h, ldb,
                     C + h, ldc, accumulate);
        return;
    }
    if (K > CD_GEMM_MAX_ROWS) {   /* the second half adds to the first */
        const int h = K / 2;
        sgemm_driver(trans, M, N, h, alpha, A, lda, B, ldb, C, ldc, accumulate);
        sgemm_driver(trans, M, N, K - h, alpha, A + h, lda, trans ? B + h : B + (size_t)h * ldb,
                     ldb, C, ldc, 1);
        return;
    }
    if (K <= 0) {   /* an empty sum: C = alpha * 0 [+ C] */
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    const int isa = cd_cpu_isa();
    sgemm_plan S;
    S.trans = trans; S.M = M; S.N = N; S.K = K; S.lda = lda; S.ldb = ldb; S.ldc = ldc;
    S.accumulate = accumulate; S.alpha = alpha; S.A = A; S.B = B; S.C = C;
    S.P = path_for(isa);
    S.pack = pack_for(isa);
    S.nb = (N + SG_NP * CD_GEMM_NR - 1) / (SG_NP * CD_GEMM_NR);
    S.kcb = depth_slice(K, SG_KC);
    S.mch = M;   /* rows per job: all of them, unless the threads need more jobs */
    int nt = gemm_threads((long long)S.nb * ((M + S.P.mr - 1) / S.P.mr),
                          2.0 * M * (double)N * K);
    if (nt > 1) {
        const int want = 4 * nt;   /* jobs, for an even share under dynamic scheduling */
        const int mb = (want + S.nb - 1) / S.nb;
        S.mch = (M + mb - 1) / mb;
        S.mch = (S.mch + S.P.mr - 1) / S.P.mr * S.P.mr;
    }
    const int mb = (M + S.mch - 1) / S.mch;
    const int jobs = S.nb * mb;
    if (nt > jobs) nt = jobs;
    if (nt <= 1) {   /* no OpenMP machinery on the path the attention takes */
        for (int ib = 0; ib < mb; ib++)
            for (int jb = 0; jb < S.nb; jb++) sgemm_job(&S, jb, ib);
        return;
    }
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int job = 0; job < jobs; job++) sgemm_job(&S, job % S.nb, job / S.nb);
}

void cd_sgemm_nt(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    sgemm_driver(1, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void cd_sgemm_nn(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    sgemm_driver(0, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}
