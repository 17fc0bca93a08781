/* ops.c -- the operations of the CLIP towers (see ops.h for shapes). */
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"
#include "gemm.h"

/* FP exceptions are never inspected here: without this GCC keeps the branch-free selections of
 * the polynomial kernels below as branches and does not vectorise their loops */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#ifdef _OPENMP
#include <omp.h>
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int thread_id(void) { return 0; }
#endif

/* parallelise element-wise loops only when there is enough work */
#define PAR_MIN_ELEMS 32768

static void patches_forward_run(float *out, const float *images, int B, int S, int P) {
    const int G = S / P;
    const size_t plane = (size_t)S * S;
    const size_t row_len = (size_t)3 * P * P;
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * G * G * row_len > PAR_MIN_ELEMS)
    for (int b = 0; b < B; b++) {
        for (int gy = 0; gy < G; gy++) {
            for (int gx = 0; gx < G; gx++) {
                float *o = out + (((size_t)b * G + gy) * G + gx) * row_len;
                for (int c = 0; c < 3; c++) {
                    const float *img = images + ((size_t)b * 3 + c) * plane;
                    for (int py = 0; py < P; py++) {
                        const float *src = img + (size_t)(gy * P + py) * S + (size_t)gx * P;
                        memcpy(o, src, (size_t)P * sizeof(float));
                        o += P;
                    }
                }
            }
        }
    }
}

static void vision_embed_forward_run(float *x, const float *patch_emb, const float *cls,
                                     const float *pos, int B, int N, int W) {
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * N * W > PAR_MIN_ELEMS)
    for (int b = 0; b < B; b++) {
        for (int n = 0; n < N; n++) {
            float *o = x + ((size_t)b * N + n) * W;
            const float *p = pos + (size_t)n * W;
            const float *s = n == 0 ? cls : patch_emb + ((size_t)b * (N - 1) + (n - 1)) * W;
            for (int w = 0; w < W; w++) o[w] = s[w] + p[w];
        }
    }
}

void text_embed_forward(float *x, const int32_t *ids, int ids_stride, const float *tok_emb,
                        const float *pos, int T, int C, int W) {
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)T * C * W > PAR_MIN_ELEMS)
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < C; c++) {
            float *o = x + ((size_t)t * C + c) * W;
            const float *e = tok_emb + (size_t)ids[(size_t)t * ids_stride + c] * W;
            const float *p = pos + (size_t)c * W;
            for (int w = 0; w < W; w++) o[w] = e[w] + p[w];
        }
    }
}

void text_embed_bf16_forward(float *x, const int32_t *ids, int ids_stride,
                             const uint16_t *tok_emb, const float *pos, int T, int C, int W) {
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)T * C * W > PAR_MIN_ELEMS)
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < C; c++) {
            float *o = x + ((size_t)t * C + c) * W;
            const uint16_t *e = tok_emb + (size_t)ids[(size_t)t * ids_stride + c] * W;
            const float *p = pos + (size_t)c * W;
            for (int w = 0; w < W; w++) o[w] = cd_bf16_to_f32(e[w]) + p[w];
        }
    }
}

/* one row of the layer norm, compiled for the baseline ISA and for AVX2 / AVX-512 (wider sums
 * in double: the statistics agree with the baseline's to double rounding) */
#define LN_ROW(SUFFIX, ATTR)                                                                \
    ATTR static void ln_row_##SUFFIX(float *o, float *mean, float *sigma, const float *x,     \
                                     const float *weight, const float *bias, int W,          \
                                     float eps) {                                            \
        double m = 0.0;                                                                     \
        _Pragma("omp simd reduction(+ : m)") for (int w = 0; w < W; w++) m += x[w];          \
        m /= W;                                                                             \
        double v = 0.0;                                                                     \
        _Pragma("omp simd reduction(+ : v)") for (int w = 0; w < W; w++) {                  \
            double dv = (double)x[w] - m;                                                   \
            v += dv * dv;                                                                   \
        }                                                                                   \
        v /= W;                                                                             \
        double s = sqrt(v + (double)eps);                                                   \
        float mf = (float)m, rs = (float)(1.0 / s);                                         \
        _Pragma("omp simd") for (int w = 0; w < W; w++)                                     \
            o[w] = (x[w] - mf) * rs * weight[w] + bias[w];                                  \
        if (mean) *mean = mf;                                                               \
        if (sigma) *sigma = (float)s;                                                       \
    }

