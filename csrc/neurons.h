/* neurons.h -- what the image forward must keep for the second-order effects of the MLP neurons
 * of one layer ("Interpreting the Second-Order Effects of Neurons in CLIP", Gandelsman et al.,
 * ICLR 2025), and the fold that turns it into effects.
 *
 * Shapes: B images, N tokens, W width, L layers, H heads, F MLP width (neurons), D embedding
 * dim; for a neuron layer l, J = L - 1 - l later layers and K = J * H later heads.
 *
 * The effect of neuron n of layer l through head h of a later layer j is linear in the neuron's
 * post-activation values act[t, n] over tokens once the image fixes the attention a[j,h,0,t] and
 * the per-token ln_1 statistics (mu_j[t], sigma_j[t]) of layer j, so per image it needs only
 *   coef[j,h,n] = sum_t a[j,h,0,t] act[t,n] / sigma_j[t]
 *   aux[j,h]    = (sum_t a[j,h,0,t] / sigma_j[t], sum_t a[j,h,0,t] mu_j[t] / sigma_j[t])
 * and never a (tokens, neurons, width) intermediate. The rest is fixed per model (the fold,
 * built in Python: clipdecomp/neurons.py).
 */
#ifndef CLIPDECOMP_NEURONS_H
#define CLIPDECOMP_NEURONS_H

#include <stddef.h>
#include <stdint.h>

#include "clipdecomp.h"

/* Run the image forward on images (B, 3, S, S) and fill, for neuron layer `layer` (0 <= layer < L):
 *   coef      (B, J, H, F)  as above
 *   aux       (B, J, H, 2)  as above
 *   act_cls   (B, F)        act at the class token (the first-order effects)
 *   acts      (B, N, R)     act of the R neurons `record` at every token (R = 0: not touched)
 *   embedding (B, D), ln_stats (B, 3): as cd_encode_image
 * All outputs are caller-allocated. record holds R indices in [0, F) (checked). */
cd_status cd_neuron_coefs(const cd_model *m, const float *images, int B, int layer,
                          const int32_t *record, int R, int threads, cd_cancel_fn cancel,
                          void *cancel_ctx, float *coef, float *aux, float *act_cls, float *acts,
                          float *embedding, float *ln_stats, cd_error *err);

/* as cd_neuron_coefs with a chosen scratch budget in bytes for the forward's chunks of images
 * (0: the default; tests use 1 to run one image per chunk) */
cd_status cd_neuron_coefs_budget(const cd_model *m, const float *images, int B, int layer,
                                 const int32_t *record, int R, int threads, cd_cancel_fn cancel,
                                 void *cancel_ctx, float *coef, float *aux, float *act_cls,
                                 float *acts, float *embedding, float *ln_stats, cd_error *err,
                                 size_t budget);

/* out (B, F, D) = scale[b] * sum_k coef[b, k, n] fold[n, k, :] + shift[b, :]
 * coef (B, K, F), fold (F, K, D), scale (B), shift (B, D). Parallel over neurons. */
void cd_neuron_fold_apply(float *out, const float *coef, const float *fold, const float *scale,
                          const float *shift, int B, int K, int F, int D);
/* the reference: plain loops in double, one thread */
void cd_neuron_fold_apply_naive(float *out, const float *coef, const float *fold,
                                const float *scale, const float *shift, int B, int K, int F,
                                int D);

#endif
