/* attention_amx.c -- multi-head self-attention with bf16 products on AMX tiles, for the
 * towers that run in bf16 (their linear layers already use the AMX GEMM, gemm_avx512.c).
 *
 * One task per (sequence, head): k and v are converted to bf16 once and laid out as the B
 * operands of the tile unit (pairs of depth rows in each 32-bit word), then each block of 16
 * queries runs
 *   S = q k^T                (16 x N, float32 sums of bf16 products, tiles 0-3 += 4/5 x 6/7)
 *   P = softmax(S / sqrt(d)) (float32, row by row; query 0's row copied out for the
 *                             decomposition)
 *   out = bf16(P) v          (16 x d, float32 sums)
 * with the scores of the block in a 16 x N float32 buffer: the N x N matrix never exists.
 *
 * Rounding: q, k, v and P are rounded to bf16 (to nearest even), every sum is float32; the
 * softmax is attention_forward's. Past the last key, the B operands hold zeros; past the last
 * query, the block's A rows are zero and its output rows are not written.
 */
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "gemm_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(CD_AVX512_EMULATE)
#include <immintrin.h>

#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

/* one thread's buffers for one head; Np = N rounded up to 16 (score columns), Nk = N rounded
 * up to 32 (the depth of P v) */
typedef struct {
    uint16_t *kb;  /* (Np, d) bf16 rows of k, zero past N */
    uint32_t *kp;  /* (Np / 16, d / 2, 16) words: k^T in B tiles, panel by panel */
    uint32_t *vp;  /* (d / 16, Nk / 2, 16) words: v in B tiles, token pairs, zero past N */
    uint16_t *qb;  /* (16, d) bf16 rows of the query block, zero past N */
    float *s;      /* (16, Np) scores, then probabilities */
    uint16_t *pb;  /* (16, Nk) bf16 probabilities, zero past N */
    float *o;      /* (16, d) the block's output */
} head_buffers;

static size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

/* byte offsets of kb, kp, vp, qb, s, pb, o in one thread's block (each 64-byte aligned);
 * returns the block's size */
static size_t layout(int N, int d, size_t off[7]) {
    const size_t np = round_up((size_t)N, 16), nk = round_up((size_t)N, 32), dd = (size_t)d;
    const size_t sizes[7] = {np * dd * 2, np * dd * 2, nk * dd * 2, 16 * dd * 2, 16 * np * 4,
                             16 * nk * 2, 16 * dd * 4};
    size_t at = 0;
    for (int i = 0; i < 7; i++) {
        off[i] = at;
        at += round_up(sizes[i], 64);
    }
    return at;
}

static head_buffers carve(unsigned char *p, int N, int d) {
    size_t off[7];
    (void)layout(N, d, off);
    head_buffers h;
    h.kb = (uint16_t *)(void *)(p + off[0]);
    h.kp = (uint32_t *)(void *)(p + off[1]);
    h.vp = (uint32_t *)(void *)(p + off[2]);
    h.qb = (uint16_t *)(void *)(p + off[3]);
    h.s = (float *)(void *)(p + off[4]);
    h.pb = (uint16_t *)(void *)(p + off[5]);
    h.o = (float *)(void *)(p + off[6]);
    return h;
}

/* n floats (zero past `valid`) -> n bf16, n a multiple of 16 */
AMX_TARGET static void row_to_bf16(uint16_t *dst, const float *src, int valid, int n) {
    for (int i = 0; i < n; i += 16) {
        const int left = valid - i;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF
                            : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
        const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
        memcpy(dst + i, &b, 32);
    }
}

/* k (N rows at stride ld) -> kb, kp */
AMX_TARGET static void pack_k(const head_buffers *hb, const float *k, int ld, int N, int d) {
    const int np = (int)round_up((size_t)N, 16), dw = d / 2;
    for (int t = 0; t < np; t++)
        row_to_bf16(hb->kb + (size_t)t * d, t < N ? k + (size_t)t * ld : k, t < N ? d : 0, d);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(dw));
    for (int j = 0; j < np / 16; j++) {   /* word p of keys 16 j .. 16 j + 15, for each p */
        const uint32_t *base = (const uint32_t *)(const void *)(hb->kb + (size_t)16 * j * d);
        uint32_t *dst = hb->kp + (size_t)j * dw * 16;
        for (int p = 0; p < dw; p++)
            _mm512_storeu_si512((void *)(dst + (size_t)p * 16),
                                _mm512_i32gather_epi32(idx, (const void *)(base + p), 4));
    }
}