LN_ROW(generic, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
LN_ROW(avx2, __attribute__((target("avx2,fma"))))
LN_ROW(avx512, __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512"))))
#define HAVE_LN_ROWS 1
#endif

static void layernorm_forward_run(float *out, float *mean, float *sigma, const float *inp,
                                  const float *weight, const float *bias, int R, int W,
                                  float eps) {
#ifdef HAVE_LN_ROWS
    const int isa = cd_cpu_isa();
#endif
    #pragma omp parallel for schedule(static) if ((size_t)R * W > PAR_MIN_ELEMS)
    for (int r = 0; r < R; r++) {
        const float *x = inp + (size_t)r * W;
        float *o = out + (size_t)r * W;
        float *mr = mean ? mean + r : NULL, *sr = sigma ? sigma + r : NULL;
#ifdef HAVE_LN_ROWS
        if (isa >= CD_ISA_AVX512) { ln_row_avx512(o, mr, sr, x, weight, bias, W, eps); continue; }
        if (isa >= CD_ISA_AVX2) { ln_row_avx2(o, mr, sr, x, weight, bias, W, eps); continue; }
#endif
        ln_row_generic(o, mr, sr, x, weight, bias, W, eps);
    }
}

/* reference: inp, out (R, W); everything in double, rounded once on store */
void layernorm_forward_naive(float *out, float *mean, float *sigma, const float *inp,
                             const float *weight, const float *bias, int R, int W, float eps) {
    for (int r = 0; r < R; r++) {
        const float *x = inp + (size_t)r * W;
        float *o = out + (size_t)r * W;
        double m = 0.0, v = 0.0;
        for (int w = 0; w < W; w++) m += x[w];
        m /= W;
        for (int w = 0; w < W; w++) v += ((double)x[w] - m) * ((double)x[w] - m);
        v /= W;
        const double s = sqrt(v + (double)eps);
        if (mean) mean[r] = (float)m;
        if (sigma) sigma[r] = (float)s;
        for (int w = 0; w < W; w++) o[w] = (float)(((double)x[w] - m) / s * weight[w] + bias[w]);
    }
}

/* ---- exp and GELU as branch-free polynomials, so the loops below vectorise ------------------
 * (libm's expf / erff are scalar calls). Coefficients are least-squares fits on Chebyshev
 * nodes, made for this file; relative errors are stated against the exact functions. */

typedef union { float f; uint32_t u; } f32_bits;

/* e^x, relative error < 2e-7; 0 below -87, e^88 above 88, NaN kept */
static inline float exp_poly(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
    const float shifter = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    /* selections only, never arithmetic inside a branch: the compiler may then vectorise
     * the loops without -fno-trapping-math */
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    f32_bits t;
    t.f = xc * log2e + shifter;
    const float n = t.f - shifter;                      /* round(x / ln 2), |n| <= 127 */
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;                                 /* |r| <= ln 2 / 2 */
    /* e^r = 1 + r + r^2 q(r), q fitted: relative error 4e-9 */
    float q = 1.37514081812982469e-03f;
    q = q * r + 8.36891908097300852e-03f;
    q = q * r + 4.16695333954756608e-02f;
    q = q * r + 1.66665184372096209e-01f;
    q = q * r + 4.99999885929588550e-01f;
    const float p = 1.0f + r + (r * r) * q;
    f32_bits scale;
    scale.u = (t.u - 0x4B400000u + 127u) << 23;          /* 2^n from the integer in t's bits */
    const float y = p * scale.f;
    return x < -87.0f ? 0.0f : y;
}

/* GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, with a = |x| / sqrt 2:
 *   a <= 1: erf(a) = a P(a^2)                       (P degree 6, relative error 1.3e-9)
 *   1 < a <= 5: erfc(a) = exp(-a^2) h(s) / a, s = (1/a - 0.6) * 2.5
 *           (h degree 9, fitted on a in [1, 5], relative error 8e-9)
 *   5 < a <= 9: the same with h from the asymptotic series of erfc,
 *           h = (1 - t/2 + 3t^2/4 - 15t^3/8 + 105t^4/16) / sqrt(pi), t = 1/a^2 (error < 3e-6)
 *   a > 9: erfc(a) < 1e-36: Phi = 0 for x < 0 (x * 0: -0, and NaN for -inf as in the reference)
 * and Phi = 1 - erfc/2 (x >= 0) or erfc/2 (x < 0), so negative inputs keep their precision. */
static inline float gelu_poly(float x) {
    const float a = fabsf(x) * 0.70710678118654752440f;
    const float a2 = a * a;
    float P = 7.84717878095225752e-05f;
    P = P * a2 - 8.00816486902056202e-04f;
    P = P * a2 + 5.18809603892654569e-03f;
    P = P * a2 - 2.68536895123898944e-02f;
    P = P * a2 + 1.12835822052482410e-01f;
    P = P * a2 - 3.76126255624938288e-01f;
    P = P * a2 + 1.12837916568772356e+00f;
    const float half_erf = 0.5f * (a * P);
    const float phi_near_pos = 0.5f + half_erf, phi_near_neg = 0.5f - half_erf;

    float ah = a < 1.0f ? 1.0f : a;      /* h's fitted range [1, 5] */
    ah = ah > 5.0f ? 5.0f : ah;
    float ae = a < 1.0f ? 1.0f : a;      /* exp(-81) ~ 0 already */
    ae = ae > 9.0f ? 9.0f : ae;
    const float s = (1.0f / ah - 0.6f) * 2.5f;
    float h = -1.30289849748343317e-05f;
    h = h * s + 4.34086350681213429e-05f;
    h = h * s - 5.92369797856682340e-05f;
    h = h * s - 2.47157625513291790e-05f;
    h = h * s + 5.20985256132755481e-04f;
    h = h * s - 2.15720141740164545e-03f;
    h = h * s + 5.13376419003128311e-03f;
    h = h * s - 1.12057554651744801e-03f;
    h = h * s - 6.85522917364346368e-02f;
    h = h * s + 4.93812465092176189e-01f;
    const float t = 1.0f / (ae * ae);
    const float h_asym = 0.56418958354775628695f *
                         (1.0f + t * (-0.5f + t * (0.75f + t * (-1.875f + t * 6.5625f))));
    h = a > 5.0f ? h_asym : h;
    const float half_erfc = 0.5f * (exp_poly(-ae * ae) * h / ae);
    const float phi_far_pos = 1.0f - half_erfc;
    const float phi_pos = a <= 1.0f ? phi_near_pos : phi_far_pos;
    float phi_neg = a <= 1.0f ? phi_near_neg : half_erfc;
    phi_neg = a > 9.0f ? 0.0f : phi_neg;
    return x * (x >= 0.0f ? phi_pos : phi_neg);
}

/* x sigmoid(1.702 x); below x = -51.7, e^(-1.702 x) passes exp_poly's clamp at e^88 and the
 * exact value is below 1e-36 |x|: x * 0 there (-0, and NaN for -inf as in the reference) */
static inline float quick_gelu_poly(float x) {
    const float y = x / (1.0f + exp_poly(-1.702f * x));
    return x < -51.7f ? x * 0.0f : y;
}

/* the tanh form of GELU (torch's approximate="tanh", SigLIP's gelu_pytorch_tanh):
 * 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). Below x = -10 the
 * exact value is below 1e-37 |x| and e^(-2u) passes exp_poly's clamp: x * 0 there. */
static inline float gelu_tanh_poly(float x) {
    const float u2 = 1.59576912160573071f * (x + 0.044715f * x * x * x);
    const float y = x / (1.0f + exp_poly(-u2));
    return x < -10.0f ? x * 0.0f : y;
}

/* The element-wise loops, compiled twice: for the baseline ISA and, on x86-64, for AVX2 + FMA
 * (8 lanes), chosen at run time from the path cpu.c reports. */
#define ELEM_SPANS(SUFFIX, ATTR)                                                            \
    ATTR static void gelu_span_##SUFFIX(float *p, size_t m) {                              \
        _Pragma("omp simd") for (size_t i = 0; i < m; i++) p[i] = gelu_poly(p[i]);          \
    }                                                                                      \
    ATTR static void quick_gelu_span_##SUFFIX(float *p, size_t m) {                        \
        _Pragma("omp simd") for (size_t i = 0; i < m; i++) p[i] = quick_gelu_poly(p[i]);    \
    }                                                                                      \
    ATTR static void gelu_tanh_span_##SUFFIX(float *p, size_t m) {                         \
        _Pragma("omp simd") for (size_t i = 0; i < m; i++) p[i] = gelu_tanh_poly(p[i]);     \
    }                                                                                      \
    ATTR static void softmax_row_##SUFFIX(float *row, int valid, int n) {                  \
        float mx = -INFINITY;                                                              \
        _Pragma("omp simd reduction(max : mx)") for (int j = 0; j < valid; j++)             \
            mx = row[j] > mx ? row[j] : mx;                                                \
        double sum = 0.0;                                                                  \
        _Pragma("omp simd reduction(+ : sum)") for (int j = 0; j < valid; j++) {            \
            const float e = exp_poly(row[j] - mx);                                         \
            row[j] = e;                                                                    \
            sum += e;                                                                      \
        }                                                                                  \
        const float inv = (float)(1.0 / sum);                                              \
        _Pragma("omp simd") for (int j = 0; j < valid; j++) row[j] *= inv;                  \
        for (int j = valid; j < n; j++) row[j] = 0.0f;                                     \
    }

