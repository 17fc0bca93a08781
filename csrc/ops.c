/* ops.c -- the operations of the CLIP towers (see ops.h for shapes). */
#include "ops.h"

#include <math.h>
#include <string.h>

#include "gemm.h"

#ifdef _OPENMP
#include <omp.h>
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int thread_id(void) { return 0; }
#endif

/* parallelise element-wise loops only when there is enough work */
#define PAR_MIN_ELEMS 32768

void patches_forward(float *out, const float *images, int B, int S, int P) {
    const int G = S / P;
    const size_t plane = (size_t)S * S;
    const size_t row_len = (size_t)3 * P * P;
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * G * G * row_len > PAR_MIN_ELEMS)
    for (int b = 0; b < B; b++) {
        for (int gy = 0; gy < G; gy++) {
            for (int gx = 0; gx < G; gx++) {
                float *o = out + (((size_t)b * G + gy) * G + gx) * row_len;
                for (int c = 0; c < 3; c++) {
                    const float *img = images + ((size_t)b * 3 + c) * plane;
                    for (int py = 0; py < P; py++) {
                        const float *src = img + (size_t)(gy * P + py) * S + (size_t)gx * P;
                        memcpy(o, src, (size_t)P * sizeof(float));
                        o += P;
                    }
                }
            }
        }
    }
}

void vision_embed_forward(float *x, const float *patch_emb, const float *cls, const float *pos,
                          int B, int N, int W) {
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * N * W > PAR_MIN_ELEMS)
    for (int b = 0; b < B; b++) {
        for (int n = 0; n < N; n++) {
            float *o = x + ((size_t)b * N + n) * W;
            const float *p = pos + (size_t)n * W;
            const float *s = n == 0 ? cls : patch_emb + ((size_t)b * (N - 1) + (n - 1)) * W;
            for (int w = 0; w < W; w++) o[w] = s[w] + p[w];
        }
    }
}

void text_embed_forward(float *x, const int32_t *ids, const float *tok_emb, const float *pos,
                        int T, int C, int W) {
    #pragma omp parallel for collapse(2) schedule(static) if ((size_t)T * C * W > PAR_MIN_ELEMS)
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < C; c++) {
            float *o = x + ((size_t)t * C + c) * W;
            const float *e = tok_emb + (size_t)ids[(size_t)t * C + c] * W;
            const float *p = pos + (size_t)c * W;
            for (int w = 0; w < W; w++) o[w] = e[w] + p[w];
        }
    }
}

void layernorm_forward(float *out, float *mean, float *sigma, const float *inp,
                       const float *weight, const float *bias, int R, int W, float eps) {
    #pragma omp parallel for schedule(static) if ((size_t)R * W > PAR_MIN_ELEMS)
    for (int r = 0; r < R; r++) {
        const float *x = inp + (size_t)r * W;
        float *o = out + (size_t)r * W;
        double m = 0.0;
        for (int w = 0; w < W; w++) m += x[w];
        m /= W;
        double v = 0.0;
        for (int w = 0; w < W; w++) {
            double dv = (double)x[w] - m;
            v += dv * dv;
        }
        v /= W;
        double s = sqrt(v + (double)eps);
        float mf = (float)m, rs = (float)(1.0 / s);
        for (int w = 0; w < W; w++) o[w] = (x[w] - mf) * rs * weight[w] + bias[w];
        if (mean) mean[r] = mf;
        if (sigma) sigma[r] = (float)s;
    }
}

void gelu_forward(float *x, size_t n) {
    const float inv_sqrt2 = 0.70710678118654752440f;
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + erff(v * inv_sqrt2));
    }
}

void quick_gelu_forward(float *x, size_t n) {
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = v / (1.0f + expf(-1.702f * v));
    }
}

