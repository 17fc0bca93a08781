/* test_moments.c -- cd_moments_update (fast) against cd_moments_update_naive (float64) on
 * every GEMM path this CPU can run.
 *
 * Build and run (from the repository root):
 *   gcc -O2 -std=c11 -fopenmp -Wall -Wextra -Icsrc -o build/test_moments csrc/moments.c \
 *       csrc/gemm.c csrc/gemm_avx2.c csrc/gemm_avx512.c csrc/cpu.c csrc/tests/test_moments.c -lm
 *   ./build/test_moments
 * Exit status 0 when every check passes.
 *
 * Shapes: K heads, n rows, D row width (moments.h). The shapes are awkward on purpose: one row,
 * D = 1, D not a multiple of the vector width, of the 96-row job block or of the 32-column
 * tile, n not a multiple of the 512-row chunk, strided rows, rows far from the origin; one
 * thread and two (bit-identical results), and calls from inside a parallel region.
 *
 * Tolerance (moments.h): per chunk of c rows the error of entry (i, j) is at most
 * (c + 2) u / (1 - c u) sum_r |y_ri y_rj| with u = 2^-24 and y the rows about the chunk mean;
 * by Cauchy-Schwarz, within and across chunks, sum |y_ri y_rj| <= n sd_i sd_j with sd about the
 * overall mean. Allowed: (min(n, 512) + 4) u n sd_i sd_j + 1e-13 n (|m_i m_j| + sd_i sd_j).
 */
#include "moments.h"
#include "cpu.h"
#define TU_SEED 4242
#include "tests/test_util.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int g_fail = 0, g_checks = 0;

static void report(const char *what, int ok, const char *isa) {
    g_checks++;
    if (!ok) {
        g_fail++;
        printf("FAIL [%s] %s\n", isa, what);
    }
}

static double drand(void) { return tu_uniform(); }

/* one shape: x (n, K, D) inside a buffer with rows of K * (D + pad) + 1 floats and heads
 * D + pad apart; values scale_i * rand + offset */