ELEM_SPANS(generic, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_SPANS 1
ELEM_SPANS(avx2, __attribute__((target("avx2,fma"))))
/* and for AVX-512F (16 lanes); the same operations lane by lane, so the same values */
ELEM_SPANS(avx512, __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512"))))
#endif

/* 0: generic spans, 1: AVX2, 2: AVX-512 */
static int spans_avx2(void) {
#ifdef HAVE_AVX2_SPANS
    const int isa = cd_cpu_isa();
    return isa >= CD_ISA_AVX512 ? 2 : isa >= CD_ISA_AVX2;
#else
    return 0;
#endif
}

#define ELEM_CHUNK 4096

static void gelu_forward_run(float *x, size_t n) {
    const size_t nchunk = (n + ELEM_CHUNK - 1) / ELEM_CHUNK;
    const int avx2 = spans_avx2();
    (void)avx2;
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t c = 0; c < nchunk; c++) {
        float *p = x + c * ELEM_CHUNK;
        const size_t m = n - c * ELEM_CHUNK < ELEM_CHUNK ? n - c * ELEM_CHUNK : ELEM_CHUNK;
#ifdef HAVE_AVX2_SPANS
        if (avx2 == 2) { gelu_span_avx512(p, m); continue; }
        if (avx2) { gelu_span_avx2(p, m); continue; }
#endif
        gelu_span_generic(p, m);
    }
}

static void quick_gelu_forward_run(float *x, size_t n) {
    const size_t nchunk = (n + ELEM_CHUNK - 1) / ELEM_CHUNK;
    const int avx2 = spans_avx2();
    (void)avx2;
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t c = 0; c < nchunk; c++) {
        float *p = x + c * ELEM_CHUNK;
        const size_t m = n - c * ELEM_CHUNK < ELEM_CHUNK ? n - c * ELEM_CHUNK : ELEM_CHUNK;
#ifdef HAVE_AVX2_SPANS
        if (avx2 == 2) { quick_gelu_span_avx512(p, m); continue; }
        if (avx2) { quick_gelu_span_avx2(p, m); continue; }
#endif
        quick_gelu_span_generic(p, m);
    }
}

