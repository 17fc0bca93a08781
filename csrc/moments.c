/* moments.c -- streaming second moments of row vectors: outer[k] += X_k^T X_k, sums[k] += rows.
 *
 * Shapes (moments.h): K = heads, n = rows (images), D = row width, c = rows of one chunk
 * (c <= CD_MOMENTS_CHUNK), MB = output rows of one job.
 *
 * The fast function, per chunk of c rows and per group of heads (one head per thread):
 *   1. each head's rows are summed (float64), centred on their mean mu (rounded to float32) and
 *      transposed into XT (D, c) = (X - 1 mu^T)^T (the GEMM reads its left operand along the
 *      depth, here the rows);
 *   2. jobs (head, row block ib): P (MB, D - i0) = XT[i0:i0+MB] @ XT[i0:D]^T in float32 with
 *      cd_sgemm_nt (single-threaded inside the parallel region): rows i0.. of Y^T Y from
 *      column i0 on, i.e. the upper triangle in blocks;
 *   3. the same job adds P plus the float64 correction (mu s^T + s mu^T - c mu mu^T, moments.h)
 *      to the float64 accumulator: entry (i, j), j >= i, to outer[i, j] and to outer[j, i], in
 *      32-column tiles so that the mirrored writes stay in cache. Each value is computed once
 *      for both places, so the accumulator stays exactly symmetric. Every entry (a, b) is
 *      written by the job owning the row block of min(a, b) alone: jobs never write the same
 *      memory, and the result does not depend on the number of threads.
 */
#include "moments.h"
#include "gemm.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MB 96   /* output rows per job: a multiple of every GEMM row tile (4, 6, 12) */
#define TJ 32   /* columns per tile of the float64 update (mirrored writes stay in L1/L2) */

