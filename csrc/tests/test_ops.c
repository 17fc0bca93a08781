/* test_ops.c -- the ops of csrc/ops.c against their naive references, on every path the CPU has.
 *
 * Build and run (from the repository root):
 *   gcc -O2 -std=c11 -fopenmp -Wall -Wextra -Icsrc -o build/test_ops csrc/ops.c csrc/gemm.c \
 *       csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_ops.c -lm
 *   ./build/test_ops [path ...]       (paths: generic avx2 avx512; default: all the CPU has)
 * Exit status 0 when every check passes. Shapes are awkward on purpose: one token, one element,
 * sizes that are no multiple of the vector width nor of the attention row block (48), head
 * widths of 1 and 3, one thread and several. Every output buffer is allocated to its exact
 * documented size (the attention scratch included), so a build with -fsanitize=address catches
 * any overrun; strided outputs carry sentinels in their gaps.
 *
 * Tolerances follow the float32 rounding of each computation, eps = FLT_EPSILON:
 *   GELU        (12 + 2 x^2) eps |want| for x >= -7.07 (x < 0: the rounding of the argument of
 *               exp(-x^2 / 2)); to -12.72 also 3e-6 |want| (the asymptotic series); below,
 *               -0 is accepted where |want| < 1e-36 |x| (ops.h)
 *   QuickGELU   (8 + 3.4 |x|) eps |want| for x >= -51.69; below, -0 (ops.h)
 *   LayerNorm   3 eps (|w| (|x - m| + |m|) / s + |b|)     (the mean is rounded to float first)
 *   softmax     (4e-7 + 4 eps + eps |x_j - max|) p_j + 2e-38   (exp's error, the argument's
 *               rounding, exp flushed to 0 below e^-87)
 *   attention   scores within E = (4 sqrt(d + 1) + 3) eps |q_i| max_j |k_j| / sqrt(d) + 4e-7
 *               (GEMM rounding, scale, exp), so probabilities within 2E p + 4 eps p and outputs
 *               within (2E + 4 eps sqrt(n + 1)) max_j |v_j|.
 */
#include "ops.h"
#include "cpu.h"
#include "gemm.h"
#define TU_SEED 2024
#include "tests/test_util.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define EPS ((double)FLT_EPSILON)

static int g_checks = 0, g_fail = 0;
static int g_fail_isa[CD_ISA_AVX512 + 1];

static void report(const char *what, int ok, int isa) {
    g_checks++;
    if (!ok) {
        g_fail++;
        g_fail_isa[isa]++;
        printf("FAIL [%s] %s\n", cd_cpu_isa_str(isa), what);
    }
}

static float frand(void) { return (float)tu_uniform(); }
static float *alloc_f(size_t n) { return (float *)xmalloc(n * sizeof(float)); }
static float *rand_buf(size_t n, float amp) {
    float *p = alloc_f(n);
    for (size_t i = 0; i < n; i++) p[i] = amp * frand();
    return p;
}
static float *copy_buf(const float *src, size_t n) {
    float *p = alloc_f(n);
    if (n) memcpy(p, src, n * sizeof(float));
    return p;
}
/* NaN where both are NaN, else |got - want| <= tol */
static int close_to(float got, float want, double tol) {
    if (isnan(want) || isnan(got)) return isnan(want) && isnan(got);
    if (isinf(want) || isinf(got)) return got == want;
    return fabs((double)got - (double)want) <= tol;
}

static int g_many = 3;   /* "several threads" */

/* ---- GELU / QuickGELU --------------------------------------------------------------------- */

/* inputs: most in the range activations take, some large, some tiny, exact zeros */
static float act_input(size_t i) {
    switch (i % 9) {
    case 0: return 6.0f * frand();
    case 1: return 15.0f * frand();
    case 2: return 60.0f * frand();
    case 3: return 1e4f * frand();
    case 4: return 1e-6f * frand();
    case 5: return (i % 18) ? 0.0f : -0.0f;
    case 6: return frand() < 0 ? -1e6f * (1.0f + frand()) : 1e30f;
    default: return 3.0f * frand();
    }
}

static double gelu_tol(float x, float want) {
    const double base = (12.0 + 2.0 * (x < 0 ? (double)x * x : 0.0)) * EPS * fabs(want);
    if (x >= -7.07f) return base;
    if (x >= -12.72f) return base + 3e-6 * fabs(want);       /* asymptotic series, ops.h */
    return fabs(want);                                       /* -0 where |GELU| < 1e-36 |x| */
}
static double quick_gelu_tol(float x, float want) {
    if (x >= -51.69f) return (8.0 + 3.4 * fabs((double)x)) * EPS * fabs(want);
    return fabs(want);                                       /* -0 where |value| < 1e-36 |x| */
}

/* the tanh form: the rounding of u = 1.596 (x + 0.0447 x^3) moves the sigmoid by |u| ulps */
static double gelu_tanh_tol(float x, float want) {
    const double u = 1.5957691216057308 * ((double)x + 0.044715 * (double)x * x * x);
    if (x >= -10.0f) return (8.0 + 3.0 * fabs(u)) * EPS * fabs(want);
    return fabs(want);                                       /* -0 where |value| < 1e-37 |x| */
}

/* gelu_tanh_forward against its reference: the act_input mix (one thread and many) and a dense
 * sweep of [-60, 20) */