static void gelu_tanh_forward_run(float *x, size_t n) {
    const size_t nchunk = (n + ELEM_CHUNK - 1) / ELEM_CHUNK;
    const int avx2 = spans_avx2();
    (void)avx2;
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t c = 0; c < nchunk; c++) {
        float *p = x + c * ELEM_CHUNK;
        const size_t m = n - c * ELEM_CHUNK < ELEM_CHUNK ? n - c * ELEM_CHUNK : ELEM_CHUNK;
#ifdef HAVE_AVX2_SPANS
        if (avx2 == 2) { gelu_tanh_span_avx512(p, m); continue; }
        if (avx2) { gelu_tanh_span_avx2(p, m); continue; }
#endif
        gelu_tanh_span_generic(p, m);
    }
}

float cd_expf(float x) { return exp_poly(x); }
float cd_gelu(float x) { return gelu_poly(x); }

/* references: x (n) in place, libm in double. erfc(-x / sqrt 2) is 1 + erf(x / sqrt 2) without
 * the cancellation of the latter for x < 0. */
void gelu_forward_naive(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double v = x[i];
        x[i] = (float)(0.5 * v * erfc(-v / sqrt(2.0)));
    }
}

void quick_gelu_forward_naive(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double v = x[i];
        x[i] = (float)(v / (1.0 + exp(-1.702 * v)));
    }
}

