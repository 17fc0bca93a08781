/* test_gemm.c -- every GEMM path this CPU can run against the naive references.
 *
 * Build and run (from the repository root):
 *   gcc -O2 -std=c11 -fopenmp -Wall -Wextra -Icsrc -o build/test_gemm \
 *       csrc/gemm.c csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_gemm.c -lm
 *   ./build/test_gemm [path ...]      (paths: generic avx2 avx512; default: all the CPU has)
 * Exit status 0 when every check passes. Shapes are small and awkward on purpose: M = 1, K = 1,
 * sizes that are no multiple of the vector width or of the register tile, depth slices, strided
 * operands, bias on / off, accumulate on / off, one thread and several, and calls from inside a
 * parallel region.
 */
#include "gemm.h"
#include "cpu.h"
#include "clipdecomp.h"
#define TU_SEED 12345
#include "tests/test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <limits.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int g_fail = 0, g_checks = 0;

static float frand(void) { return (float)tu_uniform(); }
static float *rand_buf(size_t n) {
    float *p = (float *)xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

/* |got - want| <= tol where tol follows the rounding of a K-term float sum of terms whose
 * absolute values add to `mag` */
static int close_enough(float got, float want, double mag, int K) {
    double tol = 4.0 * FLT_EPSILON * sqrt((double)K + 1.0) * mag + 1e-30;
    return fabs((double)got - (double)want) <= tol;
}

static void report(const char *what, int ok, const char *isa) {
    g_checks++;
    if (!ok) {
        g_fail++;
        printf("FAIL [%s] %s\n", isa, what);
    }
}

/* ---------------------------------------------------------------------------------------- */

/* precision: CD_GEMM_FP32, or the weight converted after packing (CD_GEMM_BF16 /
 * CD_GEMM_BF16_EMULATED) and checked against the bf16 reference */
static void check_matmul_p(int M, int K, int OC, int use_bias, int accumulate, int threads,
                           int pack_isa, const char *isa, int precision) {
    static const char *pname[3] = {"fp32", "bf16", "bf16-emulated"};
    char what[200];
    snprintf(what, sizeof what,
             "matmul M=%d K=%d OC=%d bias=%d acc=%d threads=%d packed-under=%s precision=%s",
             M, K, OC, use_bias, accumulate, threads, cd_cpu_isa_str(pack_isa), pname[precision]);
    float *x = rand_buf((size_t)M * K), *w = rand_buf((size_t)OC * K);
    float *bias = use_bias ? rand_buf((size_t)OC) : NULL;
    float *out = rand_buf((size_t)M * OC);
    float *ref = (float *)malloc((size_t)M * OC * sizeof(float));
    memcpy(ref, out, (size_t)M * OC * sizeof(float));
    const float *prev = NULL;
    float *prev_copy = (float *)malloc((size_t)M * OC * sizeof(float));
    memcpy(prev_copy, out, (size_t)M * OC * sizeof(float));
    prev = prev_copy;

    int cur = cd_cpu_isa();
    cd_gemm_weight pw;
    cd_cpu_set_isa(pack_isa);
    int rc = cd_gemm_pack(&pw, w, OC, K);
    cd_cpu_set_isa(cur);
    if (rc == 0 && precision != CD_GEMM_FP32) {
        rc = cd_gemm_to_bf16(&pw, precision);
        if (rc == 0 && (pw.precision != precision ||
                        (precision == CD_GEMM_BF16) != (pw.packed_bf16 != NULL))) rc = -1;
    }
    if (rc != 0) { report(what, 0, isa); cd_gemm_weight_free(&pw); goto done; }
    set_threads(threads);
    cd_matmul(out, x, &pw, bias, M, accumulate);
    if (precision == CD_GEMM_FP32) cd_matmul_naive(ref, x, w, bias, M, K, OC, accumulate);
    else cd_matmul_bf16_naive(ref, x, w, bias, M, K, OC, accumulate);
    set_threads(1);
    int ok = 1;
    for (int m = 0; m < M && ok; m++)
        for (int o = 0; o < OC && ok; o++) {
            double mag = (use_bias ? fabs(bias[o]) : 0.0) +
                         (accumulate ? fabs(prev[(size_t)m * OC + o]) : 0.0);
            for (int k = 0; k < K; k++) mag += fabs((double)x[(size_t)m * K + k] * w[(size_t)o * K + k]);
            if (!close_enough(out[(size_t)m * OC + o], ref[(size_t)m * OC + o], mag, K)) {
                printf("  (%d, %d): got %.9g want %.9g\n", m, o, out[(size_t)m * OC + o],
                       ref[(size_t)m * OC + o]);
                ok = 0;
            }
        }
    report(what, ok, isa);
    cd_gemm_weight_free(&pw);
done:
    free(x); free(w); free(bias); free(out); free(ref); free(prev_copy);
}

#define check_matmul(M, K, OC, b, acc, thr, pisa, isa) \
    check_matmul_p(M, K, OC, b, acc, thr, pisa, isa, CD_GEMM_FP32)

/* bf16 weights: the conversion (both kinds, refusals), then products against the reference;
 * a bf16 result must also differ from the float32 one by no more than bf16 rounding allows */
static void check_bf16(int isa, const char *name, int many) {
    static const int mm[][3] = {   /* M, K, OC: odd depths, one pair, slices, edges */
        {1, 1, 1}, {1, 2, 5}, {3, 7, 17}, {13, 33, 47}, {12, 64, 64}, {25, 101, 70},
        {50, 517, 96}, {64, 1100, 24}, {97, 600, 129}, {150, 40, 33},
        /* depths that are whole AMX tiles (multiples of 32): every edge of 32 x 32 C blocks */
        {1, 32, 1}, {16, 32, 16}, {17, 64, 17}, {31, 96, 47}, {33, 160, 48}, {70, 768, 40},
        {129, 1024, 33}, {100, 544, 40},
    };
    /* on CPUs with AMX, the products run on AMX tiles and (turned off) on vdpbf16ps */
    const int amx_states = cd_cpu_can_amx() ? 2 : 1;
    for (int st = 0; st < amx_states; st++) {
        char label[64];
        if (amx_states == 2) cd_cpu_set_amx(st == 0);
        snprintf(label, sizeof label, "%s bf16-kernel=%s", name, cd_bf16_kernel_name());
        for (size_t c = 0; c < sizeof mm / sizeof mm[0]; c++)
            for (int v = 0; v < 4; v++)
                for (int prec = CD_GEMM_BF16; prec <= CD_GEMM_BF16_EMULATED; prec++) {
                    /* AMX off: only the depths AMX would take (the others ran vdpbf16ps) */
                    if (st == 1 && (mm[c][1] % 32 != 0 || prec != CD_GEMM_BF16)) continue;
                    int bias = v & 1, acc = (v >> 1) & 1;
                    check_matmul_p(mm[c][0], mm[c][1], mm[c][2], bias, acc, 1, isa, label, prec);
                    if (c < 10 || (st == 0 && v == 3))   /* threads: fewer of the AMX shapes */
                        check_matmul_p(mm[c][0], mm[c][1], mm[c][2], bias, acc, many, isa, label,
                                       prec);
                }
        if (st == 0) check_matmul_p(300, 1300, 200, 1, 1, many, isa, label, CD_GEMM_BF16);
        if (st == 0 && amx_states == 2) {   /* AMX: many row blocks, two slices, threads */
            check_matmul_p(700, 768, 48, 1, 0, many, isa, label, CD_GEMM_BF16);
            /* more columns than one block of 768, with C accumulated over two slices */
            check_matmul_p(200, 1024, 800, 1, 1, many, isa, label, CD_GEMM_BF16);
            check_matmul_p(45, 544, 1570, 1, 0, 1, isa, label, CD_GEMM_BF16);
            /* a depth of 4096 packs 96 rows a job (eight slices) */
            check_matmul_p(140, 4096, 40, 1, 1, 1, isa, label, CD_GEMM_BF16);
            check_matmul_p(140, 4096, 40, 0, 0, many, isa, label, CD_GEMM_BF16);
        }
    }
    if (amx_states == 2) cd_cpu_set_amx(1);
    /* conversion refusals: twice, or from bf16 to the other kind */
    float w[6] = {1, 2, 3, 4, 5, 6};
    cd_gemm_weight pw;
    int ok = cd_gemm_pack(&pw, w, 2, 3) == 0 && cd_gemm_to_bf16(&pw, CD_GEMM_BF16) == 0 &&
             cd_gemm_to_bf16(&pw, CD_GEMM_BF16) == -1 &&
             cd_gemm_to_bf16(&pw, CD_GEMM_BF16_EMULATED) == -1 &&
             pw.packed_bf16_len == 16 * 2 && pw.packed == NULL;
    cd_gemm_weight_free(&pw);
    ok = ok && pw.packed_bf16 == NULL;
    report("bf16 conversion: once only, sizes, free", ok, name);
    ok = cd_gemm_pack(&pw, w, 2, 3) == 0 && cd_gemm_to_bf16(&pw, 7) == -1 &&
         pw.precision == CD_GEMM_FP32 && pw.packed != NULL;
    cd_gemm_weight_free(&pw);
    report("bf16 conversion: unknown precision refused, weight unchanged", ok, name);
    /* rounding: nearest even, NaN kept, exact values unchanged */
    ok = cd_bf16_round(1.0f) == 1.0f && cd_bf16_round(1.0f + 1.0f / 256.0f) == 1.0f &&
         cd_bf16_round(1.0f + 3.0f / 256.0f) == 1.0f + 4.0f / 256.0f &&
         cd_bf16_round(-2.5f) == -2.5f && isnan(cd_bf16_round(NAN)) &&
         isinf(cd_bf16_round(INFINITY)) && isinf(cd_bf16_round(FLT_MAX));
    report("bf16 rounding", ok, name);
}

/* ---------------------------------------------------------------------------------------- */

typedef void (*sgemm_fn)(int, int, int, float, const float *, int, const float *, int, float *,
                         int, int);

/* C = alpha A op(B) [+ C] with padded strides; the padding of C must stay untouched.
 * inside_parallel: the product is computed by the threads of an enclosing parallel region,
 * one row block each, as the attention kernel does. */
static void check_sgemm(int trans, int M, int N, int K, int pad, float alpha, int accumulate,
                        int threads, int inside_parallel, const char *isa) {
    char what[200];
    snprintf(what, sizeof what, "sgemm_%s M=%d N=%d K=%d pad=%d alpha=%g acc=%d threads=%d "
             "inside-parallel=%d", trans ? "nt" : "nn", M, N, K, pad, alpha, accumulate, threads,
             inside_parallel);
    const int lda = K + pad, ldc = N + pad + 1;
    const int ldb = trans ? K + 2 * pad : N + pad;
    const size_t brows = trans ? (size_t)N : (size_t)K;
    float *A = rand_buf((size_t)M * lda), *B = rand_buf(brows * ldb);
    float *C = rand_buf((size_t)M * ldc);
    float *R = (float *)malloc((size_t)M * ldc * sizeof(float));
    float *C0 = (float *)malloc((size_t)M * ldc * sizeof(float));
    memcpy(R, C, (size_t)M * ldc * sizeof(float));
    memcpy(C0, C, (size_t)M * ldc * sizeof(float));
    sgemm_fn fast = trans ? cd_sgemm_nt : cd_sgemm_nn;
    sgemm_fn naive = trans ? cd_sgemm_nt_naive : cd_sgemm_nn_naive;
    set_threads(threads);
    if (inside_parallel) {
        const int blocks = 5;
        #pragma omp parallel for schedule(dynamic, 1)
        for (int b = 0; b < blocks; b++) {
            int i0 = (int)((long long)M * b / blocks), i1 = (int)((long long)M * (b + 1) / blocks);
            if (i1 > i0)
                fast(i1 - i0, N, K, alpha, A + (size_t)i0 * lda, lda, B, ldb,
                     C + (size_t)i0 * ldc, ldc, accumulate);
        }
    } else {
        fast(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
    }
    set_threads(1);
    naive(M, N, K, alpha, A, lda, B, ldb, R, ldc, accumulate);
    int ok = 1;
    for (int i = 0; i < M && ok; i++) {
        for (int j = 0; j < ldc && ok; j++) {
            size_t at = (size_t)i * ldc + j;
            if (j >= N) {   /* padding: untouched */
                if (C[at] != C0[at]) { printf("  padding (%d, %d) written\n", i, j); ok = 0; }
                continue;
            }
            double mag = accumulate ? fabs(C0[at]) : 0.0;
            for (int k = 0; k < K; k++) {
                float b = trans ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                mag += fabs((double)alpha * A[(size_t)i * lda + k] * b);
            }
            if (!close_enough(C[at], R[at], mag, K)) {
                printf("  (%d, %d): got %.9g want %.9g\n", i, j, C[at], R[at]);
                ok = 0;
            }
        }
    }
    report(what, ok, isa);
    free(A); free(B); free(C); free(R); free(C0);
}

/* ---------------------------------------------------------------------------------------- */

static void check_pack_errors(const char *isa) {
    cd_gemm_weight pw;
    float w[4] = {1, 2, 3, 4};
    report("pack rejects OC = 0", cd_gemm_pack(&pw, w, 0, 4) == -1 && pw.packed == NULL, isa);
    report("pack rejects K = -1", cd_gemm_pack(&pw, w, 4, -1) == -1 && pw.packed == NULL, isa);
    report("pack rejects NULL weight", cd_gemm_pack(&pw, NULL, 2, 2) == -1, isa);
    /* (INT_MAX, INT_MAX) floats overflow size_t: must fail cleanly, before reading anything */
    report("pack rejects an overflowing size", cd_gemm_pack(&pw, w, INT_MAX, INT_MAX) == -1, isa);
    report("pack ok", cd_gemm_pack(&pw, w, 1, 4) == 0 && pw.panel == 16 &&
           pw.packed_len == 4 * 16 && pw.isa == cd_cpu_isa(), isa);
    cd_gemm_weight_free(&pw);
    report("free clears", pw.packed == NULL && pw.packed_len == 0, isa);
    cd_gemm_weight_free(&pw);   /* twice is harmless */
}

static void check_isa_api(void) {
    const char *name = cd_isa_name();
    report("cd_isa_name is a path", name && cd_cpu_isa_from_str(name) >= 0, "api");
    report("cd_set_isa(generic)", cd_set_isa("generic") == 0 &&
           strcmp(cd_isa_name(), "generic") == 0, "api");
    report("cd_set_isa(bogus) fails", cd_set_isa("sse9") == -1 &&
           strcmp(cd_isa_name(), "generic") == 0, "api");
    report("cd_set_isa(NULL) fails", cd_set_isa(NULL) == -1, "api");
    int best = cd_cpu_best_isa();
    for (int i = CD_ISA_GENERIC; i <= CD_ISA_AVX512; i++)
        report("has_isa agrees with best", cd_cpu_has_isa(i) == (i <= best), "api");
    if (best < CD_ISA_AVX512)
        report("cd_set_isa refuses a path the CPU lacks", cd_set_isa("avx512") == -1, "api");
}

int main(int argc, char **argv) {
    int maxthr = 1;
#ifdef _OPENMP
    maxthr = omp_get_max_threads();
#endif
    const int many = maxthr > 1 ? (maxthr < 4 ? maxthr : 4) : 3;   /* > cores is fine too */
    printf("best path on this CPU: %s\n", cd_cpu_isa_str(cd_cpu_best_isa()));
    printf("bf16 products: %s (AMX %s)\n", cd_bf16_kernel_name(),
           cd_cpu_can_amx() ? "available" : "not available");
    check_isa_api();
    static const int mm[][3] = {   /* M, K, OC */
        {1, 1, 1}, {1, 7, 5}, {1, 768, 33}, {2, 3, 17}, {5, 1, 16}, {6, 16, 16}, {7, 9, 31},
        {13, 33, 47}, {12, 64, 64}, {25, 100, 70}, {37, 300, 40}, {50, 517, 96}, {97, 70, 129},
        {64, 1100, 24}, {3, 2, 1000}, {150, 40, 33},
    };
    const int nmm = (int)(sizeof mm / sizeof mm[0]);
    static const int sg[][3] = {   /* M, N, K */
        {1, 1, 1}, {1, 17, 5}, {5, 1, 9}, {7, 33, 1}, {13, 16, 64}, {20, 50, 64}, {37, 64, 37},
        {64, 31, 257}, {70, 70, 300}, {3, 100, 600}, {97, 45, 20},
    };
    const int nsg = (int)(sizeof sg / sizeof sg[0]);

    for (int isa = CD_ISA_GENERIC; isa <= CD_ISA_AVX512; isa++) {
        if (!cd_cpu_has_isa(isa)) {
            printf("path %s: not on this CPU, skipped\n", cd_cpu_isa_str(isa));
            continue;
        }
        const char *name = cd_cpu_isa_str(isa);
        if (!wanted(isa, argc, argv)) continue;
        if (cd_cpu_set_isa(isa) != 0) { report("set path", 0, name); continue; }
        int before = g_fail;
        check_pack_errors(name);
        for (int c = 0; c < nmm; c++)
            for (int v = 0; v < 4; v++) {
                int bias = v & 1, acc = (v >> 1) & 1;
                check_matmul(mm[c][0], mm[c][1], mm[c][2], bias, acc, 1, isa, name);
                check_matmul(mm[c][0], mm[c][1], mm[c][2], bias, acc, many, isa, name);
            }
        /* a weight packed under every other path the CPU has */
        for (int other = CD_ISA_GENERIC; other <= CD_ISA_AVX512; other++)
            if (other != isa && cd_cpu_has_isa(other)) {
                check_matmul(29, 70, 51, 1, 0, many, other, name);
                check_matmul(7, 300, 40, 0, 1, 1, other, name);
            }
        check_bf16(isa, name, many);
        /* a larger product, threaded: several row and column blocks, depth slices */
        check_matmul(300, 700, 200, 1, 1, many, isa, name);
        for (int c = 0; c < nsg; c++)
            for (int trans = 0; trans <= 1; trans++)
                for (int v = 0; v < 4; v++) {
                    int pad = (v & 1) ? 3 : 0, acc = (v >> 1) & 1;
                    float alpha = (v & 1) ? 0.125f : 1.0f;
                    check_sgemm(trans, sg[c][0], sg[c][1], sg[c][2], pad, alpha, acc, 1, 0, name);
                    check_sgemm(trans, sg[c][0], sg[c][1], sg[c][2], pad, alpha, acc, many, 0, name);
                    check_sgemm(trans, sg[c][0], sg[c][1], sg[c][2], pad, alpha, acc, many, 1, name);
                }
        /* attention-sized, threaded standalone */
        check_sgemm(1, 197, 197, 64, 128, 0.125f, 0, many, 0, name);
        check_sgemm(0, 197, 64, 197, 5, 1.0f, 0, many, 0, name);
        check_sgemm(1, 80, 90, 0, 2, 1.0f, 0, 1, 0, name);   /* K = 0: C = 0 */
        check_sgemm(0, 80, 90, 0, 2, 1.0f, 1, 1, 0, name);   /* K = 0, accumulate: C kept */
        printf("path %s: %s\n", name, g_fail == before ? "ok" : "FAILED");
    }
    printf("%d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