static void check_gelu_tanh(int isa) {
    static const size_t sizes[] = {0, 1, 9, 1000, 40003};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const size_t n = sizes[si];
        float *x = alloc_f(n);
        for (size_t i = 0; i < n; i++) x[i] = act_input(i);
        float *want = copy_buf(x, n);
        gelu_tanh_forward_naive(want, n);
        for (int t = 0; t < 2; t++) {
            const int threads = t ? g_many : 1;
            float *got = copy_buf(x, n);
            set_threads(threads);
            gelu_tanh_forward(got, n);
            set_threads(1);
            int ok = 1;
            for (size_t i = 0; i < n && ok; i++)
                if (!close_to(got[i], want[i], gelu_tanh_tol(x[i], want[i]))) {
                    printf("  x = %.9g: got %.9g want %.9g\n", x[i], got[i], want[i]);
                    ok = 0;
                }
            char what[96];
            snprintf(what, sizeof what, "gelu_tanh n=%zu threads=%d", n, threads);
            report(what, ok, isa);
            free(got);
        }
        free(want);
        free(x);
    }
    enum { NS = 24 * 1024 + 5 };
    float *x = alloc_f(NS), *g = alloc_f(NS), *gr = alloc_f(NS);
    for (int i = 0; i < NS; i++) x[i] = g[i] = gr[i] = -60.0f + i * (80.0f / NS);
    gelu_tanh_forward(g, NS);
    gelu_tanh_forward_naive(gr, NS);
    int ok = 1;
    for (int i = 0; i < NS && ok; i++)
        if (!close_to(g[i], gr[i], gelu_tanh_tol(x[i], gr[i]))) {
            printf("  gelu_tanh(%.9g): got %.9g want %.9g\n", x[i], g[i], gr[i]);
            ok = 0;
        }
    report("gelu_tanh sweep [-60, 20)", ok, isa);
    free(x); free(g); free(gr);
}

static void check_activations(int isa) {
    static const size_t sizes[] = {0, 1, 7, 8, 9, 31, 1000, 40003};   /* 40003: threaded */
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const size_t n = sizes[si];
        float *x = alloc_f(n);
        for (size_t i = 0; i < n; i++) x[i] = act_input(i);
        for (int quick = 0; quick <= 1; quick++) {
            float *want = copy_buf(x, n);
            if (quick) quick_gelu_forward_naive(want, n);
            else gelu_forward_naive(want, n);
            for (int t = 0; t < 2; t++) {
                const int threads = t ? g_many : 1;
                float *got = copy_buf(x, n);
                set_threads(threads);
                if (quick) quick_gelu_forward(got, n);
                else gelu_forward(got, n);
                set_threads(1);
                int ok = 1;
                for (size_t i = 0; i < n && ok; i++) {
                    const double tol = quick ? quick_gelu_tol(x[i], want[i])
                                             : gelu_tol(x[i], want[i]);
                    if (!close_to(got[i], want[i], tol)) {
                        printf("  x = %.9g: got %.9g want %.9g (tol %.3g)\n", x[i], got[i],
                               want[i], tol);
                        ok = 0;
                    }
                }
                char what[120];
                snprintf(what, sizeof what, "%s n=%zu threads=%d", quick ? "quick_gelu" : "gelu",
                         n, threads);
                report(what, ok, isa);
                free(got);
            }
            free(want);
        }
        free(x);
    }
    /* a dense sweep over the polynomials' ranges and clamps, every lane position */
    enum { NS = 24 * 1024 + 5 };
    float *x = alloc_f(NS), *g = alloc_f(NS), *gr = alloc_f(NS), *q = alloc_f(NS);
    float *qr = alloc_f(NS);
    for (int i = 0; i < NS; i++) x[i] = g[i] = gr[i] = q[i] = qr[i] = -60.0f + i * (80.0f / NS);
    gelu_forward(g, NS);
    gelu_forward_naive(gr, NS);
    quick_gelu_forward(q, NS);
    quick_gelu_forward_naive(qr, NS);
    int okg = 1, okq = 1;
    for (int i = 0; i < NS; i++) {
        if (okg && !close_to(g[i], gr[i], gelu_tol(x[i], gr[i]))) {
            printf("  gelu(%.9g): got %.9g want %.9g\n", x[i], g[i], gr[i]);
            okg = 0;
        }
        if (okq && !close_to(q[i], qr[i], quick_gelu_tol(x[i], qr[i]))) {
            printf("  quick_gelu(%.9g): got %.9g want %.9g\n", x[i], q[i], qr[i]);
            okq = 0;
        }
    }
    report("gelu sweep [-60, 20)", okg, isa);
    report("quick_gelu sweep [-60, 20)", okq, isa);
    free(x); free(g); free(gr); free(q); free(qr);

    /* special values: NaN and +inf kept, zeros and the largest floats; -inf gives NaN in both
     * (x * 0, as torch) */
    const float sp[] = {NAN, INFINITY, 0.0f, -0.0f, FLT_MAX, FLT_MIN, 1e-40f, -1e-40f, -FLT_MAX};
    const int nsp = (int)(sizeof sp / sizeof sp[0]);
    for (int quick = 0; quick <= 1; quick++) {
        float got[sizeof sp / sizeof sp[0]], want[sizeof sp / sizeof sp[0]];
        memcpy(got, sp, sizeof sp);
        memcpy(want, sp, sizeof sp);
        if (quick) { quick_gelu_forward(got, nsp); quick_gelu_forward_naive(want, nsp); }
        else { gelu_forward(got, nsp); gelu_forward_naive(want, nsp); }
        int ok = isnan(got[0]) && isnan(want[0]) && got[1] == INFINITY && want[1] == INFINITY &&
                 got[2] == 0 && got[3] == 0 && got[4] == FLT_MAX && want[4] == FLT_MAX;
        for (int i = 5; i < nsp && ok; i++) {
            const double tol = quick ? quick_gelu_tol(sp[i], want[i]) : gelu_tol(sp[i], want[i]);
            ok = close_to(got[i], want[i], tol + 1.5e-45);   /* denormal results: 1 ulp */
            if (!ok) printf("  x = %g: got %g want %g\n", sp[i], got[i], want[i]);
        }
        float ninf = -INFINITY, ninf_ref = -INFINITY;
        if (quick) { quick_gelu_forward(&ninf, 1); quick_gelu_forward_naive(&ninf_ref, 1); }
        else { gelu_forward(&ninf, 1); gelu_forward_naive(&ninf_ref, 1); }
        ok = ok && isnan(ninf) && isnan(ninf_ref);
        report(quick ? "quick_gelu specials" : "gelu specials", ok, isa);
    }
}

