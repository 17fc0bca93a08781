/* moments.h -- streaming second moments of row vectors (the per-head statistics of TextSpan).
 *
 * Shapes:  K = heads (independent sets of rows)   n = rows of this update (images)
 *          D = row width (embedding dim, e.g. 1024)
 *
 *   cd_moments_update:  for every head k < K
 *       outer[k] (D, D) += X_k^T X_k          (float64 accumulator, kept exactly symmetric)
 *       sums[k]  (D)    += sum over rows of X_k   (float64; sums may be NULL)
 *   where X_k (n, D) is float32 with element (r, i) at x[r * row_stride + k * head_stride + i]
 *   (strides in floats, >= 0; the D values of a row are contiguous).
 *
 * Precision of the fast function. The rows are taken in chunks of at most CD_MOMENTS_CHUNK.
 * Each chunk is centred on its own mean mu (column sums s in float64, mu rounded to float32),
 * Y = X - 1 mu^T in float32, and Y^T Y computed in float32 by the core's GEMM (products
 * rounded to float32, summed over the chunk's rows in float32); then
 *     X^T X = Y^T Y + mu s^T + s mu^T - c mu mu^T
 * is added to the float64 accumulator, the correction terms in float64. So for a chunk of c
 * rows the error of an entry is about sqrt(c) * 2^-24 (at worst c * 2^-24) times
 * sum_r |y_ri y_rj|: it scales with the spread of the rows about their mean, not with the
 * mean (a covariance taken from the result keeps float32 relative precision even for rows far
 * from the origin). Across chunks the sums are float64. The row sums are float64 throughout.
 * The naive reference below computes in float64 and serves as the oracle of the tests.
 *
 * Work: X_k^T X_k is symmetric, so only the blocks on and above the diagonal are multiplied
 * (about 55% of the full product for D = 1024) and mirrored into the lower triangle. Heads and
 * row blocks are shared among the OpenMP threads when called outside a parallel region; inside
 * one everything runs on the calling thread. The result does not depend on the thread count.
 */
#ifndef CLIPDECOMP_MOMENTS_H
#define CLIPDECOMP_MOMENTS_H
#include <stddef.h>

#define CD_MOMENTS_CHUNK 512   /* most rows summed in float32 before the float64 accumulator */

/* returns 0; -1 for invalid arguments (NULL pointers with n, K, D > 0, negative sizes or
 * strides, sizes whose products overflow); -2 when scratch memory cannot be had (nothing is
 * changed then). */
int cd_moments_update(double *outer /* (K, D, D) */, double *sums /* (K, D) or NULL */,
                      const float *x /* (n, K, D) strided, see above */, long long n, int K,
                      int D, ptrdiff_t row_stride, ptrdiff_t head_stride);

/* the same in plain float64 loops, one head and one row at a time (slow, obviously correct) */
int cd_moments_update_naive(double *outer, double *sums, const float *x, long long n, int K,
                            int D, ptrdiff_t row_stride, ptrdiff_t head_stride);

#endif /* CLIPDECOMP_MOMENTS_H */