/* v (N rows at stride ld) -> vp: word (c, p, col) = (v[2p][16c + col], v[2p + 1][16c + col]) */
AMX_TARGET static void pack_v(const head_buffers *hb, const float *v, int ld, int N, int d) {
    const int nk = (int)round_up((size_t)N, 32);
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
                                       31};
    const __m512i inter = _mm512_loadu_si512((const void *)order);
    for (int c = 0; c < d / 16; c++) {
        uint32_t *dst = hb->vp + (size_t)c * (nk / 2) * 16;
        for (int p = 0; p < nk / 2; p++) {
            const int t0 = 2 * p, t1 = 2 * p + 1;
            const __m512 a = t0 < N ? _mm512_loadu_ps(v + (size_t)t0 * ld + 16 * c)
                                    : _mm512_setzero_ps();
            const __m512 b = t1 < N ? _mm512_loadu_ps(v + (size_t)t1 * ld + 16 * c)
                                    : _mm512_setzero_ps();
            __m512i ab;
            const __m512bh h = _mm512_cvtne2ps_pbh(b, a);   /* a in the low half, b above */
            memcpy(&ab, &h, 64);
            _mm512_storeu_si512((void *)(dst + (size_t)p * 16), _mm512_permutexvar_epi16(inter, ab));
        }
    }
}

/* C (16, 16 g) = A (16, 2 depth bf16, row stride lda bytes) B, for g <= 4 panels of B (depth
 * word rows of 16 words each, panel p at b + p * pan words), into C at row stride ldc bytes;
 * depth a multiple of 16 words. C in tiles 0-3, A in 4, B in 6 and 7. */
AMX_TARGET static void product_16xg(const uint16_t *a, long lda, const uint32_t *b, size_t pan,
                                    int depth, int g, float *c, long ldc) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int s = 0; s < depth; s += 16) {
        _tile_loadd(4, a + 2 * s, lda);
        _tile_loadd(6, b + (size_t)s * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (g > 1) { _tile_loadd(7, b + pan + (size_t)s * 16, 64); _tile_dpbf16ps(1, 4, 7); }
        if (g > 2) { _tile_loadd(6, b + 2 * pan + (size_t)s * 16, 64); _tile_dpbf16ps(2, 4, 6); }
        if (g > 3) { _tile_loadd(7, b + 3 * pan + (size_t)s * 16, 64); _tile_dpbf16ps(3, 4, 7); }
    }
    _tile_stored(0, c, ldc);
    if (g > 1) _tile_stored(1, c + 16, ldc);
    if (g > 2) _tile_stored(2, c + 32, ldc);
    if (g > 3) _tile_stored(3, c + 48, ldc);
}

/* S (16, np) = qb kp over depth d, and o (16, d) = pb vp over depth nk, four panels at a time */
AMX_TARGET static void scores_block(const head_buffers *hb, int np, int d) {
    const size_t pan = (size_t)(d / 2) * 16;   /* words per panel of kp */
    for (int j = 0; j < np / 16; j += 4)
        product_16xg(hb->qb, (long)d * 2, hb->kp + j * pan, pan, d / 2,
                     np / 16 - j < 4 ? np / 16 - j : 4, hb->s + (size_t)16 * j, (long)np * 4);
}

AMX_TARGET static void values_block(const head_buffers *hb, int nk, int d) {
    const size_t pan = (size_t)(nk / 2) * 16;   /* words per panel of vp */
    for (int c = 0; c < d / 16; c += 4)
        product_16xg(hb->pb, (long)nk * 2, hb->vp + c * pan, pan, nk / 2,
                     d / 16 - c < 4 ? d / 16 - c : 4, hb->o + (size_t)16 * c, (long)d * 4);
}

/* one head of one sequence: q, k, v (N, d) at row stride ld; out (N, d) at row stride ldo;
 * cls (N) or NULL: query 0's probabilities; mean (N, N) or NULL: the probabilities times
 * mean_w, stored (first head) or added */