/* ---- LayerNorm ---------------------------------------------------------------------------- */

/* row kinds: random, constant, all zero, a large offset with small spread, large values */
static void fill_ln_row(float *x, int W, int kind) {
    for (int w = 0; w < W; w++) {
        switch (kind) {
        case 0: x[w] = 2.0f * frand(); break;
        case 1: x[w] = 3.7f; break;
        case 2: x[w] = 0.0f; break;
        case 3: x[w] = 1000.0f + 0.01f * frand(); break;
        default: x[w] = 3e4f * frand(); break;
        }
    }
}

static void check_layernorm_case(int R, int W, int inplace, int stats, int threads, int isa) {
    const size_t n = (size_t)R * W;
    float *x = alloc_f(n), *wt = rand_buf((size_t)W, 1.5f), *bs = rand_buf((size_t)W, 1.0f);
    for (int r = 0; r < R; r++) fill_ln_row(x + (size_t)r * W, W, r % 5);
    const float eps = 1e-5f;
    float *want = alloc_f(n), *wm = alloc_f((size_t)R), *ws = alloc_f((size_t)R);
    layernorm_forward_naive(want, wm, ws, x, wt, bs, R, W, eps);
    float *in = copy_buf(x, n), *got = inplace ? in : alloc_f(n);
    float *gm = stats ? alloc_f((size_t)R) : NULL, *gs = stats ? alloc_f((size_t)R) : NULL;
    set_threads(threads);
    layernorm_forward(got, gm, gs, in, wt, bs, R, W, eps);
    set_threads(1);
    int ok = 1;
    for (int r = 0; r < R && ok; r++) {
        const float *xr = x + (size_t)r * W;
        double m = 0.0, v = 0.0;
        for (int w = 0; w < W; w++) m += xr[w];
        m /= W;
        for (int w = 0; w < W; w++) v += (xr[w] - m) * (xr[w] - m);
        const double s = sqrt(v / W + eps);
        for (int w = 0; w < W && ok; w++) {
            const size_t at = (size_t)r * W + w;
            const double tol =
                3.0 * EPS * (fabs(wt[w]) * (fabs(xr[w] - m) + fabs(m)) / s + fabs(bs[w]));
            if (!close_to(got[at], want[at], tol)) {
                printf("  (%d, %d): got %.9g want %.9g (tol %.3g)\n", r, w, got[at], want[at],
                       tol);
                ok = 0;
            }
        }
        if (stats && ok && !(close_to(gm[r], wm[r], EPS * fabs(m)) &&
                             close_to(gs[r], ws[r], 2 * EPS * s))) {
            printf("  row %d: mean %.9g / %.9g, sigma %.9g / %.9g\n", r, gm[r], wm[r], gs[r],
                   ws[r]);
            ok = 0;
        }
        /* a constant row normalises to exactly the bias */
        if ((r % 5 == 1 || r % 5 == 2) && ok)
            for (int w = 0; w < W; w++) ok = ok && got[(size_t)r * W + w] == bs[w];
    }
    char what[120];
    snprintf(what, sizeof what, "layernorm R=%d W=%d inplace=%d stats=%d threads=%d", R, W,
             inplace, stats, threads);
    report(what, ok, isa);
    free(x); free(wt); free(bs); free(want); free(wm); free(ws); free(in);
    if (!inplace) free(got);
    free(gm); free(gs);
}

static void check_layernorm(int isa) {
    static const int Ws[] = {1, 3, 8, 17, 768};
    static const int Rs[] = {1, 5, 50};   /* 50 x 768: threaded */
    for (size_t wi = 0; wi < sizeof Ws / sizeof Ws[0]; wi++)
        for (size_t ri = 0; ri < sizeof Rs / sizeof Rs[0]; ri++)
            for (int v = 0; v < 8; v++)
                check_layernorm_case(Rs[ri], Ws[wi], v & 1, (v >> 1) & 1, v & 4 ? g_many : 1,
                                     isa);
}

/* ---- softmax ------------------------------------------------------------------------------ */

static void check_softmax_row(const float *x, int valid, int n, const char *kind, int isa) {
    float *got = copy_buf(x, (size_t)n), *want = copy_buf(x, (size_t)n);
    softmax_forward(got, valid, n);
    softmax_forward_naive(want, valid, n);
    double mx = -INFINITY;
    for (int j = 0; j < valid; j++) mx = x[j] > mx ? x[j] : mx;
    int ok = 1;
    for (int j = 0; j < n && ok; j++) {
        if (j >= valid) {
            ok = got[j] == 0.0f && want[j] == 0.0f;
            if (!ok) printf("  masked %d: got %g\n", j, got[j]);
            continue;
        }
        const double arg = isfinite(x[j]) ? fabs(x[j] - mx) : 0.0;
        const double tol = (4e-7 + 4 * EPS + EPS * arg) * fabs(want[j]) + 2e-38;
        if (!close_to(got[j], want[j], tol)) {
            printf("  %d: got %.9g want %.9g (tol %.3g)\n", j, got[j], want[j], tol);
            ok = 0;
        }
    }
    char what[120];
    snprintf(what, sizeof what, "softmax %s valid=%d n=%d", kind, valid, n);
    report(what, ok, isa);
    free(got);
    free(want);
}

