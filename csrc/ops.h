/* ops.h -- the operations of the CLIP towers, one function each, in the order the model runs.
 *
 * Shapes: B = images (or texts) in a batch, N = tokens per sequence, W = width, H = heads,
 * d = W / H, F = MLP hidden width, D = embedding dim, S = image side, P = patch side,
 * G = S / P, R = rows of a matrix.
 * All matrices are row-major float32. Functions parallelise with OpenMP over their outer loop
 * (and fall back to one thread inside an enclosing parallel region).
 * Each op with any cleverness (vectorised polynomials, fused blocking, GEMM calls) has a naive
 * reference beside it, *_naive: plain loops in double over libm, one thread, no scratch, same
 * arguments; csrc/tests/test_ops.c compares the two on every instruction-set path.
 */
#ifndef CLIPDECOMP_OPS_H
#define CLIPDECOMP_OPS_H

#include <stddef.h>
#include <stdint.h>

/* images (B, 3, S, S) -> out (B*G*G, 3*P*P): patches row-major over the grid, values within a
 * patch in (c, py, px) order, the layout of a conv weight (W, 3, P, P) viewed as (W, 3*P*P). */
void patches_forward(float *out, const float *images, int B, int S, int P);

/* x (B, N, W): x[b, 0] = cls + pos[0], x[b, 1 + p] = patch_emb[b, p] + pos[1 + p].
 * patch_emb (B, N-1, W), cls (W), pos (N, W). */
void vision_embed_forward(float *x, const float *patch_emb, const float *cls, const float *pos,
                          int B, int N, int W);

/* x (T, C, W) = tok_emb[ids[t, c]] + pos[c] for c < C; ids (T, ids_stride) with
 * ids_stride >= C (a causal text tower reads only the first C tokens of each row), already
 * checked to be in [0, V). */
void text_embed_forward(float *x, const int32_t *ids, int ids_stride, const float *tok_emb,
                        const float *pos, int T, int C, int W);
/* the same with the table held in bf16 (V, W) (a bf16 model's): each looked-up row is widened
 * to float32 as it is added, so the numbers are those of a float32 table of the rounded values */
void text_embed_bf16_forward(float *x, const int32_t *ids, int ids_stride,
                             const uint16_t *tok_emb, const float *pos, int T, int C, int W);

/* out (R, W) = (inp - mean) / sqrt(var + eps) * weight + bias over each row (biased variance,
 * statistics in double). out may equal inp. mean, sigma (R) receive the row statistics
 * (sigma = sqrt(var + eps)) when not NULL. */
void layernorm_forward(float *out, float *mean, float *sigma, const float *inp,
                       const float *weight, const float *bias, int R, int W, float eps);
void layernorm_forward_naive(float *out, float *mean, float *sigma, const float *inp,
                             const float *weight, const float *bias, int R, int W, float eps);

/* x (n) in place: exact GELU 0.5 x (1 + erf(x / sqrt 2)) */
void gelu_forward(float *x, size_t n);
/* x (n) in place: QuickGELU x * sigmoid(1.702 x) */
void quick_gelu_forward(float *x, size_t n);
/* x (n) in place: GELU's tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (SigLIP);
 * the reference gelu_tanh_forward_naive is that formula in double over libm, as
 * x / (1 + e^(-2u)) (no cancellation for x < 0); the fast form agrees within (8 + 3|2u|)
 * roundings, and gives -0 below x = -10 where the value is below 1e-37 |x| */
void gelu_tanh_forward(float *x, size_t n);
void gelu_tanh_forward_naive(float *x, size_t n);
/* the references: 0.5 x erfc(-x / sqrt 2) and x / (1 + exp(-1.702 x)) in double. The fast
 * forms agree within a few roundings (times 1 + x^2 for GELU at x < 0, 1 + 1.7 |x| for
 * QuickGELU: the rounding of the argument); GELU between x = -7.07 and -12.7 within 3e-6
 * relative (an asymptotic series, where |GELU| < 6e-12), and both give -0 where the exact value
 * is below 1e-36 |x| (GELU below x = -12.7, QuickGELU below x = -51.7). NaN and +inf map to
 * themselves; -inf gives NaN (x * 0), as in the references and torch. */
