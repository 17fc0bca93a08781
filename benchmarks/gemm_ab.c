/* The core's cd_matmul against the same function of another revision, linked into one binary
 * (the other revision's symbols renamed with the prefix base_ by benchmarks/bench_gemm_ab.py),
 * called in turn on the same inputs: each round times both, and the median of the per-round
 * ratios is printed with the median rates.
 *
 *   gemm_ab PRECISION ROUNDS M K N [M K N ...]     PRECISION: fp32 or bf16
 *
 * prints per shape: M K N base_GFLOPs this_GFLOPs median(base_time / this_time) max_abs_diff */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemm.h"

int base_cd_gemm_pack(cd_gemm_weight *pw, const float *weight, int OC, int K);
int base_cd_gemm_to_bf16(cd_gemm_weight *pw, int precision);
void base_cd_gemm_weight_free(cd_gemm_weight *pw);
void base_cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
                    int M, int accumulate);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, by_value);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    if (argc < 6 || (argc - 3) % 3 != 0) {
        fprintf(stderr, "usage: %s fp32|bf16 ROUNDS M K N [M K N ...]\n", argv[0]);
        return 2;
    }
    const int bf16 = strcmp(argv[1], "bf16") == 0;
    const int rounds = atoi(argv[2]);
    if (rounds < 1 || rounds > 1000) return 2;
    for (int s = 3; s + 2 < argc; s += 3) {
        const int M = atoi(argv[s]), K = atoi(argv[s + 1]), N = atoi(argv[s + 2]);
        if (M < 1 || K < 1 || N < 1) return 2;
        float *x = malloc(sizeof(float) * (size_t)M * K), *w = malloc(sizeof(float) * (size_t)N * K);
        float *o1 = malloc(sizeof(float) * (size_t)M * N), *o2 = malloc(sizeof(float) * (size_t)M * N);
        float *b = malloc(sizeof(float) * (size_t)N);
        double *tb = malloc(sizeof(double) * rounds), *tt = malloc(sizeof(double) * rounds);
        double *r = malloc(sizeof(double) * rounds);
        if (!x || !w || !o1 || !o2 || !b || !tb || !tt || !r) return 1;
        unsigned long long z = 88172645463325252ull;   /* xorshift: the same inputs each run */
        for (size_t i = 0; i < (size_t)M * K; i++) {
            z ^= z << 13; z ^= z >> 7; z ^= z << 17;
            x[i] = (float)(z % 2001) / 1000.0f - 1.0f;
        }
        for (size_t i = 0; i < (size_t)N * K; i++) {
            z ^= z << 13; z ^= z >> 7; z ^= z << 17;
            w[i] = ((float)(z % 2001) / 1000.0f - 1.0f) / sqrtf((float)K);
        }
        for (int i = 0; i < N; i++) b[i] = 0.01f * (float)(i % 7);
        cd_gemm_weight pt, pb;
        if (cd_gemm_pack(&pt, w, N, K) || base_cd_gemm_pack(&pb, w, N, K)) return 1;
        if (bf16 && (cd_gemm_to_bf16(&pt, CD_GEMM_BF16) || base_cd_gemm_to_bf16(&pb, CD_GEMM_BF16)))
            return 1;
        cd_matmul(o2, x, &pt, b, M, 0);   /* warm both */
        base_cd_matmul(o1, x, &pb, b, M, 0);
        for (int i = 0; i < rounds; i++) {
            double t0 = now();
            base_cd_matmul(o1, x, &pb, b, M, 0);
            tb[i] = now() - t0;
            t0 = now();
            cd_matmul(o2, x, &pt, b, M, 0);
            tt[i] = now() - t0;
            r[i] = tb[i] / tt[i];
        }
        double diff = 0.0;
        for (size_t i = 0; i < (size_t)M * N; i++) {
            const double d = fabs((double)o1[i] - (double)o2[i]);
            if (d > diff) diff = d;
        }
        const double flop = 2.0 * M * (double)K * N;
        printf("%d %d %d %.1f %.1f %.3f %.3g\n", M, K, N, flop / median(tb, rounds) / 1e9,
               flop / median(tt, rounds) / 1e9, median(r, rounds), diff);
        cd_gemm_weight_free(&pt);
        base_cd_gemm_weight_free(&pb);
        free(x); free(w); free(o1); free(o2); free(b); free(tb); free(tt); free(r);
    }
    return 0;
}