static void check_softmax(int isa) {
    static const int ns[] = {1, 7, 8, 9, 31, 197, 1000};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int n = ns[ni];
        const int valids[] = {0, 1, n / 2, n - 1, n};
        for (int vi = 0; vi < 5; vi++) {
            const int valid = valids[vi];
            if (vi > 0 && valid == valids[vi - 1]) continue;
            for (int amp = 0; amp < 3; amp++) {
                static const float amps[] = {1.0f, 30.0f, 300.0f};   /* 300: underflow */
                float *x = rand_buf((size_t)n, amps[amp]);
                for (int j = valid; j < n; j++) x[j] = 1e3f;       /* masked: never read */
                check_softmax_row(x, valid, n, amp == 0 ? "amp=1" : amp == 1 ? "amp=30"
                                                                            : "amp=300", isa);
                free(x);
            }
        }
    }
    /* -inf entries (masked logits) give 0; a NaN, or only -inf, gives NaN in both */
    float r1[9] = {1, -INFINITY, 2, 3, -INFINITY, 0.5f, 0, 7, 7};
    check_softmax_row(r1, 7, 9, "with -inf", isa);
    float r2[5] = {1, NAN, 2, 0, 0};
    check_softmax_row(r2, 4, 5, "with NaN", isa);
    float r3[3] = {-INFINITY, -INFINITY, 5};
    check_softmax_row(r3, 2, 3, "all -inf", isa);
}

/* ---- element-wise ops and embeddings, against direct formulas ----------------------------- */

static void check_small_ops(int isa) {
    /* residual: float additions, exact */
    {
        const size_t n = 40007;
        float *x = rand_buf(n, 1.0f), *y = rand_buf(n, 1.0f), *x0 = copy_buf(x, n);
        set_threads(g_many);
        residual_forward(x, y, n);
        set_threads(1);
        int ok = 1;
        for (size_t i = 0; i < n; i++) ok = ok && x[i] == (float)((double)x0[i] + y[i]);
        report("residual n=40007", ok, isa);
        free(x); free(y); free(x0);
    }
    /* patches: (B, 3, S, S) -> (B*G*G, 3*P*P), S = 7 not a multiple of P = 3 (G = 2) */
    for (int v = 0; v < 2; v++) {
        const int B = v ? 2 : 1, S = v ? 64 : 7, P = v ? 8 : 3, G = S / P;
        const size_t rl = (size_t)3 * P * P;
        float *img = rand_buf((size_t)B * 3 * S * S, 1.0f);
        float *out = alloc_f((size_t)B * G * G * rl);
        set_threads(g_many);
        patches_forward(out, img, B, S, P);
        set_threads(1);
        int ok = 1;
        for (int b = 0; b < B; b++)
            for (int gy = 0; gy < G; gy++)
                for (int gx = 0; gx < G; gx++)
                    for (int c = 0; c < 3; c++)
                        for (int py = 0; py < P; py++)
                            for (int px = 0; px < P; px++) {
                                const float want = img[(((size_t)b * 3 + c) * S + gy * P + py) *
                                                       S + gx * P + px];
                                const float got = out[(((size_t)b * G + gy) * G + gx) * rl +
                                                      ((size_t)c * P + py) * P + px];
                                ok = ok && got == want;
                            }
        report(v ? "patches B=2 S=64 P=8" : "patches B=1 S=7 P=3", ok, isa);
        free(img); free(out);
    }
    /* vision and text embeddings: exact sums */
    {
        const int B = 2, N = 5, W = 7, V = 11;
        float *pe = rand_buf((size_t)B * (N - 1) * W, 1.0f), *cls = rand_buf((size_t)W, 1.0f);
        float *pos = rand_buf((size_t)N * W, 1.0f), *x = alloc_f((size_t)B * N * W);
        vision_embed_forward(x, pe, cls, pos, B, N, W);
        int ok = 1;
        for (int b = 0; b < B; b++)
            for (int n = 0; n < N; n++)
                for (int w = 0; w < W; w++) {
                    const float s = n ? pe[((size_t)b * (N - 1) + n - 1) * W + w] : cls[w];
                    ok = ok && x[((size_t)b * N + n) * W + w] == s + pos[(size_t)n * W + w];
                }
        report("vision_embed", ok, isa);
        float *tok = rand_buf((size_t)V * W, 1.0f);
        int32_t ids[2 * 5] = {0, 10, 3, 3, 7, 1, 2, 9, 0, 5};
        text_embed_forward(x, ids, N, tok, pos, B, N, W);
        ok = 1;
        for (int t = 0; t < B; t++)
            for (int c = 0; c < N; c++)
                for (int w = 0; w < W; w++)
                    ok = ok && x[((size_t)t * N + c) * W + w] ==
                                   tok[(size_t)ids[t * N + c] * W + w] + pos[(size_t)c * W + w];
        report("text_embed", ok, isa);
        /* the bf16 table: each row widened, then the same sum */
        uint16_t *tok16 = (uint16_t *)malloc((size_t)V * W * sizeof(uint16_t));
        for (size_t i = 0; i < (size_t)V * W; i++) tok16[i] = cd_bf16_from_f32(tok[i]);
        text_embed_bf16_forward(x, ids, N, tok16, pos, B, N, W);
        ok = 1;
        for (int t = 0; t < B; t++)
            for (int c = 0; c < N; c++)
                for (int w = 0; w < W; w++)
                    ok = ok && x[((size_t)t * N + c) * W + w] ==
                                   cd_bf16_round(tok[(size_t)ids[t * N + c] * W + w]) +
                                       pos[(size_t)c * W + w];
        report("text_embed_bf16", ok, isa);
        free(tok16);
        free(pe); free(cls); free(pos); free(x); free(tok);
    }
    /* decomp_ln_rows: gamma (x - mu k_inv) / sigma + beta k_inv, few float roundings */
    for (int v = 0; v < 2; v++) {
        const size_t R = v ? 60 : 3;
        const int W = v ? 768 : 5;   /* 60 x 768: threaded */
        const float mu = 0.3f, sigma = 1.7f, kinv = 1.0f / 13.0f;
        float *rows = rand_buf(R * W, 2.0f), *r0 = copy_buf(rows, R * W);
        float *gam = rand_buf((size_t)W, 1.0f), *bet = rand_buf((size_t)W, 1.0f);
        set_threads(g_many);
        decomp_ln_rows(rows, R, W, mu, sigma, gam, bet, kinv);
        set_threads(1);
        int ok = 1;
        for (size_t r = 0; r < R; r++)
            for (int w = 0; w < W; w++) {
                const double x = r0[r * W + w], muk = (double)mu * kinv;
                const double want = gam[w] * (x - muk) / sigma + (double)bet[w] * kinv;
                const double tol = 4 * EPS * (fabs(gam[w]) * (fabs(x) + fabs(muk)) / sigma +
                                              fabs((double)bet[w] * kinv));
                ok = ok && fabs(rows[r * W + w] - want) <= tol;
            }
        report(v ? "decomp_ln_rows R=60 W=768" : "decomp_ln_rows R=3 W=5", ok, isa);
        free(rows); free(r0); free(gam); free(bet);
    }
    /* scale_shift_rows on strided rows: the gaps stay untouched */
    {
        const size_t R = 9, ld = 13;
        const int C = 10;
        float *rows = rand_buf(R * ld, 1.0f), *r0 = copy_buf(rows, R * ld);
        float *sh = rand_buf((size_t)C, 1.0f);
        scale_shift_rows(rows, R, C, ld, 0.75f, sh);
        int ok = 1;
        for (size_t r = 0; r < R; r++)
            for (size_t c = 0; c < ld; c++) {
                const float x = r0[r * ld + c];
                const double want = c < (size_t)C ? (double)x * 0.75 + sh[c] : x;
                ok = ok && fabs(rows[r * ld + c] - want) <= 2 * EPS * (fabs(x) + fabs(want));
                if (c >= (size_t)C) ok = ok && rows[r * ld + c] == x;
            }
        report("scale_shift_rows strided", ok, isa);
        free(rows); free(r0); free(sh);
    }
}

