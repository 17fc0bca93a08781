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
#include <stdint.h>

/* precision of a packed weight's products (cd_gemm_weight.precision) */
enum {
    CD_GEMM_FP32 = 0,           /* float32 panels, float32 products */
    CD_GEMM_BF16 = 1,           /* bf16 pairs (packed_bf16): both operands rounded to bf16,
                                 * products summed in float32 (AVX512_BF16 vdpbf16ps, or the
                                 * portable pair kernel on CPUs without it) */
    CD_GEMM_BF16_EMULATED = 2   /* float32 panels holding bf16-rounded values; the left operand
                                 * is rounded to bf16 as it is packed: the numbers of CD_GEMM_BF16
                                 * (up to the order of the float32 sums) on any CPU, at fp32 speed */
};

typedef struct {
    int OC, K;          /* logical shape of the weight: (OC, K) */
    float *packed;      /* owned: panels in the layout the micro-kernel wants (NULL in bf16) */
    size_t packed_len;  /* floats in `packed` */
    uint32_t *packed_bf16;   /* owned, CD_GEMM_BF16 only: the same panels with bf16 pairs of
                              * depth rows (2k, 2k+1) in one 32-bit lane (gemm_kernels.h) */
    size_t packed_bf16_len;  /* 32-bit words in `packed_bf16` */
    int precision;      /* CD_GEMM_FP32 | CD_GEMM_BF16 | CD_GEMM_BF16_EMULATED */
    int isa;            /* instruction-set path active at pack time (CD_ISA_*, cpu.h) */
    int panel;          /* columns per K-major panel (16) ... */
    int slice;          /* ... in depth slices of 512 (layout: gemm_kernels.h). Every path
                         * reads this one layout: a weight packed under one runs under any. */
} cd_gemm_weight;

/* returns 0, or -1 when memory cannot be had (sizes are overflow-checked) */
int  cd_gemm_pack(cd_gemm_weight *pw, const float *weight /* (OC, K) */, int OC, int K);
void cd_gemm_weight_free(cd_gemm_weight *pw);
/* Convert a packed float32 weight to `precision` (CD_GEMM_BF16 or CD_GEMM_BF16_EMULATED), in
 * place and for good. Returns 0, or -1 (weight unchanged) when memory cannot be had or the
 * weight is not float32. */
int  cd_gemm_to_bf16(cd_gemm_weight *pw, int precision);

/* cd_gemm_pack then cd_gemm_to_bf16(CD_GEMM_BF16) in one step, bit for bit, without the
 * float32 panels in between (a loader converting as it reads). Returns 0 or -1 as they do. */
int  cd_gemm_pack_bf16(cd_gemm_weight *pw, const float *weight /* (OC, K) */, int OC, int K);
/* The weight (OC, K) back as float32 from its packed panels (bf16 values widened): the one
 * copy a model keeps is the packed one, and a caller that needs the plain matrix (the
 * decomposition's out-projection) unpacks it into its own scratch. Returns 0, or -1 for a
 * weight not made by cd_gemm_pack. */
int  cd_gemm_unpack(const cd_gemm_weight *pw, float *dst /* (OC, K) */);

/* float32 -> bf16, round to nearest even (NaN stays NaN), and back */
static inline uint16_t cd_bf16_from_f32(float x) {
    union { float f; uint32_t u; } v = {x};
    if ((v.u & 0x7F800000u) == 0x7F800000u && (v.u & 0x007FFFFFu))
        return (uint16_t)((v.u >> 16) | 0x0040u);          /* quiet NaN */
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float cd_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static inline float cd_bf16_round(float x) { return cd_bf16_to_f32(cd_bf16_from_f32(x)); }

/* out (M, OC) = inp (M, K) @ W^T + bias (bias may be NULL); accumulate != 0 adds to out. */
void cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
               int M, int accumulate);
void cd_matmul_naive(float *out, const float *inp, const float *weight /* (OC, K) */,
                     const float *bias, int M, int K, int OC, int accumulate);
/* the bf16 reference: both operands rounded to bf16, products summed in float32 */
void cd_matmul_bf16_naive(float *out, const float *inp, const float *weight /* (OC, K) */,
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