/* -1: invalid; 0: valid, nothing to do; 1: valid, work to do */
static int check_args(const double *outer, const float *x, long long n, int K, int D,
                      ptrdiff_t row_stride, ptrdiff_t head_stride) {
    if (n < 0 || K < 0 || D < 0 || row_stride < 0 || head_stride < 0) return -1;
    if (n == 0 || K == 0 || D == 0) return 0;
    if (!outer || !x) return -1;
    /* the accumulator: K * D * D doubles */
    const size_t d = (size_t)D;
    if (d > SIZE_MAX / d || d * d > SIZE_MAX / sizeof(double) / (size_t)K) return -1;
    /* the last element read, (n-1) * row_stride + (K-1) * head_stride + D - 1, as ptrdiff_t */
    const long long nm1 = n - 1;
    if (row_stride > 0 && nm1 > PTRDIFF_MAX / 4 / row_stride) return -1;
    if (head_stride > 0 && (ptrdiff_t)(K - 1) > PTRDIFF_MAX / 4 / head_stride) return -1;
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* naive reference                                                                            */

int cd_moments_update_naive(double *outer, double *sums, const float *x, long long n, int K,
                            int D, ptrdiff_t row_stride, ptrdiff_t head_stride) {
    const int st = check_args(outer, x, n, K, D, row_stride, head_stride);
    if (st <= 0) return st;
    for (int k = 0; k < K; k++) {
        double *o = outer + (size_t)k * D * D;     /* (D, D) */
        for (long long r = 0; r < n; r++) {
            const float *row = x + (ptrdiff_t)r * row_stride + (ptrdiff_t)k * head_stride;  /* (D) */
            for (int i = 0; i < D; i++) {
                const double xi = row[i];
                if (sums) sums[(size_t)k * D + i] += xi;
                for (int j = 0; j < D; j++) o[(size_t)i * D + j] += xi * (double)row[j];
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* fast path                                                                                  */

/* one head's chunk of c rows, x (c, D) at row stride row_stride:
 *   s (D)        column sums, float64
 *   mu (D)       the chunk mean rounded to float32 (as double): the shift
 *   u (D)        s - c * mu, float64 (the correction terms below use it)
 *   xt (D, ldt)  [i, r] = x[r, i] - mu[i] in float32 (transposed: the GEMM's depth is r) */
static void center_transpose(float *xt, int ldt, double *s, double *mu, double *u,
                             const float *x, ptrdiff_t row_stride, int c, int D) {
    for (int i = 0; i < D; i++) s[i] = 0.0;
    for (int r = 0; r < c; r++) {
        const float *src = x + (ptrdiff_t)r * row_stride;
        for (int i = 0; i < D; i++) s[i] += (double)src[i];
    }
    for (int i = 0; i < D; i++) {
        mu[i] = (double)(float)(s[i] / c);
        u[i] = s[i] - c * mu[i];
    }
    for (int r0 = 0; r0 < c; r0 += 16) {   /* 16 x 16 tiles */
        const int r1 = c - r0 < 16 ? c : r0 + 16;
        for (int i0 = 0; i0 < D; i0 += 16) {
            const int i1 = D - i0 < 16 ? D : i0 + 16;
            for (int r = r0; r < r1; r++) {
                const float *src = x + (ptrdiff_t)r * row_stride;
                for (int i = i0; i < i1; i++) xt[(size_t)i * ldt + r] = src[i] - (float)mu[i];
            }
        }
    }
}

/* one job: rows [i0, i1) of X^T X for one head, from column i0 on, added to outer (D, D) of
 * that head in float64, both triangles. With Y = X - 1 mu^T the centred chunk (in xt),
 *     X^T X = Y^T Y + mu s^T + s mu^T - c mu mu^T,   i.e.  (X^T X)_ij = (Y^T Y)_ij + mu_i u_j + s_i mu_j
 * Y^T Y in float32 (GEMM), the rest in float64: the float32 error scales with the spread of
 * the rows about their mean, not with the mean. p: scratch of (i1 - i0) * (D - i0) floats. */
static void moments_block(double *outer, const float *xt, int ldt, int c, int D, int i0, int i1,
                          const double *s, const double *mu, const double *u, float *p) {
    const int m = i1 - i0, w = D - i0;
    const float *a = xt + (size_t)i0 * ldt;   /* (m, c) and, as B, (w, c) */
    cd_sgemm_nt(m, w, c, 1.0f, a, ldt, a, ldt, p, w, 0);   /* p (m, w): P[i, j] at (i-i0, j-i0) */
    /* a tile of TJ columns at a time: each value v_ij (j >= i) is computed once, added to
     * outer[i, j] along the rows, kept in t, and added to outer[j, i] along the rows of the
     * lower triangle: the accumulator stays exactly symmetric */
    double t[TJ * MB];   /* t[(j - j0) * m + (i - i0)] = v_ij */
    for (int j0 = i0; j0 < D; j0 += TJ) {
        const int j1 = D - j0 < TJ ? D : j0 + TJ;
        const int ie = i1 < j1 ? i1 : j1;   /* rows with an entry j >= i in this tile */
        for (int i = i0; i < ie; i++) {
            const float *pr = p + (size_t)(i - i0) * w;   /* pr[j - i0] = P[i, j] */
            double *row = outer + (size_t)i * D;
            const double mui = mu[i], si = s[i];
            for (int j = j0 > i ? j0 : i; j < j1; j++) {
                const double v = (double)pr[j - i0] + (mui * u[j] + si * mu[j]);
                row[j] += v;
                t[(j - j0) * m + (i - i0)] = v;
            }
        }
        for (int j = j0; j < j1; j++) {
            const double *tj = t + (j - j0) * m;   /* tj[i - i0] = v_ij */
            double *row = outer + (size_t)j * D;
            const int e = j < i1 ? j : i1;        /* i < j only */
            for (int i = i0; i < e; i++) row[i] += tj[i - i0];
        }
    }
}

static int max_threads(void) {
#ifdef _OPENMP
    if (omp_get_level() > 0 || omp_in_parallel()) return 1;
    const int nt = omp_get_max_threads();
    return nt > 0 ? nt : 1;
#else
    return 1;
#endif
}

int cd_moments_update(double *outer, double *sums, const float *x, long long n, int K, int D,
                      ptrdiff_t row_stride, ptrdiff_t head_stride) {
    const int st = check_args(outer, x, n, K, D, row_stride, head_stride);
    if (st <= 0) return st;
    const int nt = max_threads();
    const int G = K < nt ? K : nt;                            /* heads per group */
    const int cmax = n < CD_MOMENTS_CHUNK ? (int)n : CD_MOMENTS_CHUNK;
    int ldt = (cmax + 15) / 16 * 16;                          /* XT row stride, in floats ... */
    if (ldt % 64 == 0) ldt += 16;                             /* ... off the cache-set period */
    const int nb = (D + MB - 1) / MB;                         /* row blocks per head */
    /* scratch: per head of a group XT (D, ldt) and s, mu, u (3, D); per thread P (MB, D).
     * D * ldt and 3 * D cannot overflow size_t since D * D * 8 did not (check_args) and
     * ldt <= CD_MOMENTS_CHUNK + 16 */
    const size_t xt_per = (size_t)D * ldt, p_per = (size_t)MB * D, v_per = (size_t)3 * D;
    if (xt_per > SIZE_MAX / sizeof(float) / (size_t)G ||
        p_per > SIZE_MAX / sizeof(float) / (size_t)nt ||
        v_per > SIZE_MAX / sizeof(double) / (size_t)G)
        return -2;
    float *xt = (float *)malloc(xt_per * G * sizeof(float));
    float *pbuf = (float *)malloc(p_per * nt * sizeof(float));
    double *vbuf = (double *)malloc(v_per * G * sizeof(double));
    if (!xt || !pbuf || !vbuf) {
        free(xt);
        free(pbuf);
        free(vbuf);
        return -2;
    }
    for (long long r0 = 0; r0 < n; r0 += CD_MOMENTS_CHUNK) {
        const int c = n - r0 < CD_MOMENTS_CHUNK ? (int)(n - r0) : CD_MOMENTS_CHUNK;
        const float *xc = x + (ptrdiff_t)r0 * row_stride;     /* first row of the chunk */
        for (int k0 = 0; k0 < K; k0 += G) {
            const int g = K - k0 < G ? K - k0 : G;
            #pragma omp parallel num_threads(nt) if (nt > 1)
            {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                float *p = pbuf + p_per * (size_t)tid;
                #pragma omp for schedule(static)
                for (int q = 0; q < g; q++) {
                    double *v = vbuf + v_per * q;   /* s, mu, u of head k0 + q */
                    center_transpose(xt + xt_per * q, ldt, v, v + D, v + 2 * D,
                                     xc + (ptrdiff_t)(k0 + q) * head_stride, row_stride, c, D);
                    if (sums) {
                        double *sk = sums + (size_t)(k0 + q) * D;
                        for (int i = 0; i < D; i++) sk[i] += v[i];
                    }
                }
                /* heaviest jobs (first row blocks) first, over the heads of the group */
                #pragma omp for schedule(dynamic, 1)
                for (int job = 0; job < g * nb; job++) {
                    const int q = job % g, ib = job / g;
                    const int i0 = ib * MB, i1 = D - i0 < MB ? D : i0 + MB;
                    const double *v = vbuf + v_per * q;
                    moments_block(outer + (size_t)(k0 + q) * D * D, xt + xt_per * q, ldt, c, D,
                                  i0, i1, v, v + D, v + 2 * D, p);
                }
            }
        }
    }
    free(xt);
    free(pbuf);
    free(vbuf);
    return 0;
}