/* ---- attention ---------------------------------------------------------------------------- */

#define CLS_PAD 5    /* extra floats between the sequences' att_cls blocks (sentinels) */
#define MEAN_PAD 3   /* ... and between their att_mean blocks */
#define SENTINEL 12345.0f

typedef struct {
    float *out, *cls, *mean;
} att_outputs;

static void att_alloc(att_outputs *o, int B, int N, int W, int H) {
    const size_t nout = (size_t)B * N * W;
    const size_t ncls = (size_t)B * ((size_t)H * N + CLS_PAD);
    const size_t nmean = (size_t)B * ((size_t)N * N + MEAN_PAD);
    o->out = alloc_f(nout);
    o->cls = alloc_f(ncls);
    o->mean = alloc_f(nmean);
    for (size_t i = 0; i < nout; i++) o->out[i] = NAN;   /* an unwritten output fails */
    for (size_t i = 0; i < ncls; i++) o->cls[i] = SENTINEL;
    for (size_t i = 0; i < nmean; i++) o->mean[i] = SENTINEL;
}
static void att_free(att_outputs *o) {
    free(o->out);
    free(o->cls);
    free(o->mean);
}

/* the fast kernel with a scratch of exactly the documented size, n_scratch tiles of
 * (min(N, CD_ATT_ROW_BLOCK), N) floats, under `threads` OpenMP threads */
static void att_fast(att_outputs *o, const float *qkv, int B, int N, int W, int H, int causal,
                     int want_cls, int want_mean, int threads, int n_scratch) {
    const size_t tile = (size_t)(N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK) * N;
    float *scratch = alloc_f((size_t)n_scratch * tile);
    set_threads(threads);
    attention_forward(o->out, want_cls ? o->cls : NULL, (size_t)H * N + CLS_PAD,
                      want_mean ? o->mean : NULL, (size_t)N * N + MEAN_PAD, qkv, B, N, W, H,
                      causal, scratch, n_scratch);
    set_threads(1);
    free(scratch);
}

typedef struct {
    int B, N, W, H, d, causal;
    const float *qkv;
    const att_outputs *ref;   /* the naive outputs, every one of them */
    const double *E;          /* (B, H, N): bound on each row's score error */
    const double *vpre;       /* (B, N, W): max over tokens j' <= j of |v[b, j', :]| */
} att_case;

/* B blocks of `rows` floats, each followed by `pad` sentinels: the gaps (and the whole block
 * when the map was not wanted) must still hold SENTINEL */
static int untouched(const float *m, int B, size_t rows, size_t pad, int wanted,
                     const char *name, const char *what) {
    for (int b = 0; b < B; b++)
        for (size_t e = 0; e < rows + pad; e++)
            if ((e >= rows || !wanted) && m[b * (rows + pad) + e] != SENTINEL) {
                printf("  %s: %s written outside its rows (b %d, %zu)\n", what, name, b, e);
                return 0;
            }
    return 1;
}

/* compare one fast run against the reference; `what` names the run */
static int att_compare(const att_case *c, const att_outputs *got, int want_cls, int want_mean,
                       const char *what) {
    const int B = c->B, N = c->N, W = c->W, H = c->H, d = c->d;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < N; i++) {
            const int valid = c->causal ? i + 1 : N;
            double Emax = 0.0;
            for (int h = 0; h < H; h++) {
                const double E = c->E[((size_t)b * H + h) * N + i];
                Emax = E > Emax ? E : Emax;
                for (int e = 0; e < d; e++) {
                    const size_t col = (size_t)h * d + e;
                    const double vmax = c->vpre[((size_t)b * N + valid - 1) * W + col];
                    const double tol = (2 * E + 4 * EPS * sqrt(valid + 1.0)) * vmax + 1e-30;
                    const size_t at = ((size_t)b * N + i) * W + col;
                    if (!close_to(got->out[at], c->ref->out[at], tol)) {
                        printf("  %s: out[%d, %d, head %d, %d] got %.9g want %.9g (tol %.3g)\n",
                               what, b, i, h, e, got->out[at], c->ref->out[at], tol);
                        return 0;
                    }
                }
                if (want_cls && i == 0)
                    for (int j = 0; j < N; j++) {
                        const size_t at = b * ((size_t)H * N + CLS_PAD) + (size_t)h * N + j;
                        const float want = c->ref->cls[at];
                        const double tol = (2 * E + 4 * EPS) * want + 2e-38;
                        if (!close_to(got->cls[at], want, tol) || (j >= valid && got->cls[at])) {
                            printf("  %s: att_cls[%d, %d, %d] got %.9g want %.9g\n", what, b, h,
                                   j, got->cls[at], want);
                            return 0;
                        }
                    }
            }
            if (want_mean)
                for (int j = 0; j < N; j++) {
                    const size_t at = b * ((size_t)N * N + MEAN_PAD) + (size_t)i * N + j;
                    const float want = c->ref->mean[at];
                    /* the reference adds its H terms in float: H more roundings */
                    const double tol = (2 * Emax + (H + 4) * EPS) * want + 2e-38;
                    if (!close_to(got->mean[at], want, tol) || (j >= valid && got->mean[at])) {
                        printf("  %s: att_mean[%d, %d, %d] got %.9g want %.9g\n", what, b, i, j,
                               got->mean[at], want);
                        return 0;
                    }
                }
        }
    /* the gaps between the sequences' blocks, and the maps not asked for, stay untouched */
    return untouched(got->cls, B, (size_t)H * N, CLS_PAD, want_cls, "att_cls", what) &&
           untouched(got->mean, B, (size_t)N * N, MEAN_PAD, want_mean, "att_mean", what);
}

