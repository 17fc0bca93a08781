/* gemm.c -- matrix products (naive reference implementations; fast paths to follow). */
#include "gemm.h"
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

void cd_matmul_naive(float *out, const float *inp, const float *weight, const float *bias,
                     int M, int K, int OC, int accumulate) {
    #pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        const float *x = inp + (size_t)m * K;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * K;
            float s = bias ? bias[o] : 0.0f;
            for (int k = 0; k < K; k++) s += x[k] * w[k];
            float *y = out + (size_t)m * OC + o;
            *y = accumulate ? *y + s : s;
        }
    }
}

int cd_gemm_pack(cd_gemm_weight *pw, const float *weight, int OC, int K) {
    size_t n = (size_t)OC * (size_t)K;
    if (OC <= 0 || K <= 0 || n / (size_t)OC != (size_t)K || n > SIZE_MAX / sizeof(float)) return -1;
    pw->packed = (float *)malloc(n * sizeof(float));
    if (!pw->packed) return -1;
    memcpy(pw->packed, weight, n * sizeof(float));
    pw->OC = OC; pw->K = K; pw->packed_len = n;
    return 0;
}

void cd_gemm_weight_free(cd_gemm_weight *pw) {
    if (!pw) return;
    free(pw->packed);
    pw->packed = NULL; pw->packed_len = 0;
}

void cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
               int M, int accumulate) {
    cd_matmul_naive(out, inp, w->packed, bias, M, w->K, w->OC, accumulate);
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

void cd_sgemm_nt(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    cd_sgemm_nt_naive(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void cd_sgemm_nn(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    cd_sgemm_nn_naive(M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}