void gelu_tanh_forward_naive(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const double v = x[i];
        /* 0.5 v (1 + tanh(u)) == v / (1 + e^(-2u)), without the cancellation of 1 + tanh */
        x[i] = (float)(v / (1.0 + exp(-1.5957691216057308 * (v + 0.044715 * v * v * v))));
    }
}

static void residual_forward_run(float *x, const float *y, size_t n) {
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

void softmax_forward(float *row, int valid, int n) {
#ifdef HAVE_AVX2_SPANS
    const int level = spans_avx2();
    if (level == 2) {
        softmax_row_avx512(row, valid, n);
        return;
    }
    if (level) {
        softmax_row_avx2(row, valid, n);
        return;
    }
#endif
    softmax_row_generic(row, valid, n);
}

/* reference: row (n), softmax of row[0 .. valid) in double, zeros after */
void softmax_forward_naive(float *row, int valid, int n) {
    double mx = -INFINITY, sum = 0.0;
    for (int j = 0; j < valid; j++) mx = row[j] > mx ? row[j] : mx;
    for (int j = 0; j < valid; j++) sum += exp(row[j] - mx);
    for (int j = 0; j < valid; j++) row[j] = (float)(exp(row[j] - mx) / sum);
    for (int j = valid; j < n; j++) row[j] = 0.0f;
}

/* x (n) <- bf16(x), to nearest even (NaN stays NaN), without branches so that it vectorises */
static void bf16_round_span(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        const uint32_t nan = ((u & 0x7F800000u) == 0x7F800000u) & ((u & 0x007FFFFFu) != 0u);
        const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        u = nan ? ((u | 0x00400000u) & 0xFFFF0000u) : r;
        memcpy(x + i, &u, sizeof u);
    }
}

/* One head of one sequence, query rows [r0, r1).
 *   q, k, v  (N, d) at row stride ld: this head's slices
 *   out      (N, d) at row stride ldo
 *   P        (r1 - r0, N) scratch
 *   cls      (N) or NULL: query 0's probabilities (when r0 == 0)
 *   mean     (r1 - r0, N) or NULL: the probabilities are added to it
 *   round_p  != 0: the probabilities are rounded to bf16 before they weight the values (after
 *            cls and mean have them)
 * Under a causal mask the keys past r1 - 1 are never visible to this block, so neither the
 * scores nor the weighted sum touch them. */
