/* neurons.c -- per-image coefficients of the second-order neuron effects (see neurons.h).
 *
 * A capture callback on the image forward (cd_vision_opts.capture) keeps the post-activation
 * MLP hidden of the neuron layer l for the chunk in flight, the per-token ln_1 statistics of each
 * later layer j as it is entered, and at j's attention forms, per (image, head),
 *   coef[j,h,:] = (a[j,h,0,:] / sigma_j) @ act      (1 x N) @ (N x F)
 * so the cost per later head is N * F per image.
 */
#include "neurons.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int layer, L, H, N, W, F, R;
    float eps;
    const int32_t *record;
    float *coef, *aux, *act_cls, *acts;  /* outputs over the whole call */
    float *act;                          /* (Bc, N, F) hidden of layer l, chunk in flight */
    size_t act_cap;                      /* floats */
    float *ln_out;                       /* (Bc, N, W) scratch of the statistics */
    float *mu, *sigma;                   /* (Bc, N) ln_1 statistics of the current layer */
    float *w;                            /* (Bc, H, N) a / sigma */
    size_t tok_cap;                      /* Bc of ln_out / mu / sigma / w */
    float *ones, *zeros;                 /* (W) */
    int failed;                          /* an allocation failed: stop */
    cd_cancel_fn cancel;
    void *cancel_ctx;
} neuron_capture;

/* grow the per-chunk buffers to Bc images; 0 or -1 */
static int ensure_chunk(neuron_capture *c, int Bc) {
    const size_t need_act = (size_t)Bc * c->N * c->F;
    if (need_act > c->act_cap) {
        float *p = (float *)realloc(c->act, need_act * sizeof(float));
        if (!p) return -1;
        c->act = p;
        c->act_cap = need_act;
    }
    if ((size_t)Bc > c->tok_cap) {
        const size_t n = (size_t)Bc * c->N;
        float *a = (float *)realloc(c->ln_out, n * c->W * sizeof(float));
        if (a) c->ln_out = a;
        float *b = (float *)realloc(c->mu, n * sizeof(float));
        if (b) c->mu = b;
        float *s = (float *)realloc(c->sigma, n * sizeof(float));
        if (s) c->sigma = s;
        float *w = (float *)realloc(c->w, n * c->H * sizeof(float));
        if (w) c->w = w;
        if (!a || !b || !s || !w) return -1;
        c->tok_cap = (size_t)Bc;
    }
    return 0;
}

static void capture(void *ctx, cd_capture_point what, int l, int b0, int Bc, const float *data) {
    neuron_capture *c = (neuron_capture *)ctx;
    if (c->failed || l < c->layer) return;
    if (ensure_chunk(c, Bc)) {
        c->failed = 1;
        return;
    }
    const int N = c->N, F = c->F, H = c->H, W = c->W, J = c->L - 1 - c->layer;
    if (what == CD_CAPTURE_MLP_ACT && l == c->layer) {
        memcpy(c->act, data, (size_t)Bc * N * F * sizeof(float));
        for (int b = 0; b < Bc; b++) {
            const float *x = data + (size_t)b * N * F;
            memcpy(c->act_cls + ((size_t)b0 + b) * F, x, (size_t)F * sizeof(float));
            float *dst = c->acts ? c->acts + ((size_t)b0 + b) * N * c->R : NULL;
            for (int t = 0; dst && t < N; t++)
                for (int r = 0; r < c->R; r++)
                    dst[(size_t)t * c->R + r] = x[(size_t)t * F + c->record[r]];
        }
        return;
    }
    if (l == c->layer) return;
    const int jj = l - c->layer - 1;   /* index among the later layers */
    if (what == CD_CAPTURE_RESIDUAL) {
        layernorm_forward(c->ln_out, c->mu, c->sigma, data, c->ones, c->zeros, Bc * N, W, c->eps);
        return;
    }
    if (what != CD_CAPTURE_ATTN_CLS) return;
    /* w[b,h,t] = a[b,h,0,t] / sigma[b,t]; coef[b,jj] = w[b] @ act[b]; aux */
    for (int b = 0; b < Bc; b++)
        for (int h = 0; h < H; h++) {
            const float *a = data + ((size_t)b * H + h) * N;
            const float *sg = c->sigma + (size_t)b * N, *mu = c->mu + (size_t)b * N;
            float *w = c->w + ((size_t)b * H + h) * N;
            double s0 = 0.0, s1 = 0.0;
            for (int t = 0; t < N; t++) {
                w[t] = a[t] / sg[t];
                s0 += (double)w[t];
                s1 += (double)w[t] * mu[t];
            }
            float *ax = c->aux + ((((size_t)b0 + b) * J + jj) * H + h) * 2;
            ax[0] = (float)s0;
            ax[1] = (float)s1;
        }
    for (int b = 0; b < Bc; b++)
        cd_sgemm_nn(H, F, N, 1.0f, c->w + (size_t)b * H * N, N, c->act + (size_t)b * N * F, F,
                    c->coef + (((size_t)b0 + b) * J + jj) * H * F, F, 0);
}

static int capture_cancel(void *ctx) {
    neuron_capture *c = (neuron_capture *)ctx;
    if (c->failed) return 1;
    return c->cancel ? c->cancel(c->cancel_ctx) : 0;
}

/* internal entry point of model.c: cd_encode_image with a chosen scratch budget */
cd_status cd_encode_image_budget(const cd_model *m, const float *images, int B,
                                 const cd_vision_opts *opts, cd_vision_result **out,
                                 cd_error *err, size_t budget);