static int same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* One shape: the reference once, then on every wanted path the fast kernel with each choice of
 * outputs, on one thread or several. The runs must also agree bit for bit with each other
 * (out in all four, att_cls and att_mean between a one-thread and a threaded run): each
 * (sequence, head, row block) is computed by the same calls whichever thread takes it and
 * whichever maps are wanted. */
static void check_attention_shape(int B, int N, int d, int H, int causal, float amp,
                                  const int *isas, int nisa) {
    const int W = H * d;
    const size_t ld = (size_t)3 * W;
    float *qkv = rand_buf((size_t)B * N * ld, amp);
    att_outputs ref;
    att_alloc(&ref, B, N, W, H);
    attention_forward_naive(ref.out, ref.cls, (size_t)H * N + CLS_PAD, ref.mean,
                            (size_t)N * N + MEAN_PAD, qkv, B, N, W, H, causal);
    /* score error bound per row: GEMM rounding of d products (Cauchy-Schwarz), the float scale,
     * the rounding of s - max, exp's relative error */
    double *E = (double *)malloc((size_t)B * H * N * sizeof(double));
    double *kpre = (double *)malloc((size_t)B * H * N * sizeof(double));   /* (B, H, N) */
    double *vpre = (double *)malloc((size_t)B * N * W * sizeof(double));
    if (!E || !kpre || !vpre) exit(2);
    /* prefix maxima over the tokens of |k_j| (per head) and of |v_j| (per column) */
    for (int b = 0; b < B; b++)
        for (int j = 0; j < N; j++) {
            const float *row = qkv + ((size_t)b * N + j) * ld;
            for (int h = 0; h < H; h++) {
                double kn = 0.0;
                for (int e = 0; e < d; e++) kn += (double)row[W + h * d + e] * row[W + h * d + e];
                kn = sqrt(kn);
                const size_t at = ((size_t)b * H + h) * N + j;
                kpre[at] = j && kpre[at - 1] > kn ? kpre[at - 1] : kn;
            }
            for (int e = 0; e < W; e++) {
                const double v = fabs(row[2 * W + e]);
                const size_t at = ((size_t)b * N + j) * W + e;
                vpre[at] = j && vpre[at - W] > v ? vpre[at - W] : v;
            }
        }
    /* score error bound per row: GEMM rounding of d products (Cauchy-Schwarz), the float scale,
     * the rounding of s - max, exp's relative error */
    const double scale = 1.0 / sqrt((double)d);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < N; i++) {
                double qn = 0.0;
                for (int e = 0; e < d; e++) {
                    const double q = qkv[((size_t)b * N + i) * ld + (size_t)h * d + e];
                    qn += q * q;
                }
                const size_t at = ((size_t)b * H + h) * N;
                const double kmax = kpre[at + (causal ? i : N - 1)];
                E[at + i] = (4 * sqrt(d + 1.0) + 3) * EPS * scale * sqrt(qn) * kmax + 4e-7;
            }
    const att_case c = {B, N, W, H, d, causal, qkv, &ref, E, vpre};
    /* (att_cls, att_mean, threads) of the four runs */
    static const int runs[4][3] = {{0, 0, 1}, {1, 0, 0}, {0, 1, 0}, {1, 1, 1}};
    for (int k = 0; k < nisa; k++) {
        const int isa = isas[k];
        cd_cpu_set_isa(isa);
        att_outputs o[4];
        for (int r = 0; r < 4; r++) {
            const int want_cls = runs[r][0], want_mean = runs[r][1];
            const int threads = runs[r][2] ? 1 : g_many;
            att_alloc(&o[r], B, N, W, H);
            att_fast(&o[r], qkv, B, N, W, H, causal, want_cls, want_mean, threads, threads);
            char what[160];
            snprintf(what, sizeof what, "attention B=%d N=%d d=%d H=%d causal=%d amp=%g cls=%d "
                     "mean=%d threads=%d", B, N, d, H, causal, amp, want_cls, want_mean, threads);
            report(what, att_compare(&c, &o[r], want_cls, want_mean, what), isa);
        }
        const size_t nout = (size_t)B * N * W, ncls = (size_t)B * ((size_t)H * N + CLS_PAD);
        const size_t nmean = (size_t)B * ((size_t)N * N + MEAN_PAD);
        char what[160];
        snprintf(what, sizeof what, "attention B=%d N=%d d=%d H=%d causal=%d: the same bits in "
                 "every run", B, N, d, H, causal);
        report(what, same_bits(o[0].out, o[1].out, nout) && same_bits(o[0].out, o[2].out, nout) &&
                     same_bits(o[0].out, o[3].out, nout) && same_bits(o[1].cls, o[3].cls, ncls) &&
                     same_bits(o[2].mean, o[3].mean, nmean), isa);
        for (int r = 0; r < 4; r++) att_free(&o[r]);
        /* fewer scratch tiles than OpenMP threads: at most n_scratch threads may run */
        if (N > CD_ATT_ROW_BLOCK && H > 1) {
            att_outputs o;
            att_alloc(&o, B, N, W, H);
            att_fast(&o, qkv, B, N, W, H, causal, 1, 1, g_many + 1, 2);
            char what[160];
            snprintf(what, sizeof what, "attention B=%d N=%d d=%d H=%d causal=%d, 2 tiles for %d"
                     " threads", B, N, d, H, causal, g_many + 1);
            report(what, att_compare(&c, &o, 1, 1, what), isa);
            att_free(&o);
        }
    }
    free(E);
    free(kpre);
    free(vpre);
    att_free(&ref);
    free(qkv);
}