void gelu_forward_naive(float *x, size_t n);
void quick_gelu_forward_naive(float *x, size_t n);

/* the scalar forms of the vectorised functions above: e^x (relative error < 2e-7) and GELU
 * (exact erf form), for tests */
float cd_expf(float x);
float cd_gelu(float x);

/* x (n) += y (n) */
void residual_forward(float *x, const float *y, size_t n);

/* row (n) in place: softmax over its first `valid` entries, zeros after them. */
void softmax_forward(float *row, int valid, int n);
/* the reference, in double; both give zeros for valid = 0 and NaN rows when any of the first
 * `valid` entries is NaN or all of them are -inf */
void softmax_forward_naive(float *row, int valid, int n);

/* Multi-head self-attention on packed projections.
 *   out     (B, N, W)  concatenated head outputs (before the out-projection)
 *   qkv     (B, N, 3W) rows [q | k | v], head h at columns h*d .. h*d + d of each part
 *   att_cls (B, H, N) at batch stride cls_bstride, or NULL: softmax row of query 0 per head
 *   att_mean (B, N, N) at batch stride mean_bstride, or NULL: softmax averaged over heads
 *   causal  != 0: query i sees keys j <= i only
 *   scratch (n_scratch, min(N, CD_ATT_ROW_BLOCK), N) floats: one score tile per OpenMP thread
 *           (at most n_scratch threads are used)
 * Scale 1/sqrt(d). Fused per block of query rows: scores, softmax and the weighted sum of values
 * of CD_ATT_ROW_BLOCK rows at a time, never the whole N x N matrix. Parallel over (sequence,
 * head, row block), or over (sequence, row block) when att_mean is wanted. */
#define CD_ATT_ROW_BLOCK 48   /* whole 6-row (AVX2) and 12-row (AVX-512) tiles of the GEMM */
void attention_forward(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                       size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                       int causal, float *scratch, int n_scratch);
/* The attention of a tower in bf16 (every bf16 precision, so that the emulated one gives the
 * numbers of the native ones): q, k and v rounded to bf16 in place in qkv (what the
 * decomposition reads afterwards), the probabilities rounded to bf16 before they weight the
 * values (att_cls and att_mean get them unrounded), float32 sums and softmax. On AMX tiles
 * where attention_forward_amx applies, else attention_forward's kernel. Arguments as
 * attention_forward's. */
void attention_forward_bf16(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                            size_t mean_bstride, float *qkv, int B, int N, int W, int H,
                            int causal, float *scratch, int n_scratch);
/* The same attention (no causal mask) with bf16 products on AMX tiles (attention_amx.c): q, k,
 * v and the probabilities rounded to bf16, float32 sums and softmax; att_cls and att_mean as
 * attention_forward's, from the float32 probabilities. Returns 0 without touching anything
 * where it does not apply (no AMX, d not a multiple of 32 or above 256, no memory for its
 * buffers): then run attention_forward. Parallel over (sequence, head), or over sequences when
 * att_mean is wanted. */
int attention_forward_amx(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                          size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                          int n_threads);
/* 1 where attention_forward_amx can run this geometry (AMX usable, d = W / H a multiple of 32,
 * at most 256) */
int attention_amx_applies(int N, int W, int H);
/* the reference: the same outputs from triple loops in double (scores recomputed in each pass
 * rather than stored), one thread, no scratch, no GEMM */
void attention_forward_naive(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                             size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                             int causal);

/* The reference convention of the decomposition, applied to raw residual-stream terms before
 * the projection: rows (R, W) <- gamma * (rows - mu * k_inv) / sigma + beta * k_inv, where
 * k_inv = 1 / K_t is the term's share of the LayerNorm mean and bias. */
void decomp_ln_rows(float *rows, size_t R, int W, float mu, float sigma, const float *gamma,
                    const float *beta, float k_inv);

/* rows (R, C) at row stride ld <- rows * s + shift (C) */
void scale_shift_rows(float *rows, size_t R, int C, size_t ld, float s, const float *shift);

#endif