static void attention_rows(float *out, int ldo, float *P, float *cls, float *mean,
                           const float *q, const float *k, const float *v, int ld, int N, int d,
                           int r0, int r1, int causal, float scale, int round_p) {
    const int R = r1 - r0;
    const int ncols = causal ? r1 : N;
    cd_sgemm_nt(R, ncols, d, scale, q + (size_t)r0 * ld, ld, k, ld, P, N, 0);
    for (int i = 0; i < R; i++)
        softmax_forward(P + (size_t)i * N, causal ? r0 + i + 1 : N, N);
    if (cls && r0 == 0) memcpy(cls, P, (size_t)N * sizeof(float));
    if (mean)
        for (size_t i = 0; i < (size_t)R * N; i++) mean[i] += P[i];
    if (round_p) bf16_round_span(P, (size_t)R * N);
    cd_sgemm_nn(R, d, ncols, 1.0f, P, N, v, ld, out + (size_t)r0 * ldo, ldo, 0);
}

/* columns [c0, c0 + width) of rows (rows, ld) <- bf16 */
static void bf16_round_columns(float *x, size_t rows, size_t ld, size_t c0, size_t width) {
    const double t0 = cd_prof_begin();
    #pragma omp parallel for schedule(static) if (rows * width > PAR_MIN_ELEMS)
    for (size_t r = 0; r < rows; r++) bf16_round_span(x + r * ld + c0, width);
    cd_prof_end(CD_PROF_PACK_BF16, t0);
}

/* One fused pass per (sequence, head, block of CD_ATT_ROW_BLOCK query rows): the block's scores
 * (rows x N, in the thread's scratch tile, which stays in L1/L2), their softmax, and their
 * weighted sum of the values straight into `out`; the class row's probabilities (query 0, the
 * decomposition's attention weights) are copied out of the first block as they pass. The full
 * N x N score matrix never exists. Tasks: (sequence, head, row block) without the head-averaged
 * map; with it, (sequence, row block), each task running every head on its rows so that the
 * average is accumulated without races. */
static void attention_forward_run(float *out, float *att_cls, size_t cls_bstride,
                                  float *att_mean, size_t mean_bstride, const float *qkv, int B,
                                  int N, int W, int H, int causal, float *scratch,
                                  int n_scratch, int round_p) {
    const int d = W / H;
    const int ld = 3 * W;
    const float scale = 1.0f / sqrtf((float)d);
    const int nblk = (N + CD_ATT_ROW_BLOCK - 1) / CD_ATT_ROW_BLOCK;
    const size_t tile = (size_t)(N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK) * N;
    if (n_scratch < 1) n_scratch = 1;
    if (!att_mean) {
        #pragma omp parallel for collapse(3) schedule(dynamic, 1) num_threads(n_scratch)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                for (int blk = 0; blk < nblk; blk++) {
                    const int r0 = blk * CD_ATT_ROW_BLOCK;
                    const int r1 = r0 + CD_ATT_ROW_BLOCK < N ? r0 + CD_ATT_ROW_BLOCK : N;
                    float *P = scratch + (size_t)thread_id() * tile;
                    const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                    attention_rows(out + (size_t)b * N * W + (size_t)h * d, W, P,
                                   att_cls ? att_cls + b * cls_bstride + (size_t)h * N : NULL,
                                   NULL, base, base + W, base + 2 * W, ld, N, d, r0, r1, causal,
                                   scale, round_p);
                }
            }
        }
        return;
    }
    const float inv_h = 1.0f / (float)H;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(n_scratch)
    for (int b = 0; b < B; b++) {
        for (int blk = 0; blk < nblk; blk++) {
            const int r0 = blk * CD_ATT_ROW_BLOCK;
            const int r1 = r0 + CD_ATT_ROW_BLOCK < N ? r0 + CD_ATT_ROW_BLOCK : N;
            float *P = scratch + (size_t)thread_id() * tile;
            float *mean = att_mean + b * mean_bstride + (size_t)r0 * N;
            const size_t cnt = (size_t)(r1 - r0) * N;
            memset(mean, 0, cnt * sizeof(float));
            for (int h = 0; h < H; h++) {
                const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                attention_rows(out + (size_t)b * N * W + (size_t)h * d, W, P,
                               att_cls ? att_cls + b * cls_bstride + (size_t)h * N : NULL, mean,
                               base, base + W, base + 2 * W, ld, N, d, r0, r1, causal, scale,
                               round_p);
            }
            for (size_t i = 0; i < cnt; i++) mean[i] *= inv_h;
        }
    }
}