static void check_attention(const int *isas, int nisa) {
    static const int Ns[] = {1, 2, 7, 47, 48, 49, 97, 197};
    static const int ds[] = {1, 3, 8, 64};
    static const int Hs[] = {1, 3, 12};
    int shape = 0;
    for (size_t ni = 0; ni < sizeof Ns / sizeof Ns[0]; ni++)
        for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++)
            for (size_t hi = 0; hi < sizeof Hs / sizeof Hs[0]; hi++)
                for (int causal = 0; causal <= 1; causal++, shape++) {
                    /* to keep the run short, the largest (ViT-B/16's 197 x 12 x 64) runs once,
                     * as the image tower does (causal masks: the text tower's smaller shapes) */
                    const int work = Ns[ni] * Hs[hi] * ds[di];
                    if (work > 100000 && causal) continue;
                    /* B = 1 and 3 in turn (1 for N = 197); peaked softmax rows (q, k, v in
                     * [-4, 4)) every third shape */
                    const int B = (di + hi + causal) % 2 && Ns[ni] < 100 ? 3 : 1;
                    const float amp = shape % 3 == 2 ? 4.0f : 1.0f;
                    check_attention_shape(B, Ns[ni], ds[di], Hs[hi], causal, amp, isas, nisa);
                }
    /* width 128: two chunks of the reference's accumulators */
    check_attention_shape(1, 50, 128, 2, 1, 1.0f, isas, nisa);
}

/* ------------------------------------------------------------------------------------------ */

/* ---- attention on AMX tiles (bf16) --------------------------------------------------------- */

/* The reference of attention_forward_amx in double: q, k, v rounded to bf16 as the kernel
 * rounds them, p = softmax(q.k / sqrt d) in double, then rounded to bf16. The kernel's
 * probabilities come from float32 sums and a float32 softmax, so a few may round to the
 * neighbouring bf16 value: each output may differ by up to 2^-8 sum_j p_j |v_j|, and on average
 * by far less; a wrong tile layout (keys, value pairs or columns swapped) by O(|v|). */
