/* gemm_kernels.h -- the per-instruction-set block kernels behind gemm.c (internal).
 *
 * Every path shares one layout for a packed weight (OC, K): the depth is cut into slices of
 * CD_GEMM_KS = 512 (the last one shorter), and each slice into K-major panels of CD_GEMM_NR = 16
 * output columns, zero-padded past the last column:
 *     slice s (depth k0 = 512 s .. k0 + ks - 1, ks = min(512, K - k0)) starts at 16 * np * k0,
 *     panel p of it at + ks * 16 * p, element (k, j) at + (k - k0) * 16 + j
 * (np = ceil(OC / 16) panels). The panels of one slice follow each other, so the kernels stream
 * through memory in order (no cache-set aliasing for K a multiple of 1024, as one K-long panel
 * per column block would give). A weight packed under one path runs under any.
 * A block kernel reads panels at a constant stride psb and depth rows at a stride ldbk:
 * b[p * psb + k * ldbk + j] (ldbk = 16 for packed panels; the "nn" product reads a B whose
 * blocks are whole panels in place, with psb = 16 and ldbk = its row stride).
 *
 * A block kernel computes one (mc, nc) block of C over a depth kc:
 *     C[i, j] = alpha * sum_k A[i, k] B[k, j]  (+ bias[j])  (+ C[i, j] when load_c)
 * for i < mc, j < nc. The left-hand operand is read through
 *     A tile t (rows t*MR .. t*MR+MR-1), element (r, k) at a[t * pa + r * rsa + k * csa]
 * which covers both a packed A (MR-row K-major panels: pa = MR*kc, rsa = 1, csa = MR, with MR
 * the kernel's row tile) and a plain strided one (pa = MR*lda, rsa = lda, csa = 1). The
 * kernels take csa == 1 for strided and anything else for packed with their own MR.
 *
 * bf16 (CD_GEMM_BF16). The same slices and panels, with two depth rows in each 32-bit lane:
 * word (kp, j) of a panel slice holds bf16(W[j, k0 + 2 kp]) in its low half and
 * bf16(W[j, k0 + 2 kp + 1]) in its high half (zero past the depth), the operand order of
 * AVX512_BF16's vdpbf16ps. A slice of depth ks has ks2 = ceil(ks / 2) pair rows: slice s starts
 * at word 16 * np * k0 / 2 (k0 is even), panel p of it at + ks2 * 16 * p. The left operand is
 * packed the same way, MR rows at a time: word (t, kp, r) = pair (a[r, 2 kp], a[r, 2 kp + 1]) at
 * t * MR * kc2 + kp * MR + r. A bf16 block kernel reads cd_gemm_block with a and b pointing at
 * such words (cast to float pointers), every stride and kc counted in words (pairs).
 */
#ifndef CLIPDECOMP_GEMM_KERNELS_H
#define CLIPDECOMP_GEMM_KERNELS_H
#include <stddef.h>
#include <stdint.h>

#define CD_GEMM_NR 16          /* columns per packed panel, shared by every path */
#define CD_GEMM_KS 512         /* depth of a slice of a packed weight, shared by every path */
#define CD_GEMM_MR_GENERIC 4   /* row tile of each path's micro-kernel */
#define CD_GEMM_MR_AVX2 6
#define CD_GEMM_MR_AVX512 12

typedef struct {
    int mc, nc, kc;            /* rows, columns (valid ones, <= panels * 16) and depth */
    const float *a;            /* left operand, see above */
    ptrdiff_t pa, rsa, csa;    /* tile, row and depth strides of a (csa == 1: strided A) */
    const float *b;            /* first panel of the right operand (16 columns, K-major) */
    ptrdiff_t psb;             /* floats between consecutive panels */
    ptrdiff_t ldbk;            /* floats between consecutive depth rows of a panel: 16 when
                                * packed, or the row stride of a (K, N) B read in place */
    float *c;                  /* (mc, nc) with row stride ldc */
    ptrdiff_t ldc;
    const float *bias;         /* (nc) or NULL */
    float alpha;
    int load_c;                /* add the values already in C */
} cd_gemm_block;

void cd_gemm_block_generic(const cd_gemm_block *blk);
void cd_gemm_block_bf16_generic(const cd_gemm_block *blk);   /* bf16 pairs, any CPU */
#if defined(__x86_64__) || defined(_M_X64)
void cd_gemm_block_avx2(const cd_gemm_block *blk);
void cd_gemm_block_avx512(const cd_gemm_block *blk);
void cd_gemm_block_bf16_avx512(const cd_gemm_block *blk);    /* bf16 pairs, AVX512_BF16 */
/* bf16 pairs on AMX tiles: A row-major (word (i, kp) at a[i * rsa + kp], 16-row tiles at pa,
 * rows zero up to a multiple of 32), kc a multiple of 16 pairs; only where cd_cpu_has_amx() */
void cd_gemm_block_bf16_amx(const cd_gemm_block *blk);
/* this thread's tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes (AMX only) */
void cd_amx_config_16x64(void);
/* a (mc, kc) at row stride lda into that row-major bf16 layout, kc a multiple of 32, rows
 * mc .. mpad - 1 zero (AVX-512F/BW; only where cd_cpu_has_amx()) */
void cd_gemm_pack_rows_bf16_rm(uint32_t *dst, const float *a, ptrdiff_t lda, int mc, int kc,
                               int mpad);
#endif

/* one panel from rows: panel[k * 16 + j] = src[j * ld + k] for j < nv, k < kc; zero for
 * nv <= j < 16. Packs a weight (rows = output columns) and the B of the "nt" product. */
void cd_gemm_pack_t16_generic(float *panel, const float *src, ptrdiff_t ld, int nv, int kc);
#if defined(__x86_64__) || defined(_M_X64)
void cd_gemm_pack_t16_avx2(float *panel, const float *src, ptrdiff_t ld, int nv, int kc);
#endif

/* rows [0, mc) x depth [0, kc) of a (row stride lda) into mr-row K-major tiles:
 *     dst[t * mr * kc + k * mr + r] = a[(t * mr + r) * lda + k],  zero rows past mc.
 * dst holds ceil(mc / mr) * mr * kc floats plus CD_GEMM_PACK_SLACK. */
#define CD_GEMM_PACK_SLACK 16
void cd_gemm_pack_rows_generic(float *dst, const float *a, ptrdiff_t lda, int mc, int kc, int mr);
#if defined(__x86_64__) || defined(_M_X64)
/* the same with 8 x 8 transposes, for mr = 6 or 12 (others: the generic loop) */
void cd_gemm_pack_rows_avx2(float *dst, const float *a, ptrdiff_t lda, int mc, int kc, int mr);
#endif

#endif /* CLIPDECOMP_GEMM_KERNELS_H */