/* reference, arguments as attention_forward's (no scratch). For query i of head h of sequence b:
 *   s_j = q_i . k_j / sqrt(d) for the visible keys j (j <= i when causal), p = softmax(s),
 *   out[b, i, h*d + c] = sum_j p_j v_j[c].
 * The scores are recomputed in each of three passes (max, sum, weighted sum) rather than
 * stored, and the weighted sums run over the head's columns in chunks of NAIVE_ACC, so every
 * accumulator is a double on the stack; only att_mean adds its H terms p / H in float. */
#define NAIVE_ACC 64
static double naive_score(const float *q, const float *k, int d, double scale) {
    double s = 0.0;
    for (int c = 0; c < d; c++) s += (double)q[c] * k[c];
    return s * scale;
}

void attention_forward_naive(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                             size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                             int causal) {
    const int d = W / H;
    const size_t ld = (size_t)3 * W;
    const double scale = 1.0 / sqrt((double)d);
    for (int b = 0; b < B; b++) {
        float *mean = att_mean ? att_mean + b * mean_bstride : NULL;   /* (N, N) */
        if (mean)
            for (size_t e = 0; e < (size_t)N * N; e++) mean[e] = 0.0f;
        for (int h = 0; h < H; h++) {
            float *cls = att_cls ? att_cls + b * cls_bstride + (size_t)h * N : NULL;   /* (N) */
            for (int i = 0; i < N; i++) {
                const float *q = qkv + ((size_t)b * N + i) * ld + (size_t)h * d;
                const float *k0 = qkv + (size_t)b * N * ld + W + (size_t)h * d;
                const float *v0 = k0 + W;
                const int valid = causal ? i + 1 : N;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < valid; j++) {
                    const double s = naive_score(q, k0 + (size_t)j * ld, d, scale);
                    mx = s > mx ? s : mx;
                }
                for (int j = 0; j < valid; j++)
                    sum += exp(naive_score(q, k0 + (size_t)j * ld, d, scale) - mx);
                for (int c0 = 0; c0 < d; c0 += NAIVE_ACC) {
                    const int nc = d - c0 < NAIVE_ACC ? d - c0 : NAIVE_ACC;
                    double acc[NAIVE_ACC] = {0};
                    for (int j = 0; j < valid; j++) {
                        const double p =
                            exp(naive_score(q, k0 + (size_t)j * ld, d, scale) - mx) / sum;
                        for (int c = 0; c < nc; c++) acc[c] += p * v0[(size_t)j * ld + c0 + c];
                        if (c0 > 0) continue;   /* probabilities: once per row */
                        if (att_cls && i == 0) cls[j] = (float)p;
                        if (att_mean) mean[(size_t)i * N + j] += (float)(p / H);
                    }
                    for (int c = 0; c < nc; c++)
                        out[((size_t)b * N + i) * W + (size_t)h * d + c0 + c] = (float)acc[c];
                }
                if (att_cls && i == 0)
                    for (int j = valid; j < N; j++) cls[j] = 0.0f;
            }
        }
    }
}

void decomp_ln_rows(float *rows, size_t R, int W, float mu, float sigma, const float *gamma,
                    const float *beta, float k_inv) {
    const float muk = mu * k_inv;
    #pragma omp parallel for schedule(static) if (R * (size_t)W > PAR_MIN_ELEMS)
    for (size_t r = 0; r < R; r++) {
        float *x = rows + r * W;
        for (int w = 0; w < W; w++) x[w] = gamma[w] * (x[w] - muk) / sigma + beta[w] * k_inv;
    }
}