static void check_attention_amx_case(int B, int N, int W, int H, float qamp, int threads,
                                     int want_mean, int dispatch) {
    const int d = W / H, ld = 3 * W;
    float *qkv = rand_buf((size_t)B * N * ld, 1.0f);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < N; t++)
            for (int c = 0; c < W; c++) qkv[((size_t)b * N + t) * ld + c] *= qamp;
    float *out = alloc_f((size_t)B * N * W);
    float *cls = alloc_f((size_t)B * H * N);
    float *mean = alloc_f((size_t)B * N * N);
    double *ref_mean = (double *)xmalloc((size_t)B * N * N * sizeof(double));
    for (size_t i = 0; i < (size_t)B * N * W; i++) out[i] = NAN;
    for (size_t i = 0; i < (size_t)B * N * N; i++) ref_mean[i] = 0.0;
    float *given = copy_buf(qkv, (size_t)B * N * 3 * W);
    set_threads(threads);
    int ran = 1;
    if (dispatch) {   /* attention_forward_bf16: AMX where it applies, else the float32 kernel */
        const size_t tile = (size_t)(N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK) * N;
        float *scratch = alloc_f((size_t)threads * tile);
        attention_forward_bf16(out, cls, (size_t)H * N, want_mean ? mean : NULL, (size_t)N * N,
                               qkv, B, N, W, H, 0, scratch, threads);
        free(scratch);
    } else {
        ran = attention_forward_amx(out, cls, (size_t)H * N, want_mean ? mean : NULL,
                                    (size_t)N * N, qkv, B, N, W, H, threads);
    }
    set_threads(1);
    char what[128];
    snprintf(what, sizeof what, "attention %s, B %d N %d W %d H %d, %d threads%s",
             dispatch ? "in bf16" : "on AMX", B, N, W, H, threads,
             want_mean ? ", mean map" : "");
    /* attention_forward_bf16 leaves v rounded in qkv (q and k too where it is not on AMX);
     * attention_forward_amx leaves qkv alone */
    for (size_t r = 0; r < (size_t)B * N; r++)
        for (int c = 0; c < 3 * W; c++) {
            const float g = given[r * 3 * W + c], now = qkv[r * 3 * W + c];
            const int rounded = dispatch && (c >= 2 * W || !attention_amx_applies(N, W, H));
            if (now != (rounded ? cd_bf16_round(g) : g)) {
                if (ran) printf("  %s: qkv[%zu, %d] %.9g, given %.9g\n", what, r, c, now, g);
                ran = 0;
            }
        }
    memcpy(qkv, given, (size_t)B * N * 3 * W * sizeof(float));
    free(given);
    int ok = ran;
    double *p = (double *)xmalloc((size_t)N * sizeof(double));
    double sum_err = 0.0, sum_v = 0.0, worst = 0.0;
    size_t n_err = 0;
    const double scale = 1.0 / sqrt((double)d);
    for (int b = 0; ok && b < B; b++)
        for (int h = 0; ok && h < H; h++)
            for (int i = 0; ok && i < N; i++) {
                const float *q = qkv + ((size_t)b * N + i) * ld + (size_t)h * d;
                double mx = -INFINITY, z = 0.0;
                for (int j = 0; j < N; j++) {
                    const float *k = qkv + ((size_t)b * N + j) * ld + W + (size_t)h * d;
                    double s = 0.0;
                    for (int e = 0; e < d; e++)
                        s += (double)cd_bf16_round(q[e]) * (double)cd_bf16_round(k[e]);
                    p[j] = s * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j < N; j++) z += (p[j] = exp(p[j] - mx));
                for (int j = 0; j < N; j++) {
                    p[j] /= z;
                    ref_mean[((size_t)b * N + i) * N + j] += p[j] / H;
                    if (i == 0 && !close_to(cls[((size_t)b * H + h) * N + j], (float)p[j],
                                            1e-5 * p[j] + 1e-7)) {
                        printf("  %s: att_cls[%d, %d, %d] got %.9g want %.9g\n", what, b, h, j,
                               cls[((size_t)b * H + h) * N + j], p[j]);
                        ok = 0;
                    }
                }
                for (int e = 0; ok && e < d; e++) {
                    double want = 0.0, bound = 0.0;
                    for (int j = 0; j < N; j++) {
                        const double v = cd_bf16_round(qkv[((size_t)b * N + j) * ld + 2 * W +
                                                           (size_t)h * d + e]);
                        want += (double)cd_bf16_round((float)p[j]) * v;
                        bound += p[j] * fabs(v);
                    }
                    const double got = out[((size_t)b * N + i) * W + (size_t)h * d + e];
                    const double err = fabs(got - want);
                    if (!(err <= bound / 256.0 + 1e-5 * bound + 1e-6)) {
                        printf("  %s: out[%d, %d, head %d, %d] got %.9g want %.9g\n", what, b,
                               i, h, e, got, want);
                        ok = 0;
                    }
                    sum_err += err;
                    sum_v += bound;
                    worst = err > worst ? err : worst;
                    n_err++;
                }
            }
    /* on average, far below one bf16 step of the probabilities */
    if (ok && n_err && sum_err > sum_v / 4096.0) {
        printf("  %s: mean error %.3g against mean |v| weight %.3g\n", what, sum_err / n_err,
               sum_v / n_err);
        ok = 0;
    }
    for (size_t e = 0; ok && want_mean && e < (size_t)B * N * N; e++)
        if (!close_to(mean[e], (float)ref_mean[e], 1e-5 * ref_mean[e] + 1e-7)) {
            printf("  %s: att_mean[%zu] got %.9g want %.9g\n", what, e, mean[e], ref_mean[e]);
            ok = 0;
        }
    report(what, ok, CD_ISA_AVX512);
    free(p);
    free(mean);
    free(ref_mean);
    free(qkv);
    free(out);
    free(cls);
}

static void check_attention_amx(void) {
    /* bf16 attention in the float32 kernel (heads of width 16): on every CPU */
    check_attention_amx_case(2, 50, 64, 4, 2.0f, 2, 1, 1);
    if (!cd_cpu_has_amx()) {
        printf("attention on AMX: not on this CPU, skipped\n");
        return;
    }
    check_attention_amx_case(2, 197, 128, 2, 2.0f, 1, 0, 0);     /* ViT-B/16's sequence, d 64 */
    check_attention_amx_case(3, 50, 192, 3, 3.0f, g_many, 0, 0); /* d 64, last block: 2 rows */
    check_attention_amx_case(3, 50, 192, 3, 3.0f, g_many, 1, 0); /* ... and the mean map */
    check_attention_amx_case(1, 33, 256, 2, 1.0f, 2, 1, 0);      /* d 128: 2 groups of 4 panels */
    check_attention_amx_case(2, 17, 96, 3, 4.0f, 1, 0, 0);       /* d 32: one depth tile */
    check_attention_amx_case(1, 1, 64, 1, 1.0f, 1, 1, 0);        /* one token */
    /* the dispatcher on AMX (d 64) */
    check_attention_amx_case(2, 50, 128, 2, 2.0f, 2, 1, 1);
    /* where it does not apply it must say so and write nothing */
    float out[4 * 48] = {0}, qkv[4 * 144] = {0};
    report("attention on AMX refuses d = 24", !attention_forward_amx(out, NULL, 0, NULL, 0, qkv, 1, 4,
                                                                      48, 2, 1), CD_ISA_AVX512);
}

int main(int argc, char **argv) {
    int maxthr = 1;
#ifdef _OPENMP
    maxthr = omp_get_max_threads();
#endif
    g_many = maxthr >= 4 ? 4 : 3;   /* more threads than cores is fine */
    printf("best path on this CPU: %s\n", cd_cpu_isa_str(cd_cpu_best_isa()));
    int isas[CD_ISA_AVX512 + 1], nisa = 0;
    for (int isa = CD_ISA_GENERIC; isa <= CD_ISA_AVX512; isa++) {
        if (!cd_cpu_has_isa(isa)) {
            printf("path %s: not on this CPU, skipped\n", cd_cpu_isa_str(isa));
            continue;
        }
        if (!wanted(isa, argc, argv)) continue;
        if (cd_cpu_set_isa(isa) != 0) {
            report("set path", 0, isa);
            continue;
        }
        isas[nisa++] = isa;
        set_threads(1);
        check_activations(isa);
        check_gelu_tanh(isa);
        check_layernorm(isa);
        check_softmax(isa);
        check_small_ops(isa);
    }
    check_attention(isas, nisa);   /* the reference once per shape, every path against it */
    check_attention_amx();
    for (int k = 0; k < nisa; k++)
        printf("path %s: %s\n", cd_cpu_isa_str(isas[k]), g_fail_isa[isas[k]] ? "FAILED" : "ok");
    printf("%d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