void residual_forward(float *x, const float *y, size_t n) {
    #pragma omp parallel for schedule(static) if (n > PAR_MIN_ELEMS)
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

void softmax_forward(float *row, int valid, int n) {
    float mx = -INFINITY;
    for (int j = 0; j < valid; j++) mx = row[j] > mx ? row[j] : mx;
    double sum = 0.0;
    for (int j = 0; j < valid; j++) {
        float e = expf(row[j] - mx);
        row[j] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int j = 0; j < valid; j++) row[j] *= inv;
    for (int j = valid; j < n; j++) row[j] = 0.0f;
}

/* One head of one sequence, query rows [r0, r1).
 *   q, k, v  (N, d) at row stride ld: this head's slices
 *   out      (N, d) at row stride ldo
 *   P        (r1 - r0, N) scratch: the softmax rows on return
 * Under a causal mask the keys past r1 - 1 are never visible to this block, so neither the
 * scores nor the weighted sum touch them. */
static void attention_rows(float *out, int ldo, float *P, const float *q, const float *k,
                           const float *v, int ld, int N, int d, int r0, int r1, int causal,
                           float scale) {
    const int R = r1 - r0;
    const int ncols = causal ? r1 : N;
    cd_sgemm_nt(R, ncols, d, scale, q + (size_t)r0 * ld, ld, k, ld, P, N, 0);
    for (int i = 0; i < R; i++)
        softmax_forward(P + (size_t)i * N, causal ? r0 + i + 1 : N, N);
    cd_sgemm_nn(R, d, ncols, 1.0f, P, N, v, ld, out + (size_t)r0 * ldo, ldo, 0);
}

#define ATT_ROW_BLOCK 32

void attention_forward(float *out, float *att_cls, size_t cls_bstride, float *att_mean,
                       size_t mean_bstride, const float *qkv, int B, int N, int W, int H,
                       int causal, float *scratch, int n_scratch) {
    const int d = W / H;
    const int ld = 3 * W;
    const float scale = 1.0f / sqrtf((float)d);
    if (n_scratch < 1) n_scratch = 1;
    if (!att_mean) {
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(n_scratch)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                float *P = scratch + (size_t)thread_id() * N * N;
                const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                attention_rows(out + (size_t)b * N * W + (size_t)h * d, W, P, base, base + W,
                               base + 2 * W, ld, N, d, 0, N, causal, scale);
                if (att_cls)
                    memcpy(att_cls + b * cls_bstride + (size_t)h * N, P, (size_t)N * sizeof(float));
            }
        }
        return;
    }
    /* with the head-averaged map: each task owns a block of query rows of one sequence and
     * runs every head on it, so the average is accumulated without races */
    const int nblk = (N + ATT_ROW_BLOCK - 1) / ATT_ROW_BLOCK;
    const float inv_h = 1.0f / (float)H;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(n_scratch)
    for (int b = 0; b < B; b++) {
        for (int blk = 0; blk < nblk; blk++) {
            const int r0 = blk * ATT_ROW_BLOCK;
            const int r1 = r0 + ATT_ROW_BLOCK < N ? r0 + ATT_ROW_BLOCK : N;
            float *P = scratch + (size_t)thread_id() * N * N;
            float *mean = att_mean + b * mean_bstride + (size_t)r0 * N;
            const size_t cnt = (size_t)(r1 - r0) * N;
            memset(mean, 0, cnt * sizeof(float));
            for (int h = 0; h < H; h++) {
                const float *base = qkv + (size_t)b * N * ld + (size_t)h * d;
                attention_rows(out + (size_t)b * N * W + (size_t)h * d, W, P, base, base + W,
                               base + 2 * W, ld, N, d, r0, r1, causal, scale);
                for (size_t i = 0; i < cnt; i++) mean[i] += P[i];
                if (att_cls && r0 == 0)
                    memcpy(att_cls + b * cls_bstride + (size_t)h * N, P, (size_t)N * sizeof(float));
            }
            for (size_t i = 0; i < cnt; i++) mean[i] *= inv_h;
        }
    }
}

void decomp_ln_rows(float *rows, size_t R, int W, float mu, float sigma, const float *gamma,
                    const float *beta, float k_inv) {
    const float muk = mu * k_inv;
    #pragma omp parallel for schedule(static) if (R * (size_t)W > PAR_MIN_ELEMS)
    for (size_t r = 0; r < R; r++) {
        float *x = rows + r * W;
        for (int w = 0; w < W; w++) x[w] = gamma[w] * (x[w] - muk) / sigma + beta[w] * k_inv;
    }
}

void scale_shift_rows(float *rows, size_t R, int C, size_t ld, float s, const float *shift) {
    #pragma omp parallel for schedule(static) if (R * (size_t)C > PAR_MIN_ELEMS)
    for (size_t r = 0; r < R; r++) {
        float *x = rows + r * ld;
        for (int c = 0; c < C; c++) x[c] = x[c] * s + shift[c];
    }
}