AMX_TARGET static void attention_head(const head_buffers *hb, float *out, int ldo, float *cls,
                                      float *mean, float mean_w, int first, const float *q,
                                      const float *k, const float *v, int ld, int N, int d,
                                      float scale) {
    const int np = (int)round_up((size_t)N, 16), nk = (int)round_up((size_t)N, 32);
    pack_k(hb, k, ld, N, d);
    pack_v(hb, v, ld, N, d);
    for (int r0 = 0; r0 < N; r0 += 16) {
        const int rows = N - r0 < 16 ? N - r0 : 16;
        for (int i = 0; i < 16; i++)
            row_to_bf16(hb->qb + (size_t)i * d, i < rows ? q + (size_t)(r0 + i) * ld : q,
                        i < rows ? d : 0, d);
        scores_block(hb, np, d);
        for (int i = 0; i < 16; i++) {
            float *srow = hb->s + (size_t)i * np;
            if (i < rows) {
                for (int j = 0; j < N; j++) srow[j] *= scale;
                softmax_forward(srow, N, N);
            }
            row_to_bf16(hb->pb + (size_t)i * nk, srow, i < rows ? N : 0, nk);
        }
        if (cls && r0 == 0) memcpy(cls, hb->s, (size_t)N * sizeof(float));
        for (int i = 0; mean && i < rows; i++) {
            const float *srow = hb->s + (size_t)i * np;
            float *m = mean + (size_t)(r0 + i) * N;
            if (first)
                for (int j = 0; j < N; j++) m[j] = mean_w * srow[j];
            else
                for (int j = 0; j < N; j++) m[j] += mean_w * srow[j];
        }
        values_block(hb, nk, d);
        for (int i = 0; i < rows; i++)
            memcpy(out + (size_t)(r0 + i) * ldo, hb->o + (size_t)i * d, (size_t)d * sizeof(float));
    }
}

/* one thread of the team: its tile configuration, then its share of the (sequence, head)
 * tasks (an orphaned worksharing loop of the caller's parallel region) */
AMX_TARGET static void team_member(unsigned char *mem, size_t per, float *out, float *att_cls,
                                   size_t cls_bstride, float *att_mean, size_t mean_bstride,
                                   const float *qkv, int B, int N, int W, int H) {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    const int d = W / H, ld = 3 * W;
    const float scale = 1.0f / sqrtf((float)d);
    const head_buffers hb = carve(mem + per * (size_t)t, N, d);
    cd_amx_config_16x64();
    if (!att_mean) {
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                attention_head(&hb, out + (size_t)b * N * W + (size_t)h * d, W,
                               att_cls ? att_cls + b * cls_bstride + (size_t)h * N : NULL, NULL,
                               0.0f, 0, base, base + W, base + 2 * W, ld, N, d, scale);
            }
        }
    } else {   /* the head-averaged map: a sequence's heads on one thread, in order */
        #pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                attention_head(&hb, out + (size_t)b * N * W + (size_t)h * d, W,
                               att_cls ? att_cls + b * cls_bstride + (size_t)h * N : NULL,
                               att_mean + b * mean_bstride, 1.0f / (float)H, h == 0, base,
                               base + W, base + 2 * W, ld, N, d, scale);
            }
        }
    }
    _tile_release();
}

int attention_amx_applies(int N, int W, int H) {
    if (H <= 0 || W % H || N <= 0) return 0;
    const int d = W / H;
    return d % 32 == 0 && d <= 256 && cd_cpu_has_amx();
}

int attention_forward_amx(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                          size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                          int n_threads) {
    if (B <= 0 || !attention_amx_applies(N, W, H)) return 0;
    const int d = W / H;
    if (n_threads < 1) n_threads = 1;
    size_t off[7];
    const size_t per = layout(N, d, off);
    unsigned char *mem = (unsigned char *)aligned_alloc(64, per * (size_t)n_threads);
    if (!mem) return 0;
    const double t0 = cd_prof_begin();
    #pragma omp parallel num_threads(n_threads)
    team_member(mem, per, out, att_cls, cls_bstride, att_mean, mean_bstride, qkv, B, N, W, H);
    free(mem);
    cd_prof_end(CD_PROF_ATTENTION, t0);
    return 1;
}

#else   /* no AMX in this build: the float32 attention runs */

int attention_amx_applies(int N, int W, int H) {
    (void)N; (void)W; (void)H;
    return 0;
}

int attention_forward_amx(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                          size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                          int n_threads) {
    (void)out; (void)att_cls; (void)cls_bstride; (void)att_mean; (void)mean_bstride; (void)qkv; (void)B; (void)N; (void)W; (void)H;
    (void)n_threads;
    return 0;
}

#endif