void scale_shift_rows(float *rows, size_t R, int C, size_t ld, float s, const float *shift) {
    #pragma omp parallel for schedule(static) if (R * (size_t)C > PAR_MIN_ELEMS)
    for (size_t r = 0; r < R; r++) {
        float *x = rows + r * ld;
        for (int c = 0; c < C; c++) x[c] = x[c] * s + shift[c];
    }
}

/* ---------------------------------------------------------------------------------------- */
/* the public operations: the work above, timed when the profile is on (cpu.h)               */

void patches_forward(float *out, const float *images, int B, int S, int P) {
    const double t0 = cd_prof_begin();
    patches_forward_run(out, images, B, S, P);
    cd_prof_end(CD_PROF_ELEMWISE, t0);
}

void vision_embed_forward(float *x, const float *patch_emb, const float *cls, const float *pos,
                             int B, int N, int W) {
    const double t0 = cd_prof_begin();
    vision_embed_forward_run(x, patch_emb, cls, pos, B, N, W);
    cd_prof_end(CD_PROF_ELEMWISE, t0);
}

void layernorm_forward(float *out, float *mean, float *sigma, const float *inp,
                       const float *weight, const float *bias, int R, int W, float eps) {
    const double t0 = cd_prof_begin();
    layernorm_forward_run(out, mean, sigma, inp, weight, bias, R, W, eps);
    cd_prof_end(CD_PROF_LAYERNORM, t0);
}

void gelu_forward(float *x, size_t n) {
    const double t0 = cd_prof_begin();
    gelu_forward_run(x, n);
    cd_prof_end(CD_PROF_ACT, t0);
}

void quick_gelu_forward(float *x, size_t n) {
    const double t0 = cd_prof_begin();
    quick_gelu_forward_run(x, n);
    cd_prof_end(CD_PROF_ACT, t0);
}

void gelu_tanh_forward(float *x, size_t n) {
    const double t0 = cd_prof_begin();
    gelu_tanh_forward_run(x, n);
    cd_prof_end(CD_PROF_ACT, t0);
}

void residual_forward(float *x, const float *y, size_t n) {
    const double t0 = cd_prof_begin();
    residual_forward_run(x, y, n);
    cd_prof_end(CD_PROF_ELEMWISE, t0);
}

void attention_forward(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                       size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                       int causal, float *scratch, int n_scratch) {
    const double t0 = cd_prof_begin();
    attention_forward_run(out, att_cls, cls_bstride, att_mean, mean_bstride, qkv, B, N, W, H,
                          causal, scratch, n_scratch, 0);
    cd_prof_end(CD_PROF_ATTENTION, t0);
}

void attention_forward_bf16(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                            size_t mean_bstride, float *qkv, int B, int N, int W, int H,
                            int causal, float *scratch, int n_scratch) {
    const size_t rows = (size_t)B * N;
    if (!causal && attention_amx_applies(N, W, H)) {
        /* the tiles round q and k as they load them; v is rounded here for the decomposition */
        bf16_round_columns(qkv, rows, (size_t)3 * W, (size_t)2 * W, (size_t)W);
        if (attention_forward_amx(out, att_cls, cls_bstride, att_mean, mean_bstride, qkv, B, N,
                                  W, H, n_scratch))
            return;
        bf16_round_columns(qkv, rows, (size_t)3 * W, 0, (size_t)2 * W);
    } else {
        bf16_round_columns(qkv, rows, (size_t)3 * W, 0, (size_t)3 * W);
    }
    const double t0 = cd_prof_begin();
    attention_forward_run(out, att_cls, cls_bstride, att_mean, mean_bstride, qkv, B, N, W, H,
                          causal, scratch, n_scratch, 1);
    cd_prof_end(CD_PROF_ATTENTION, t0);
}
