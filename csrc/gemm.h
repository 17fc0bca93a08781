/* gemm.h -- the matrix products of the core.
 *
 *   cd_matmul:  out (M, OC) = inp (M, K) @ weight^T + bias    with weight (OC, K) row-major
 *               (the nn.Linear convention), weight packed once at load into cd_gemm_weight.
 *   cd_sgemm_nt: C (M, N) (+)= alpha * A (M, K) @ B(N, K)^T  on strided, unpacked operands
 *   cd_sgemm_nn: C (M, N) (+)= alpha * A (M, K) @ B(K, N)    on strided, unpacked operands
 * Each fast kernel has a naive reference beside it (the *_naive functions); tests run both on
 * every instruction-set path the CPU has. cd_matmul and the sgemm functions parallelise with
 * OpenMP internally when called from outside a parallel region, and run single-threaded when
 * called from inside one (the attention kernel calls them per (image, head)).
 */
#ifndef CLIPDECOMP_GEMM_H
#define CLIPDECOMP_GEMM_H
#include <stddef.h>

typedef struct {
    int OC, K;          /* logical shape of the weight: (OC, K) */
    float *packed;      /* owned: panels in the layout the micro-kernel wants */
    size_t packed_len;  /* floats in `packed` */
    int isa;            /* instruction-set path active at pack time (CD_ISA_*, cpu.h) */
    int panel;          /* columns per K-major panel (16) ... */
    int slice;          /* ... in depth slices of 512 (layout: gemm_kernels.h). Every path
                         * reads this one layout: a weight packed under one runs under any. */
} cd_gemm_weight;

/* returns 0, or -1 when memory cannot be had (sizes are overflow-checked) */
int  cd_gemm_pack(cd_gemm_weight *pw, const float *weight /* (OC, K) */, int OC, int K);
void cd_gemm_weight_free(cd_gemm_weight *pw);

/* out (M, OC) = inp (M, K) @ W^T + bias (bias may be NULL); accumulate != 0 adds to out. */
void cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
               int M, int accumulate);
void cd_matmul_naive(float *out, const float *inp, const float *weight /* (OC, K) */,
                     const float *bias, int M, int K, int OC, int accumulate);

/* C (M, N) = alpha * A (M, K) @ B (N, K)^T [+ C if accumulate]; lda/ldb/ldc are row strides */
void cd_sgemm_nt(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate);
void cd_sgemm_nt_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate);
/* C (M, N) = alpha * A (M, K) @ B (K, N) [+ C if accumulate] */
void cd_sgemm_nn(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate);
void cd_sgemm_nn_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate);

/* the instruction-set path (see cpu.h): 0 generic, 1 avx2+fma, 2 avx512f */
#endif