static void check_shape(int n, int K, int D, int pad, double offset, const char *isa) {
    char what[200];
    snprintf(what, sizeof what, "n=%d K=%d D=%d pad=%d offset=%g", n, K, D, pad, offset);
    const ptrdiff_t hs = D + pad, rs = (ptrdiff_t)K * hs + 1;
    const size_t nx = (size_t)n * rs + 8;
    float *buf = (float *)xmalloc(nx * sizeof(float));
    for (size_t i = 0; i < nx; i++) buf[i] = (float)(offset + 2.0 * drand());
    for (int r = 0; r < n; r++)   /* columns of different scales */
        for (int k = 0; k < K; k++)
            for (int i = 0; i < D; i++) {
                float *v = buf + 3 + r * rs + k * hs + i;
                *v = (float)(offset + (*v - offset) * (0.1 + 0.05 * (i % 37)));
            }
    const float *x = buf + 3;
    const size_t no = (size_t)K * D * D, ns = (size_t)K * D;
    double *fast = (double *)xmalloc(no * sizeof(double)), *ref = (double *)xmalloc(no * sizeof(double));
    double *fs = (double *)xmalloc(ns * sizeof(double)), *rsum = (double *)xmalloc(ns * sizeof(double));
    double *fast2 = (double *)xmalloc(no * sizeof(double)), *fs2 = (double *)xmalloc(ns * sizeof(double));
    for (size_t i = 0; i < no; i++) fast[i] = ref[i] = fast2[i] = 0.25 * (double)(i % 7);
    for (size_t i = 0; i < ns; i++) fs[i] = rsum[i] = fs2[i] = 1.0;
    /* symmetric start: the accumulator holds a sum of outer products */
    for (int k = 0; k < K; k++)
        for (int i = 0; i < D; i++)
            for (int j = 0; j < i; j++) {
                const size_t a = (size_t)k * D * D + (size_t)i * D + j;
                const size_t b = (size_t)k * D * D + (size_t)j * D + i;
                fast[b] = ref[b] = fast2[b] = fast[a];
            }
    set_threads(1);
    int rc1 = cd_moments_update(fast, fs, x, n, K, D, rs, hs);
    set_threads(2);
    int rc2 = cd_moments_update(fast2, fs2, x, n, K, D, rs, hs);
    int rc3 = cd_moments_update_naive(ref, rsum, x, n, K, D, rs, hs);
    report(what, rc1 == 0 && rc2 == 0 && rc3 == 0, isa);

    /* the bound of the header comment, per head */
    double worst = 0.0;
    int ok = 1, sym = 1, sums_ok = 1;
    double *m = (double *)xmalloc((size_t)D * sizeof(double)), *sd = (double *)xmalloc((size_t)D * sizeof(double));
    const double u = ldexp(1.0, -24), c = n < CD_MOMENTS_CHUNK ? n : CD_MOMENTS_CHUNK;
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < D; i++) {
            double s = 0.0, q = 0.0;
            for (int r = 0; r < n; r++) s += x[r * rs + k * hs + i];
            m[i] = s / n;
            for (int r = 0; r < n; r++) {
                const double d = x[r * rs + k * hs + i] - m[i];
                q += d * d;
            }
            sd[i] = sqrt(q / n);
        }
        for (int i = 0; i < D; i++) {
            for (int j = 0; j < D; j++) {
                const size_t e = (size_t)k * D * D + (size_t)i * D + j;
                const double tol = (c + 4) * u * n * sd[i] * sd[j] +
                                   1e-13 * n * (fabs(m[i] * m[j]) + sd[i] * sd[j]) + 1e-12;
                const double err = fabs(fast[e] - ref[e]);
                if (!(err <= tol)) ok = 0;
                if (err / tol > worst) worst = err / tol;
                if (fast[e] != fast[(size_t)k * D * D + (size_t)j * D + i]) sym = 0;
            }
            const size_t e = (size_t)k * D + i;
            if (!(fabs(fs[e] - rsum[e]) <= 1e-12 * (1.0 + fabs(rsum[e])))) sums_ok = 0;
        }
    }
    char w2[300];
    snprintf(w2, sizeof w2, "%s: fast within the bound of naive (worst err/bound %.3g)", what,
             worst);
    report(w2, ok, isa);
    snprintf(w2, sizeof w2, "%s: exactly symmetric", what);
    report(w2, sym, isa);
    snprintf(w2, sizeof w2, "%s: sums", what);
    report(w2, sums_ok, isa);
    snprintf(w2, sizeof w2, "%s: 1 and 2 threads bit-identical", what);
    report(w2, memcmp(fast, fast2, no * sizeof(double)) == 0 &&
                   memcmp(fs, fs2, ns * sizeof(double)) == 0, isa);
    /* the same call from inside a parallel region (one thread each): the same numbers */
    double *par = (double *)xmalloc(2 * no * sizeof(double));
    for (size_t i = 0; i < no; i++) {
        par[i] = (i % 7) * 0.25;
    }
    for (int k = 0; k < K; k++)
        for (int i = 0; i < D; i++)
            for (int j = 0; j < i; j++)
                par[(size_t)k * D * D + (size_t)j * D + i] = par[(size_t)k * D * D + (size_t)i * D + j];
    memcpy(par + no, par, no * sizeof(double));
    int prc[2] = {1, 1};
    #pragma omp parallel for num_threads(2)
    for (int t = 0; t < 2; t++) prc[t] = cd_moments_update(par + t * no, NULL, x, n, K, D, rs, hs);
    snprintf(w2, sizeof w2, "%s: inside a parallel region", what);
    report(w2, prc[0] == 0 && prc[1] == 0 && memcmp(par, fast, no * sizeof(double)) == 0 &&
                   memcmp(par + no, fast, no * sizeof(double)) == 0, isa);
    free(par);
    free(m); free(sd);
    free(buf); free(fast); free(ref); free(fs); free(rsum); free(fast2); free(fs2);
}

/* a chunked stream: updates of n1 then n2 rows equal one update of n1 + n2 rows when n1 is a
 * multiple of the chunk (the same chunks) */