cd_status cd_neuron_coefs(const cd_model *m, const float *images, int B, int layer,
                          const int32_t *record, int R, int threads, cd_cancel_fn cancel,
                          void *cancel_ctx, float *coef, float *aux, float *act_cls, float *acts,
                          float *embedding, float *ln_stats, cd_error *err) {
    return cd_neuron_coefs_budget(m, images, B, layer, record, R, threads, cancel, cancel_ctx,
                                  coef, aux, act_cls, acts, embedding, ln_stats, err, 0);
}

cd_status cd_neuron_coefs_budget(const cd_model *m, const float *images, int B, int layer,
                                 const int32_t *record, int R, int threads, cd_cancel_fn cancel,
                                 void *cancel_ctx, float *coef, float *aux, float *act_cls,
                                 float *acts, float *embedding, float *ln_stats, cd_error *err,
                                 size_t budget) {
    if (err) err->msg[0] = '\0';
    if (!m) {
        if (err) snprintf(err->msg, sizeof err->msg, "cd_neuron_coefs: NULL model");
        return CD_ERR_VALUE;
    }
    const cd_config *cfg = cd_model_config(m);
    const int L = cfg->layers, F = cfg->mlp_dim, W = cfg->width, D = cfg->embed_dim;
    const int G = cfg->image_size / cfg->patch_size, N = 1 + G * G;
    if (layer < 0 || layer >= L) {
        if (err) snprintf(err->msg, sizeof err->msg, "layer %d is outside [0, %d)", layer, L);
        return CD_ERR_VALUE;
    }
    if (R < 0 || (R > 0 && (!record || !acts))) {
        if (err) snprintf(err->msg, sizeof err->msg, "record: %d neurons without data", R);
        return CD_ERR_VALUE;
    }
    for (int r = 0; r < R; r++)
        if (record[r] < 0 || record[r] >= F) {
            if (err) snprintf(err->msg, sizeof err->msg,
                              "record[%d] = %d is not a neuron of a layer of %d", r,
                              (int)record[r], F);
            return CD_ERR_VALUE;
        }
    neuron_capture c;
    memset(&c, 0, sizeof c);
    c.layer = layer; c.L = L; c.H = cfg->heads; c.N = N; c.W = W; c.F = F; c.R = R;
    c.eps = cfg->ln_eps;
    c.record = record;
    c.coef = coef; c.aux = aux; c.act_cls = act_cls; c.acts = R > 0 ? acts : NULL;
    c.cancel = cancel; c.cancel_ctx = cancel_ctx;
    c.ones = (float *)malloc((size_t)W * sizeof(float));
    c.zeros = (float *)calloc((size_t)W, sizeof(float));
    if (!c.ones || !c.zeros) {
        free(c.ones);
        free(c.zeros);
        if (err) snprintf(err->msg, sizeof err->msg, "out of memory");
        return CD_ERR_NOMEM;
    }
    for (int i = 0; i < W; i++) c.ones[i] = 1.0f;

    cd_vision_opts o;
    memset(&o, 0, sizeof o);
    o.threads = threads;
    o.cancel = capture_cancel;
    o.cancel_ctx = &c;
    o.capture = capture;
    o.capture_ctx = &c;
    cd_vision_result *r = NULL;
    cd_status st = budget ? cd_encode_image_budget(m, images, B, &o, &r, err, budget)
                          : cd_encode_image(m, images, B, &o, &r, err);
    if (st == CD_OK) {
        memcpy(embedding, r->embedding, (size_t)B * D * sizeof(float));
        memcpy(ln_stats, r->ln_stats, (size_t)B * 3 * sizeof(float));
    } else if (c.failed) {
        st = CD_ERR_NOMEM;
        if (err) snprintf(err->msg, sizeof err->msg,
                          "out of memory for the layer-%d activations of a chunk", layer);
    }
    cd_vision_result_free(r);
    free(c.act); free(c.ln_out); free(c.mu); free(c.sigma); free(c.w);
    free(c.ones); free(c.zeros);
    return st;
}

void cd_neuron_fold_apply(float *out, const float *coef, const float *fold, const float *scale,
                          const float *shift, int B, int K, int F, int D) {
    #pragma omp parallel for schedule(static) if ((size_t)B * F * K * D > 65536)
    for (int n = 0; n < F; n++) {
        const float *fn = fold + (size_t)n * K * D;
        for (int b = 0; b < B; b++) {
            float *o = out + ((size_t)b * F + n) * D;
            const float *cb = coef + (size_t)b * K * F + n;
            const float s = scale[b];
            const float *sh = shift + (size_t)b * D;
            for (int i = 0; i < D; i++) o[i] = 0.0f;
            for (int k = 0; k < K; k++) {
                const float ck = cb[(size_t)k * F];
                const float *fk = fn + (size_t)k * D;
                for (int i = 0; i < D; i++) o[i] += ck * fk[i];
            }
            for (int i = 0; i < D; i++) o[i] = o[i] * s + sh[i];
        }
    }
}

void cd_neuron_fold_apply_naive(float *out, const float *coef, const float *fold,
                                const float *scale, const float *shift, int B, int K, int F,
                                int D) {
    for (int b = 0; b < B; b++)
        for (int n = 0; n < F; n++)
            for (int i = 0; i < D; i++) {
                double acc = 0.0;
                for (int k = 0; k < K; k++)
                    acc += (double)coef[((size_t)b * K + k) * F + n] *
                           fold[((size_t)n * K + k) * D + i];
                out[((size_t)b * F + n) * D + i] =
                    (float)(acc * scale[b] + shift[(size_t)b * D + i]);
            }
}