static void check_split(const char *isa) {
    const int K = 2, D = 9, n1 = CD_MOMENTS_CHUNK, n2 = 37, n = n1 + n2;
    float *x = (float *)xmalloc((size_t)n * K * D * sizeof(float));
    for (size_t i = 0; i < (size_t)n * K * D; i++) x[i] = (float)drand();
    double a[2 * 9 * 9] = {0}, b[2 * 9 * 9] = {0}, sa[2 * 9] = {0}, sb[2 * 9] = {0};
    int rc = cd_moments_update(a, sa, x, n, K, D, K * D, D);
    rc |= cd_moments_update(b, sb, x, n1, K, D, K * D, D);
    rc |= cd_moments_update(b, sb, x + (size_t)n1 * K * D, n2, K, D, K * D, D);
    report("split at a chunk boundary: bit-identical", rc == 0 && !memcmp(a, b, sizeof a) &&
                                                           !memcmp(sa, sb, sizeof sa), isa);
    free(x);
}

static void check_errors(void) {
    const char *api = "args";
    double o[4] = {1, 2, 3, 4}, s[2] = {5, 6};
    float x[8] = {0};
    report("n < 0 refused", cd_moments_update(o, s, x, -1, 1, 2, 2, 0) == -1, api);
    report("K < 0 refused", cd_moments_update(o, s, x, 1, -1, 2, 2, 0) == -1, api);
    report("D < 0 refused", cd_moments_update(o, s, x, 1, 1, -2, 2, 0) == -1, api);
    report("negative stride refused", cd_moments_update(o, s, x, 2, 1, 2, -2, 0) == -1, api);
    report("NULL outer refused", cd_moments_update(NULL, s, x, 1, 1, 2, 2, 0) == -1, api);
    report("NULL x refused", cd_moments_update(o, s, NULL, 1, 1, 2, 2, 0) == -1, api);
    report("naive: NULL x refused", cd_moments_update_naive(o, s, NULL, 1, 1, 2, 2, 0) == -1, api);
    /* K * D * D * 8 bytes beyond size_t: refused before anything is touched */
    report("overflowing sizes refused",
           cd_moments_update(o, s, x, 1, INT32_MAX, INT32_MAX, 1, 1) == -1, api);
    report("overflowing strides refused",
           cd_moments_update(o, s, x, 3, 1, 2, PTRDIFF_MAX / 2, 0) == -1, api);
    report("nothing to do: 0", cd_moments_update(NULL, NULL, NULL, 0, 3, 3, 0, 0) == 0 &&
                                   cd_moments_update(NULL, NULL, NULL, 5, 0, 3, 0, 0) == 0, api);
    report("refused calls write nothing",
           o[0] == 1 && o[1] == 2 && o[2] == 3 && o[3] == 4 && s[0] == 5 && s[1] == 6, api);
    /* one row, one head, D = 2: exact (c * u error on integers is none) */
    float r[2] = {3.0f, -2.0f};
    double acc[4] = {0}, sum[2] = {0};
    int rc = cd_moments_update(acc, sum, r, 1, 1, 2, 2, 2);
    report("one row exact", rc == 0 && acc[0] == 9 && acc[1] == -6 && acc[2] == -6 &&
                                acc[3] == 4 && sum[0] == 3 && sum[1] == -2, api);
    /* NULL sums allowed */
    rc = cd_moments_update(acc, NULL, r, 1, 1, 2, 2, 2);
    report("NULL sums", rc == 0 && acc[0] == 18 && acc[3] == 8, api);
}

int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) { printf("usage: test_moments\n"); return 2; }
    check_errors();
    const int paths[3] = {CD_ISA_GENERIC, CD_ISA_AVX2, CD_ISA_AVX512};
    for (int p = 0; p < 3; p++) {
        const int isa = paths[p];
        const char *name = cd_cpu_isa_str(isa);
        if (!cd_cpu_has_isa(isa)) {
            printf("path %s: not on this CPU, skipped\n", name);
            continue;
        }
        if (cd_cpu_set_isa(isa) != 0) { report("set path", 0, name); continue; }
        const int before = g_fail;
        check_shape(1, 1, 1, 0, 0.0, name);
        check_shape(1, 3, 7, 2, 0.5, name);
        check_shape(5, 2, 17, 1, 0.0, name);
        check_shape(97, 3, 33, 3, 1.0, name);
        check_shape(600, 2, 100, 0, -0.5, name);   /* two chunks, two row blocks */
        check_shape(1030, 1, 200, 5, 0.0, name);   /* three chunks, 32-column tile edges */
        check_shape(300, 2, 24, 0, 1000.0, name);  /* rows far from the origin */
        check_split(name);
        printf("path %s: %s\n", name, g_fail == before ? "ok" : "FAILED");
    }
    printf("%d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
