/* model.c -- the forward passes of a loaded model (load.c builds it): the image forward with its
 * decomposition (CLIP, and SigLIP with its attention-pooling head), and the text forward.
 *
 * Shapes: B images, N = 1 + G*G tokens, W width, L layers, H heads, d = W / H, F MLP width,
 * D embedding dim, T probe directions (or texts), C context length, V vocabulary,
 * K = 2L + 1 layer-level terms of the decomposition.
 *
 * The image forward (rows = B*N for every linear layer):
 *   x = [cls ; patches @ conv^T] + pos; x = ln_pre(x)
 *   per layer: x += out_proj(MHA(ln_1(x))); x += c_proj(act(c_fc(ln_2(x))))
 *   emb = ln_post(x[0]) @ proj
 * The decomposition keeps, at the class token of each layer, the per-head terms
 *   c[l,h] = W_O[:, h-slice] @ z[l,h] + b_O / H,   z[l,h] = sum_i a[l,h,0,i] v[l,h,i]
 * (z is row 0 of the attention output of head h), the MLP output and ln_pre's output, and maps
 * each raw term t through the final LayerNorm and projection with the reference convention
 *   (gamma * (t - mu / K_t) / sigma + beta / K_t) @ proj / ||emb||
 * (decomposition.md). The map is affine, so the out-projection, gamma and proj are folded:
 * F[l,h] = (W_O[:, h-slice]^T * gamma) @ proj (d x D) is computed once per model, and with the
 * layer's constant c[l] = (gamma * (b_O - mu / K) / sigma + beta / K) @ proj
 *   head h:            z[l,h] @ F[l,h] / (sigma ||emb||) + c[l] / (H ||emb||)
 *   token i of head h: a[l,h,0,i] v[l,h,i] @ F[l,h] / (sigma ||emb||) + c[l] / (N H ||emb||)
 * so that no term is mapped through a W x W out-projection and then a W x D projection, and
 * the per-token terms never need an N x N x H x W intermediate.
 */
#define _POSIX_C_SOURCE 200809L
#include "model_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* the fold F[l] (W, D) = W_O[l]^T diag(gamma) proj (rows h*d .. h*d + d belong to head h)     */

static cd_status compute_fold(cd_model *m, cd_error *err) {
    const cd_config *c = &m->cfg;
    const int W = c->width, D = c->embed_dim, L = c->layers;
    size_t fold_n, ww;
    if (mul3(&fold_n, (size_t)L, (size_t)W, (size_t)D) || mul_sz(&ww, (size_t)W, (size_t)W) ||
        fold_n > SIZE_MAX / sizeof(float) || ww > SIZE_MAX / sizeof(float)) {
        set_err(err, "the per-token fold of %d x %d x %d floats is too large", L, W, D);
        return CD_ERR_NOMEM;
    }
    float *fold = (float *)malloc(fold_n * sizeof(float));
    float *tmp = (float *)malloc(ww * sizeof(float));  /* (W_in, W_out) = W_O^T * gamma */
    float *wo = (float *)malloc(ww * sizeof(float));   /* (W_out, W_in) W_O unpacked */
    if (!fold || !tmp || !wo) {
        free(fold);
        free(tmp);
        free(wo);
        set_err(err, "out of memory for the per-token fold (%zu floats)", fold_n);
        return CD_ERR_NOMEM;
    }
    const float *gamma = m->w.ln_post_w;
    for (int l = 0; l < L; l++) {
        cd_gemm_unpack(&m->w.blocks[l].out, wo);
        #pragma omp parallel for schedule(static)
        for (int j = 0; j < W; j++)
            for (int o = 0; o < W; o++) tmp[(size_t)j * W + o] = wo[(size_t)o * W + j] * gamma[o];
        cd_matmul(fold + (size_t)l * W * D, tmp, &m->w.proj, NULL, W, 0);
    }
    free(tmp);
    free(wo);
    m->fold = fold;
    return CD_OK;
}

/* whether a CLIP image call maps terms through the fold: every decomposition does */
static int needs_fold(const cd_vision_opts *o) {
    return o->heads || o->cls_to_cls || o->tokens || o->probe;
}

static cd_status ensure_fold(const cd_model *cm, cd_error *err) {
    /* the model is allocated non-const by cd_model_load: the lazily built fold is the one
     * field written after load, under the lock, published through fold_ready */
    cd_model *m = (cd_model *)cm;
    if (atomic_load_explicit(&m->fold_ready, memory_order_acquire)) return CD_OK;
    cd_status st = CD_OK;
    pthread_mutex_lock(&m->fold_lock);
    if (!atomic_load_explicit(&m->fold_ready, memory_order_relaxed)) {
        st = compute_fold(m, err);
        if (!st) atomic_store_explicit(&m->fold_ready, 1, memory_order_release);
    }
    pthread_mutex_unlock(&m->fold_lock);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* indexers: the offset of the first element of a row of a row-major array, the shape in the  */
/* name (the last dimension is the row)                                                        */

/* (B, L, D) at [b, l, :] */
static inline size_t idx_bld(size_t b, size_t l, size_t L, size_t D) { return (b * L + l) * D; }

/* (B, L, H, D) at [b, l, h, :] */
static inline size_t idx_blhd(size_t b, size_t l, size_t h, size_t L, size_t H, size_t D) {
    return ((b * L + l) * H + h) * D;
}

/* (B, L, N, H, D) at [b, l, n, h, :] */
static inline size_t idx_blnhd(size_t b, size_t l, size_t n, size_t h, size_t L, size_t N,
                               size_t H, size_t D) {
    return (((b * L + l) * N + n) * H + h) * D;
}

/* ------------------------------------------------------------------------------------------ */
/* one transformer block: the image and text towers of CLIP and of SigLIP                      */

/* Scratch of a block over R = Bn * N rows. */
typedef struct {
    float *ln;     /* (R, W) LayerNorm output */
    float *qkv;    /* (R, 3W) [q | k | v] of ln_1(x) */
    float *att;    /* (R, W) the heads' outputs, concatenated, before the out-projection */
    float *fc;     /* (R, F) the MLP hidden after the activation */
    float *mlp;    /* (R, W) the MLP output */
    float *tiles;  /* (n_tiles, min(N, CD_ATT_ROW_BLOCK), N) attention score tiles */
    int n_tiles;   /* threads the attention may use: one tile each */
} block_scratch;

/* What the attention records besides its output (see attention_forward); NULL: nothing. */
typedef struct {
    float *cls;  size_t cls_bstride;   /* (Bn, H, N) at this batch stride: query 0's softmax */
    float *mean; size_t mean_bstride;  /* (Bn, N, N) at this batch stride: averaged over heads */
} block_attn_record;

/* x (Bn, N, W) in place, pre-norm:
 *   x += out_proj(MHA(ln_1(x)))     causal != 0: query i sees keys j <= i only
 *   x += proj(act(fc(ln_2(x))))
 * On return s->qkv, s->att, s->fc and s->mlp still hold this block's values: the decompositions
 * and the capture points read them there. */
static void block_forward(float *x, const cd_block *blk, const block_scratch *s,
                          const block_attn_record *rec, int causal, int Bn, int N, int W, int H,
                          int F, int act, float eps) {
    const int R = Bn * N;
    layernorm_forward(s->ln, NULL, NULL, x, blk->ln1_w, blk->ln1_b, R, W, eps);
    cd_matmul(s->qkv, s->ln, &blk->qkv, blk->qkv_b, R, 0);
    /* a tower in bf16 rounds q, k, v and the probabilities too (on AMX tiles where it can) */
    if (blk->qkv.precision != CD_GEMM_FP32)
        attention_forward_bf16(s->att, rec ? rec->cls : NULL, rec ? rec->cls_bstride : 0,
                               rec ? rec->mean : NULL, rec ? rec->mean_bstride : 0, s->qkv, Bn,
                               N, W, H, causal, s->tiles, s->n_tiles);
    else
        attention_forward(s->att, rec ? rec->cls : NULL, rec ? rec->cls_bstride : 0,
                          rec ? rec->mean : NULL, rec ? rec->mean_bstride : 0, s->qkv, Bn, N,
                          W, H, causal, s->tiles, s->n_tiles);
    cd_matmul(x, s->att, &blk->out, blk->out_b, R, 1);
    layernorm_forward(s->ln, NULL, NULL, x, blk->ln2_w, blk->ln2_b, R, W, eps);
    cd_matmul(s->fc, s->ln, &blk->fc, blk->fc_b, R, 0);
    act_forward(s->fc, (size_t)R * F, act);
    cd_matmul(s->mlp, s->fc, &blk->proj, blk->proj_b, R, 0);
    residual_forward(x, s->mlp, (size_t)R * W);
}

/* ------------------------------------------------------------------------------------------ */
/* scratch plans: every array of a call's scratch as (per) x a x b floats                       */

typedef enum {
    PER_IMAGE,   /* one per image of a chunk */
    PER_THREAD,  /* one per OpenMP thread of the call */
    PER_WORKER,  /* one per thread of the per-image loops: min(threads, images of a chunk) */
    PER_CALL     /* one */
} scratch_scale;

typedef struct { float **dst; scratch_scale per; size_t a, b; int on; } scratch_spec;
#define MAX_SCRATCH_SPECS 32  /* arrays of one call's scratch, at most */

static size_t scale_count(scratch_scale per, size_t Bc, size_t nthreads) {
    switch (per) {
    case PER_IMAGE: return Bc;
    case PER_THREAD: return nthreads;
    case PER_WORKER: return Bc < nthreads ? Bc : nthreads;
    default: return 1;
    }
}

/* plan items of the specs that are on, for chunks of Bc images (-1: a size overflows) */
static int scratch_items(const scratch_spec *s, int k, size_t Bc, size_t nthreads,
                         plan_item *it) {
    int n = 0;
    for (int i = 0; i < k; i++) {
        if (!s[i].on) continue;
        if (mul3(&it[n].n, scale_count(s[i].per, Bc, nthreads), s[i].a, s[i].b)) return -1;
        it[n++].dst = s[i].dst;
    }
    return n;
}

/* bytes of the specs that are on: per image of a chunk, and the rest for a chunk of Bc images
 * (each array padded to CD_ALIGN as plan_alloc does); -1 on overflow */
static int scratch_bytes(const scratch_spec *s, int k, size_t Bc, size_t nthreads,
                         size_t *per_image, size_t *fixed) {
    size_t pi = 0, fx = 0;
    for (int i = 0; i < k; i++) {
        if (!s[i].on) continue;
        size_t n, bytes;
        if (mul3(&n, s[i].per == PER_IMAGE ? 1 : scale_count(s[i].per, Bc, nthreads), s[i].a,
                 s[i].b) || mul_sz(&bytes, n, sizeof(float)) || bytes > SIZE_MAX / 4)
            return -1;
        bytes = (bytes + CD_ALIGN - 1) / CD_ALIGN * CD_ALIGN;
        if (s[i].per == PER_IMAGE) pi += bytes;
        else fx += bytes;
        if (pi > SIZE_MAX / 4 || fx > SIZE_MAX / 4) return -1;
    }
    *per_image = pi;
    *fixed = fx;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the CLIP image forward and its decomposition                                                */

/* Scratch of one call: chunks of Bc images. */
typedef struct {
    int Bc;
    int nthreads;
    float *x;          /* (Bc*N, W) residual stream */
    block_scratch blk; /* the blocks' activations; att also the patch embeddings (Bc*G*G, W),
                        * fc (Bc, max(N*F, 3*S*S)) first the patches (Bc*G*G, 3*P*P) */
    float *a0;         /* (Bc, H, N) class-token attention of the current layer */
    float *rows;       /* (Bc, W) gathered class rows */
    float *rows2;      /* (Bc, W) */
    float *stats;      /* (Bc, 3) mu, sigma, ||emb|| */
    float *z;          /* (Bc, L, W) the heads' outputs at the class token, concatenated */
    float *mlps_raw;   /* (Bc, L+1, W) */
    float *t0;         /* (Bc, L, W) the class token's own share of z: [a[l,h,0,0] v[l,h,0]]_h */
    float *const_rows; /* (Bc, L, W) the layers' constants c[l], before the projection */
    float *tconst;     /* (Bc, L, D) ... after it, over ||emb|| */
    float *pconst;     /* (Bc, L, T) ... probed, over N H */
    float *av;         /* (nthreads, N, d) attention-weighted values of one head */
    float *probe_fold; /* (L, W, T) = F[l] @ probe^T */
} vision_scratch;

/* the scratch of a CLIP image call (returns the number of specs) */
static int vision_scratch_specs(vision_scratch *s, scratch_spec *sp, const cd_config *c,
                                const cd_vision_opts *o) {
    const size_t W = (size_t)c->width, H = (size_t)c->heads, L = (size_t)c->layers;
    const size_t F = (size_t)c->mlp_dim, D = (size_t)c->embed_dim, T = (size_t)o->n_probe;
    const size_t S = (size_t)c->image_size, G = S / (size_t)c->patch_size, N = 1 + G * G;
    const size_t d = W / H, rows = N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK;
    const size_t fcw = F * N > 3 * S * S ? F * N : 3 * S * S;  /* MLP hidden, or the patches */
    const int folded = needs_fold(o);
    const int probe = o->probe != NULL;
    const scratch_spec spec[] = {
        {&s->x, PER_IMAGE, N, W, 1},          {&s->blk.ln, PER_IMAGE, N, W, 1},
        {&s->blk.qkv, PER_IMAGE, N, 3 * W, 1}, {&s->blk.att, PER_IMAGE, N, W, 1},
        {&s->blk.fc, PER_IMAGE, fcw, 1, 1},   {&s->blk.mlp, PER_IMAGE, N, W, 1},
        {&s->a0, PER_IMAGE, H, N, 1},         {&s->rows, PER_IMAGE, W, 1, 1},
        {&s->rows2, PER_IMAGE, W, 1, 1},      {&s->stats, PER_IMAGE, 3, 1, 1},
        {&s->z, PER_IMAGE, L, W, o->heads},
        {&s->mlps_raw, PER_IMAGE, L + 1, W, o->mlps},
        {&s->t0, PER_IMAGE, L, W, o->cls_to_cls},
        {&s->const_rows, PER_IMAGE, L, W, folded}, {&s->tconst, PER_IMAGE, L, D, folded},
        {&s->pconst, PER_IMAGE, L, T, probe},
        {&s->blk.tiles, PER_THREAD, rows, N, 1}, {&s->av, PER_THREAD, N, d, 1},
        {&s->probe_fold, PER_CALL, L * W, T, probe},
    };
    _Static_assert(sizeof spec / sizeof spec[0] <= MAX_SCRATCH_SPECS, "too many arrays");
    memcpy(sp, spec, sizeof spec);
    return (int)(sizeof spec / sizeof spec[0]);
}

typedef struct {
    const cd_model *m;
    const cd_vision_opts *o;
    const cd_vision_result *r;
    vision_scratch *s;
    int b0;            /* first image of the chunk in the batch */
} vision_ctx;

/* the decomposition's work while layer l's attention probabilities and values are in hand */
static void decompose_layer(vision_ctx *vc, int l) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_vision_opts *o = vc->o;
    vision_scratch *s = vc->s;
    const int Bc = s->Bc, W = c->width, H = c->heads, d = W / H, L = c->layers;
    const int G = c->image_size / c->patch_size, N = 1 + G * G, D = c->embed_dim;
    const int T = o->n_probe;
    const size_t ldq = (size_t)3 * W;
    const float *qkv = s->blk.qkv, *att = s->blk.att;

    if (o->heads)  /* z[b,l] = the class token's row of the attention output */
        for (int b = 0; b < Bc; b++)
            memcpy(s->z + idx_bld(b, l, L, W), att + idx_bld(b, 0, N, W),
                   (size_t)W * sizeof(float));
    if (o->cls_to_cls)  /* t0[b,l] = [a[h,0,0] v[h,0]]_h, the class token's own share of z */
        for (int b = 0; b < Bc; b++) {
            const float *v0 = qkv + idx_bld(b, 0, N, ldq) + 2 * (size_t)W;
            float *t = s->t0 + idx_bld(b, l, L, W);
            for (int h = 0; h < H; h++) {
                float a = s->a0[idx_bld(b, h, H, N)];
                for (int j = 0; j < d; j++) t[h * d + j] = a * v0[h * d + j];
            }
        }
    if (o->tokens || o->probe) {
        /* per (image, head): av[i] = a[h,0,i] v[h,i]; raw token terms av @ F[l,h] (and the
         * probe's av @ F[l,h] @ probe^T); scaled and shifted once sigma and ||emb|| are known */
        const float *fold = m->fold;
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(s->nthreads)
        for (int b = 0; b < Bc; b++) {
            for (int h = 0; h < H; h++) {
#ifdef _OPENMP
                float *av = s->av + (size_t)omp_get_thread_num() * N * d;
#else
                float *av = s->av;
#endif
                const float *a = s->a0 + idx_bld(b, h, H, N);
                const float *v = qkv + idx_bld(b, 0, N, ldq) + 2 * (size_t)W + (size_t)h * d;
                for (int i = 0; i < N; i++)
                    for (int j = 0; j < d; j++) av[(size_t)i * d + j] = a[i] * v[i * ldq + j];
                const size_t img = (size_t)vc->b0 + b;
                if (o->tokens)
                    cd_sgemm_nn(N, D, d, 1.0f, av, d, fold + idx_blhd(l, h, 0, H, d, D), D,
                                vc->r->tokens + idx_blnhd(img, l, 0, h, L, N, H, D), H * D, 0);
                if (o->probe)
                    cd_sgemm_nn(N, T, d, 1.0f, av, d,
                                s->probe_fold + idx_blhd(l, h, 0, H, d, T), T,
                                vc->r->probe_out + idx_blnhd(img, l, 0, h, L, N, H, T), H * T, 0);
            }
        }
    }
    if (o->attn)
        for (int b = 0; b < Bc; b++)
            memcpy(vc->r->attn_cls + idx_blhd((size_t)vc->b0 + b, l, 0, L, H, N),
                   s->a0 + idx_bld(b, 0, H, N), (size_t)H * N * sizeof(float));
}

/* rows (R, C) at stride ld: x *= s, 0 <= i < R */
static void scale_rows(float *x, size_t R, int C, size_t ld, float s) {
    for (size_t i = 0; i < R; i++)
        for (int j = 0; j < C; j++) x[i * ld + j] *= s;
}

/* 1 / x, or 0 for x <= 0 (a zero embedding or a constant row: its terms are 0) */
static float inv_or_zero(float x) { return x > 0.0f ? 1.0f / x : 0.0f; }

/* image b's 1 / ||emb|| and 1 / (sigma ||emb||) from stats (Bc, 3) = (mu, sigma, ||emb||) */
static float emb_inv_norm(const float *stats, int b) {
    return inv_or_zero(stats[3 * (size_t)b + 2]);
}
static float emb_inv_den(const float *stats, int b) {
    return inv_or_zero(stats[3 * (size_t)b + 1] * stats[3 * (size_t)b + 2]);
}

/* map the terms of the chunk through ln_post and proj, reference convention: the MLPs' rows
 * through both, the attention's through the fold F and the layers' constants c[l] */
static void decompose_final(vision_ctx *vc) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_vision_opts *o = vc->o;
    vision_scratch *s = vc->s;
    const cd_vision_result *r = vc->r;
    const int Bc = s->Bc, W = c->width, H = c->heads, d = W / H, L = c->layers;
    const int D = c->embed_dim, G = c->image_size / c->patch_size, N = 1 + G * G;
    const int T = o->n_probe;
    const float k_inv = 1.0f / (float)(2 * L + 1);
    const float *gamma = m->w.ln_post_w, *beta = m->w.ln_post_b, *fold = m->fold;
    const size_t b0 = (size_t)vc->b0;

    if (o->mlps) {
        const int R = L + 1;
        for (int b = 0; b < Bc; b++) {
            const float *st = s->stats + 3 * (size_t)b;
            decomp_ln_rows(s->mlps_raw + idx_bld(b, 0, R, W), (size_t)R, W, st[0], st[1], gamma,
                           beta, k_inv);
        }
        float *dst = r->mlps + idx_bld(b0, 0, R, D);
        cd_matmul(dst, s->mlps_raw, &m->w.proj, NULL, Bc * R, 0);
        for (int b = 0; b < Bc; b++)
            scale_rows(dst + idx_bld(b, 0, R, D), (size_t)R, D, D, emb_inv_norm(s->stats, b));
    }
    if (!o->heads && !o->cls_to_cls && !o->tokens && !o->probe) return;

    /* tconst[b, l] = c[l] / ||emb||, c[l] = (gamma (b_O - mu / K) / sigma + beta / K) @ proj */
    for (int b = 0; b < Bc; b++) {
        const float *st = s->stats + 3 * (size_t)b;
        for (int l = 0; l < L; l++)
            memcpy(s->const_rows + idx_bld(b, l, L, W), m->w.blocks[l].out_b,
                   (size_t)W * sizeof(float));
        decomp_ln_rows(s->const_rows + idx_bld(b, 0, L, W), (size_t)L, W, st[0], st[1], gamma,
                       beta, k_inv);
    }
    cd_matmul(s->tconst, s->const_rows, &m->w.proj, NULL, Bc * L, 0);
    for (int b = 0; b < Bc; b++)
        scale_rows(s->tconst + idx_bld(b, 0, L, D), (size_t)L, D, D, emb_inv_norm(s->stats, b));

    if (o->heads) {
        /* heads[b,l,h] = tconst[b,l] / H + (z[b,l,h] / (sigma ||emb||)) @ F[l,h] */
        for (int b = 0; b < Bc; b++) {
            scale_rows(s->z + idx_bld(b, 0, L, W), (size_t)L, W, W, emb_inv_den(s->stats, b));
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++)
                    for (int j = 0; j < D; j++)
                        r->heads[idx_blhd(b0 + b, l, h, L, H, D) + j] =
                            s->tconst[idx_bld(b, l, L, D) + j] / (float)H;
        }
        #pragma omp parallel for collapse(2) schedule(static) num_threads(s->nthreads)
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                cd_sgemm_nn(Bc, D, d, 1.0f, s->z + idx_bld(0, l, L, W) + (size_t)h * d, L * W,
                            fold + idx_blhd(l, h, 0, H, d, D), D,
                            r->heads + idx_blhd(b0, l, h, L, H, D), L * H * D, 1);
    }
    if (o->cls_to_cls) {
        /* cls_to_cls[b,l] = tconst[b,l] / N + (t0[b,l] / (sigma ||emb||)) @ F[l] */
        for (int b = 0; b < Bc; b++) {
            scale_rows(s->t0 + idx_bld(b, 0, L, W), (size_t)L, W, W, emb_inv_den(s->stats, b));
            for (int l = 0; l < L; l++)
                for (int j = 0; j < D; j++)
                    r->cls_to_cls[idx_bld(b0 + b, l, L, D) + j] =
                        s->tconst[idx_bld(b, l, L, D) + j] / (float)N;
        }
        #pragma omp parallel for schedule(static) num_threads(s->nthreads)
        for (int l = 0; l < L; l++)
            cd_sgemm_nn(Bc, D, W, 1.0f, s->t0 + idx_bld(0, l, L, W), L * W,
                        fold + idx_bld(l, 0, W, D), D, r->cls_to_cls + idx_bld(b0, l, L, D),
                        L * D, 1);
    }
    if (!o->tokens && !o->probe) return;

    /* tokens[b,l,i,h] = tconst[b,l] / (N H) + raw / (sigma ||emb||) (raw: decompose_layer) */
    scale_rows(s->tconst, (size_t)Bc * L, D, D, 1.0f / ((float)N * H));
    if (o->probe)
        cd_sgemm_nt(Bc * L, T, D, 1.0f, s->tconst, D, o->probe, D, s->pconst, T, 0);
    for (int b = 0; b < Bc; b++) {
        const float scale = emb_inv_den(s->stats, b);
        for (int l = 0; l < L; l++) {
            if (o->tokens)
                scale_shift_rows(r->tokens + idx_blnhd(b0 + b, l, 0, 0, L, N, H, D),
                                 (size_t)N * H, D, D, scale, s->tconst + idx_bld(b, l, L, D));
            if (o->probe)
                scale_shift_rows(r->probe_out + idx_blnhd(b0 + b, l, 0, 0, L, N, H, T),
                                 (size_t)N * H, T, T, scale, s->pconst + idx_bld(b, l, L, T));
        }
    }
}

/* images (Bc, 3, S, S) of the chunk starting at vc->b0 */
static cd_status vision_forward_chunk(vision_ctx *vc, const float *images) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_weights *w = &m->w;
    const cd_vision_opts *o = vc->o;
    const cd_vision_result *r = vc->r;
    vision_scratch *s = vc->s;
    const int Bc = s->Bc, W = c->width, H = c->heads, L = c->layers, F = c->mlp_dim;
    const int S = c->image_size, P = c->patch_size, G = S / P, N = 1 + G * G, D = c->embed_dim;
    const int R = Bc * N;
    const size_t b0 = (size_t)vc->b0;

    /* embeddings: x = [cls ; patches @ conv^T] + pos, then ln_pre */
    patches_forward(s->blk.fc, images, Bc, S, P);
    cd_matmul(s->blk.att, s->blk.fc, &w->conv, NULL, Bc * G * G, 0);
    vision_embed_forward(s->x, s->blk.att, w->class_emb, w->pos, Bc, N, W);
    layernorm_forward(s->x, NULL, NULL, s->x, w->ln_pre_w, w->ln_pre_b, R, W, c->ln_eps);
    if (o->mlps)
        for (int b = 0; b < Bc; b++)
            memcpy(s->mlps_raw + idx_bld(b, 0, L + 1, W), s->x + idx_bld(b, 0, N, W),
                   (size_t)W * sizeof(float));

    for (int l = 0; l < L; l++) {
        if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_RESIDUAL, l, vc->b0, Bc, s->x);
        const block_attn_record rec = {
            s->a0, (size_t)H * N,
            o->attn ? r->attn_mean + idx_bld(b0, l, L, (size_t)N * N) : NULL, (size_t)L * N * N};
        block_forward(s->x, &w->blocks[l], &s->blk, &rec, 0, Bc, N, W, H, F, c->act, c->ln_eps);
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_ATTN_CLS, l, vc->b0, Bc, s->a0);
        decompose_layer(vc, l);
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_MLP_ACT, l, vc->b0, Bc, s->blk.fc);
        if (o->mlps)  /* the MLP's output at the class token */
            for (int b = 0; b < Bc; b++)
                memcpy(s->mlps_raw + idx_bld(b, l + 1, L + 1, W), s->blk.mlp + idx_bld(b, 0, N, W),
                       (size_t)W * sizeof(float));
    }

    /* emb = ln_post(x[0]) @ proj; ln_stats = (mu, sigma, ||emb||) */
    for (int b = 0; b < Bc; b++)
        memcpy(s->rows + (size_t)b * W, s->x + idx_bld(b, 0, N, W), (size_t)W * sizeof(float));
    float *emb = r->embedding + b0 * D;
    for (int b = 0; b < Bc; b++) {
        float mean, sigma;
        layernorm_forward(s->rows2 + (size_t)b * W, &mean, &sigma, s->rows + (size_t)b * W,
                          w->ln_post_w, w->ln_post_b, 1, W, c->ln_eps);
        s->stats[3 * (size_t)b] = mean;
        s->stats[3 * (size_t)b + 1] = sigma;
    }
    cd_matmul(emb, s->rows2, &w->proj, NULL, Bc, 0);
    if (o->token_embeddings) {  /* every token through ln_post and proj (blk.ln is free now) */
        layernorm_forward(s->blk.ln, NULL, NULL, s->x, w->ln_post_w, w->ln_post_b, R, W,
                          c->ln_eps);
        cd_matmul(r->token_embeddings + idx_bld(b0, 0, N, D), s->blk.ln, &w->proj, NULL, R, 0);
    }
    for (int b = 0; b < Bc; b++) {
        double sq = 0.0;
        for (int j = 0; j < D; j++) sq += (double)emb[(size_t)b * D + j] * emb[(size_t)b * D + j];
        s->stats[3 * (size_t)b + 2] = (float)sqrt(sq);
        memcpy(r->ln_stats + 3 * (b0 + b), s->stats + 3 * (size_t)b, 3 * sizeof(float));
    }
    decompose_final(vc);
    return CD_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* the SigLIP image forward and its decomposition (docs/decomposition.md, "SigLIP")
 *
 *   x = patches @ conv^T + conv_b + pos                                    (B, N = G*G, W)
 *   per layer: x += out_proj(MHA(ln_1(x))); x += fc2(gelu_tanh(fc1(ln_2(x))))
 *   y = post_layernorm(x)   (every token; mu[i], sigma[i] its statistics)
 *   p[h, i] = softmax_i(q_h . k_h(y_i) / sqrt(d)),  q = probe @ W_Q^T + b_Q
 *   a = sum_h W_O[:, h] sum_i p[h, i] v_h(y_i) + b_O          (the attention part, W)
 *   emb = a + fc2(gelu_tanh(fc1(LN(a))))                       (the MLP part)
 * Reference terms: pool_heads[h] = W_O[:, h] z_h + b_O / H with z_h = sum_i p[h,i] v_h(y_i),
 * pool_tokens[i, h] = p[h,i] W_O[:, h] v_h(y_i) + b_O / (N H), pool_mlp = the MLP part.
 * Deep terms: with c[h, i] = p[h, i] / sigma[i], every residual term t of the stream at token i
 * (the embeddings, each layer's head outputs W_O^l[:, h'] z^l_h'[i] + b_O^l / H, each MLP)
 * contributes
 *   sum_h W_O[:, h] W_V[h] (gamma * sum_i c[h, i] (t[i] - mu[i] / K_t)) + pool_const / K_t
 * with K_t = K = 2L + 1 for a layer-level row, K H for a head; these sum to a exactly.
 * Deep per-token terms (tokens): the same map without the sum over i, for the head terms,
 *   tokens[l, i, h'] = sum_h W_O[:, h] W_V[h] (gamma * c[h, i] (t[i] - mu[i] / (K H)))
 *                      + pool_const / (K H N),   t[i] = W_O^l[:, h'] z^l_h'[i] + b_O^l / H,
 * so that tokens summed over i are the heads' deep terms.
 * The per-token attention outputs and MLP outputs of every layer are kept (chunk scratch)
 * until p and sigma are known at the end.                                                     */

typedef struct {
    int Bc;
    int nthreads;      /* threads of the call */
    int nthr;          /* threads of the per-image loop: min(nthreads, Bc of a full chunk) */
    float *x;          /* (Bc*N, W) residual stream (N = G*G tokens) */
    block_scratch blk; /* the blocks' activations; fc (Bc, max(N*F, 3*S*S)) first the patches;
                        * after the blocks ln = post_layernorm(x), qkv = [k | v] (Bc*N, 2W) of
                        * the pooling attention */
    float *p;          /* (Bc, H, N) the probe's attention */
    float *mu, *sigma; /* (Bc*N) post_layernorm statistics */
    float *z;          /* (Bc, W) sum_i p[h,i] v_h(y_i), heads concatenated */
    float *a;          /* (Bc, W) the attention part */
    float *aln;        /* (Bc, W) LN(a) */
    float *pmlp;       /* (Bc, W) the MLP part */
    float *pfc;        /* (Bc, F) */
    float *keep;       /* (Bc, 2L+1, N, W) deep only: row 0 the embeddings, 1..L the MLPs,
                        * L+1..2L the concatenated head outputs (before out_proj) */
    /* per-thread scratch of the per-image work (the images of a chunk run in parallel), nthr
     * copies of each: */
    float *av;         /* (N, d) p-weighted values of one head (pool_tokens) */
    float *c;          /* (H, N) p / sigma of one image */
    float *u;          /* (R, H, W) R = L+1 + L*H raw rows, per pooling head */
    float *zu;         /* (R, W) */
    float *y;          /* (R, W) */
    float *tv;         /* (N, H, W) per-token deep terms: the heads' terms of one layer at
                        * every token, through W_V */
    /* per call, per-token deep terms only: */
    float *vg;         /* (W, W) W_V diag(gamma) */
    float *vfold;      /* (L, W, W) vg @ W_O^l: column block h' maps head h' of layer l */
    float *vb;         /* (L, W) vg @ b_O^l / H */
    float *vsum;       /* (W) vg @ 1 */
    /* per call, the plain matrices unpacked from the packed weights (the model keeps those
     * only): */
    float *pool_wo;    /* (W, W) W_O of the pooling head (out, in) */
    float *pool_kvw;   /* (2W, W) [W_K; W_V] of the pooling attention, deep terms only */
    float *wo;         /* (L, W, W) every block's out-projection (out, in), deep terms only */
} siglip_scratch;

/* one thread's share of the per-thread scratch */
typedef struct { float *av, *c, *u, *zu, *y, *tv; } siglip_thread;

static siglip_thread siglip_thread_scratch(const siglip_scratch *s, const cd_config *cf, int t) {
    const size_t W = (size_t)cf->width, H = (size_t)cf->heads, L = (size_t)cf->layers;
    const size_t G = (size_t)(cf->image_size / cf->patch_size), N = G * G, d = W / H;
    const size_t R = L + 1 + L * H, ts = (size_t)t;
    siglip_thread sc = {s->av + ts * N * d, s->c ? s->c + ts * H * N : NULL,
                        s->u ? s->u + ts * R * H * W : NULL,
                        s->zu ? s->zu + ts * R * W : NULL, s->y ? s->y + ts * R * W : NULL,
                        s->tv ? s->tv + ts * N * H * W : NULL};
    return sc;
}

/* the scratch of a SigLIP image call (returns the number of specs) */
static int siglip_scratch_specs(siglip_scratch *s, scratch_spec *sp, const cd_config *c,
                                const cd_vision_opts *o) {
    const size_t W = (size_t)c->width, H = (size_t)c->heads, L = (size_t)c->layers;
    const size_t F = (size_t)c->mlp_dim, S = (size_t)c->image_size, G = S / (size_t)c->patch_size;
    const size_t N = G * G, d = W / H, R = L + 1 + L * H;
    const size_t fcw = F * N > 3 * S * S ? F * N : 3 * S * S;
    const size_t rows = N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK;
    const int rows_deep = o->heads || o->mlps, deep = rows_deep || o->tokens;
    const scratch_spec spec[] = {
        {&s->x, PER_IMAGE, N, W, 1}, {&s->blk.ln, PER_IMAGE, N, W, 1},
        {&s->blk.qkv, PER_IMAGE, N, 3 * W, 1}, {&s->blk.att, PER_IMAGE, N, W, 1},
        {&s->blk.fc, PER_IMAGE, fcw, 1, 1}, {&s->blk.mlp, PER_IMAGE, N, W, 1},
        {&s->p, PER_IMAGE, H, N, 1}, {&s->mu, PER_IMAGE, N, 1, 1},
        {&s->sigma, PER_IMAGE, N, 1, 1}, {&s->z, PER_IMAGE, W, 1, 1},
        {&s->a, PER_IMAGE, W, 1, 1}, {&s->aln, PER_IMAGE, W, 1, 1},
        {&s->pmlp, PER_IMAGE, W, 1, 1}, {&s->pfc, PER_IMAGE, F, 1, 1},
        {&s->keep, PER_IMAGE, (2 * L + 1) * N, W, deep},
        {&s->blk.tiles, PER_THREAD, rows, N, 1},
        {&s->av, PER_WORKER, N, d, 1}, {&s->c, PER_WORKER, H, N, deep},
        {&s->u, PER_WORKER, R * H, W, rows_deep}, {&s->zu, PER_WORKER, R, W, rows_deep},
        {&s->y, PER_WORKER, R, W, rows_deep},
        {&s->tv, PER_WORKER, N * H, W, o->tokens},
        {&s->vg, PER_CALL, W, W, o->tokens}, {&s->vfold, PER_CALL, L * W, W, o->tokens},
        {&s->vb, PER_CALL, L, W, o->tokens}, {&s->vsum, PER_CALL, W, 1, o->tokens},
        {&s->pool_wo, PER_CALL, W, W, 1}, {&s->pool_kvw, PER_CALL, 2 * W, W, deep},
        {&s->wo, PER_CALL, L * W, W, deep},
    };
    _Static_assert(sizeof spec / sizeof spec[0] <= MAX_SCRATCH_SPECS, "too many arrays");
    memcpy(sp, spec, sizeof spec);
    return (int)(sizeof spec / sizeof spec[0]);
}

/* c (H, N) = p / sigma of image b of the chunk; csum[h] = sum_i c[h, i], cmu[h] = sum_i c[h, i]
 * mu[i] (either may be NULL) */
static void siglip_coefs(const siglip_scratch *s, int b, int H, int N, float *c, double *csum,
                         double *cmu) {
    const float *p = s->p + idx_bld((size_t)b, 0, H, N), *mu = s->mu + (size_t)b * N;
    const float *sigma = s->sigma + (size_t)b * N;
    for (int h = 0; h < H; h++) {
        double su = 0.0, sm = 0.0;
        for (int i = 0; i < N; i++) {
            const float ci = p[(size_t)h * N + i] / sigma[i];
            c[(size_t)h * N + i] = ci;
            su += ci;
            sm += (double)ci * mu[i];
        }
        if (csum) csum[h] = su;
        if (cmu) cmu[h] = sm;
    }
}

/* the deep terms of image b of the chunk into heads (L, H, D) and mlps (L+1, D) of the result
 * (either may be NULL: not wanted) */
static void siglip_deep(const cd_model *m, const siglip_scratch *s, const siglip_thread *sc,
                        int b, float *heads, float *mlps, float inv_norm) {
    const cd_config *cf = &m->cfg;
    const cd_weights *w = &m->w;
    const int W = cf->width, H = cf->heads, L = cf->layers, d = W / H;
    const int G = cf->image_size / cf->patch_size, N = G * G, R = L + 1 + L * H;
    const float K = (float)(2 * L + 1);
    const size_t NW = (size_t)N * W, HW = (size_t)H * W;
    const float *keep = s->keep + idx_bld((size_t)b, 0, 2 * (size_t)L + 1, NW);
    double csum[1024], cmu[1024];  /* H <= 1024: larger is refused by check_vision_opts */
    siglip_coefs(s, b, H, N, sc->c, csum, cmu);
    /* rows 0..L: the embeddings and the MLPs, u[r, h] = c[h] @ t_r - cmu[h] / K */
    for (int r = 0; r <= L; r++) {
        float *u = sc->u + (size_t)r * HW;
        cd_sgemm_nn(H, W, N, 1.0f, sc->c, N, keep + (size_t)r * NW, W, u, W, 0);
        for (int h = 0; h < H; h++) {
            const float sh = (float)(cmu[h] / K);
            for (int j = 0; j < W; j++) u[(size_t)h * W + j] -= sh;
        }
    }
    /* rows L+1..: head h' of layer l, u = W_O^l[:, h'] (c[h] @ z^l[:, h']) + b_O^l / H csum[h]
     * - cmu[h] / (K H); zc = c @ z^l (H, W) lands in zu's first H rows as scratch */
    for (int l = 0; l < L; l++) {
        const cd_block *blk = &w->blocks[l];
        const float *wo = s->wo + idx_bld(l, 0, W, W);   /* (W, W) W_O^l */
        float *zc = sc->zu;
        cd_sgemm_nn(H, W, N, 1.0f, sc->c, N, keep + (size_t)(L + 1 + l) * NW, W, zc, W, 0);
        for (int hp = 0; hp < H; hp++) {
            float *u = sc->u + (size_t)(L + 1 + l * H + hp) * HW;
            cd_sgemm_nt(H, W, d, 1.0f, zc + (size_t)hp * d, W, wo + (size_t)hp * d, W, u, W, 0);
            for (int h = 0; h < H; h++) {
                const float cs = (float)(csum[h] / H), sh = (float)(cmu[h] / (K * H));
                float *row = u + (size_t)h * W;
                for (int j = 0; j < W; j++) row[j] += blk->out_b[j] * cs - sh;
            }
        }
    }
    /* gamma, then per pooling head h: zu[:, h-slice] = (gamma u[:, h]) @ W_V[h]^T */
    const float *gamma = w->ln_post_w;
    for (size_t r = 0; r < (size_t)R * H; r++)
        for (int j = 0; j < W; j++) sc->u[r * W + j] *= gamma[j];
    const float *v_w = s->pool_kvw + (size_t)W * W;   /* (W, W) W_V */
    for (int h = 0; h < H; h++)
        cd_sgemm_nt(R, d, W, 1.0f, sc->u + (size_t)h * W, H * W, v_w + (size_t)h * d * W, W,
                    sc->zu + (size_t)h * d, W, 0);
    cd_matmul(sc->y, sc->zu, &w->pool_out, NULL, R, 0);
    for (int r = 0; r < R; r++) {
        const float kt = r <= L ? 1.0f / K : 1.0f / (K * H);
        const float *src = sc->y + (size_t)r * W;
        float *dst = r <= L ? (mlps ? mlps + (size_t)r * W : NULL)
                            : (heads ? heads + (size_t)(r - L - 1) * W : NULL);
        if (!dst) continue;
        for (int j = 0; j < W; j++) dst[j] = (src[j] + w->pool_const[j] * kt) * inv_norm;
    }
}

/* the per-call maps of the per-token deep terms: W_V diag(gamma) folded into each layer's
 * out-projection (vfold), and the images of the constant rows (vb, vsum) */
static void siglip_token_fold(const cd_model *m, siglip_scratch *s) {
    const cd_config *cf = &m->cfg;
    const cd_weights *w = &m->w;
    const int W = cf->width, H = cf->heads, L = cf->layers;
    const float *gamma = w->ln_post_w, *v_w = s->pool_kvw + (size_t)W * W;   /* W_V */
    for (int o = 0; o < W; o++) {
        double sum = 0.0;
        for (int j = 0; j < W; j++) {
            const float v = v_w[(size_t)o * W + j] * gamma[j];
            s->vg[(size_t)o * W + j] = v;
            sum += v;
        }
        s->vsum[o] = (float)sum;
    }
    const float inv_h = 1.0f / H;
    for (int l = 0; l < L; l++) {
        const cd_block *blk = &w->blocks[l];
        cd_sgemm_nn(W, W, W, 1.0f, s->vg, W, s->wo + idx_bld(l, 0, W, W), W,
                    s->vfold + idx_bld(l, 0, W, W), W, 0);
        cd_sgemm_nt(1, W, W, inv_h, blk->out_b, W, s->vg, W, s->vb + (size_t)l * W, W, 0);
    }
}

/* the per-token deep terms of image b of the chunk into tokens (L, N, H, D) of the result: per
 * layer l and head h', with z (N, d) the head's attention output at every token,
 *   tv[:, h'] = z @ vfold[l][:, h']^T + vb[l] - mu / (K H) vsum
 *             = (gamma * (W_O^l[:, h'] z + b_O^l / H - mu / (K H))) @ W_V^T,
 * pooling head h's columns scaled by c[h, :] (sc->c, from siglip_coefs), then for the whole
 * layer at once
 *   tokens[l] (N*H, W) = (tv @ W_O^T + pool_const / (K H N)) / ||emb|| */
static void siglip_deep_tokens(const cd_model *m, const siglip_scratch *s,
                               const siglip_thread *sc, int b, float *tokens, float inv_norm) {
    const cd_config *cf = &m->cfg;
    const cd_weights *w = &m->w;
    const int W = cf->width, H = cf->heads, L = cf->layers, d = W / H;
    const int G = cf->image_size / cf->patch_size, N = G * G;
    const size_t NW = (size_t)N * W;
    const float kh = 1.0f / ((float)(2 * L + 1) * H), kc = kh / (float)N;
    const float *keep = s->keep + idx_bld((size_t)b, 0, 2 * (size_t)L + 1, NW);
    const float *mu = s->mu + (size_t)b * N;
    for (int l = 0; l < L; l++) {
        const float *z = keep + (size_t)(L + 1 + l) * NW;   /* (N, W) heads concatenated */
        const float *vf = s->vfold + idx_bld(l, 0, W, W), *vb = s->vb + (size_t)l * W;
        for (int hp = 0; hp < H; hp++) {
            float *tv = sc->tv + (size_t)hp * W;                /* rows (i, h') of (N, H, W) */
            cd_sgemm_nt(N, W, d, 1.0f, z + (size_t)hp * d, W, vf + (size_t)hp * d, W, tv,
                        H * W, 0);
            for (int i = 0; i < N; i++) {
                float *row = tv + (size_t)i * H * W;
                const float sh = mu[i] * kh;
                for (int h = 0; h < H; h++) {
                    const float ci = sc->c[(size_t)h * N + i];
                    for (int j = h * d; j < (h + 1) * d; j++)
                        row[j] = (row[j] + vb[j] - sh * s->vsum[j]) * ci;
                }
            }
        }
        float *dst = tokens + idx_blnhd(0, l, 0, 0, L, N, H, W);
        cd_matmul(dst, sc->tv, &w->pool_out, NULL, N * H, 0);
        for (size_t t = 0; t < (size_t)N * H; t++)
            for (int j = 0; j < W; j++)
                dst[t * W + j] = (dst[t * W + j] + w->pool_const[j] * kc) * inv_norm;
    }
}

/* images (Bc, 3, S, S) of the chunk starting at image b0 of the call */
static cd_status siglip_forward_chunk(const cd_model *m, const cd_vision_opts *o,
                                      const cd_vision_result *r, siglip_scratch *s, int b0,
                                      const float *images) {
    const cd_config *c = &m->cfg;
    const cd_weights *w = &m->w;
    const int Bc = s->Bc, W = c->width, H = c->heads, L = c->layers, F = c->mlp_dim;
    const int S = c->image_size, P = c->patch_size, G = S / P, N = G * G, d = W / H;
    const int R = Bc * N, rows_deep = o->heads || o->mlps, deep = rows_deep || o->tokens;
    const size_t NW = (size_t)N * W, K = 2 * (size_t)L + 1;

    /* x = patches @ conv^T + conv_b + pos */
    patches_forward(s->blk.fc, images, Bc, S, P);
    cd_matmul(s->x, s->blk.fc, &w->conv, w->conv_b, R, 0);
    for (int b = 0; b < Bc; b++) residual_forward(s->x + idx_bld(b, 0, N, W), w->pos, NW);
    if (deep)
        for (int b = 0; b < Bc; b++)
            memcpy(s->keep + idx_bld(b, 0, K, NW), s->x + idx_bld(b, 0, N, W), NW * sizeof(float));
    for (int l = 0; l < L; l++) {
        if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;
        block_forward(s->x, &w->blocks[l], &s->blk, NULL, 0, Bc, N, W, H, F, c->act, c->ln_eps);
        if (deep)  /* the heads' outputs and the MLP's output at every token */
            for (int b = 0; b < Bc; b++) {
                memcpy(s->keep + idx_bld(b, L + 1 + l, K, NW), s->blk.att + idx_bld(b, 0, N, W),
                       NW * sizeof(float));
                memcpy(s->keep + idx_bld(b, 1 + l, K, NW), s->blk.mlp + idx_bld(b, 0, N, W),
                       NW * sizeof(float));
            }
    }
    if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;

    /* post_layernorm over every token, then the pooling attention: k | v = y @ [W_K; W_V]^T */
    layernorm_forward(s->blk.ln, s->mu, s->sigma, s->x, w->ln_post_w, w->ln_post_b, R, W,
                      c->ln_eps);
    float *kv = s->blk.qkv;                                         /* (R, 2W) */
    cd_matmul(kv, s->blk.ln, &w->pool_kv, w->pool_kv_b, R, 0);
    const float scale = 1.0f / sqrtf((float)d);
    const size_t ld = (size_t)2 * W;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < Bc; b++)
        for (int h = 0; h < H; h++) {
            float *p = s->p + idx_bld(b, h, H, N);
            const float *q = w->pool_q + (size_t)h * d;
            const float *k = kv + idx_bld(b, 0, N, ld) + (size_t)h * d;
            for (int i = 0; i < N; i++) {
                float sum = 0.0f;
                for (int j = 0; j < d; j++) sum += q[j] * k[(size_t)i * ld + j];
                p[i] = sum * scale;
            }
            softmax_forward(p, N, N);
            const float *v = k + W;
            float *z = s->z + (size_t)b * W + (size_t)h * d;
            for (int j = 0; j < d; j++) z[j] = 0.0f;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < d; j++) z[j] += p[i] * v[(size_t)i * ld + j];
        }
    /* a = z @ W_O^T + b_O; emb = a + fc2(act(fc1(LN(a)))) */
    cd_matmul(s->a, s->z, &w->pool_out, w->pool_out_b, Bc, 0);
    layernorm_forward(s->aln, NULL, NULL, s->a, w->pool_ln_w, w->pool_ln_b, Bc, W, c->ln_eps);
    cd_matmul(s->pfc, s->aln, &w->pool_fc, w->pool_fc_b, Bc, 0);
    act_forward(s->pfc, (size_t)Bc * F, c->act);
    cd_matmul(s->pmlp, s->pfc, &w->pool_proj, w->pool_proj_b, Bc, 0);

    /* per image, in parallel: every product below runs on one thread inside the region */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(s->nthr)
    for (int b = 0; b < Bc; b++) {
#ifdef _OPENMP
        const siglip_thread sc = siglip_thread_scratch(s, c, omp_get_thread_num());
#else
        const siglip_thread sc = siglip_thread_scratch(s, c, 0);
#endif
        const size_t img = (size_t)b0 + b;
        float *emb = r->embedding + img * W;
        double sq = 0.0;
        for (int j = 0; j < W; j++) {
            emb[j] = s->a[(size_t)b * W + j] + s->pmlp[(size_t)b * W + j];
            sq += (double)emb[j] * emb[j];
        }
        const float nrm = (float)sqrt(sq), inv = nrm > 0.0f ? 1.0f / nrm : 0.0f;
        r->ln_stats[3 * img] = 0.0f;
        r->ln_stats[3 * img + 1] = 0.0f;
        r->ln_stats[3 * img + 2] = nrm;
        memcpy(r->pool_attn + idx_bld(img, 0, H, N), s->p + idx_bld(b, 0, H, N),
               (size_t)H * N * sizeof(float));
        for (int j = 0; j < W; j++) r->pool_mlp[img * W + j] = s->pmlp[(size_t)b * W + j] * inv;
        /* pool_heads[h] = (W_O[:, h] z_h + b_O / H) / ||emb|| */
        float *ph = r->pool_heads + idx_bld(img, 0, H, W);
        for (int h = 0; h < H; h++)
            cd_sgemm_nt(1, W, d, inv, s->z + (size_t)b * W + (size_t)h * d, W,
                        s->pool_wo + (size_t)h * d, W, ph + (size_t)h * W, W, 0);
        for (int h = 0; h < H; h++)
            for (int j = 0; j < W; j++) ph[(size_t)h * W + j] += w->pool_out_b[j] * inv / H;
        if (o->pool_tokens) {
            /* pool_tokens[i, h] = (p[h,i] W_O[:, h] v_h(y_i) + b_O / (N H)) / ||emb|| */
            float *pt = r->pool_tokens + idx_blhd(img, 0, 0, N, H, W);
            for (int h = 0; h < H; h++) {
                const float *p = s->p + idx_bld(b, h, H, N);
                const float *v = kv + idx_bld(b, 0, N, ld) + W + (size_t)h * d;
                for (int i = 0; i < N; i++)
                    for (int j = 0; j < d; j++) sc.av[(size_t)i * d + j] = p[i] * v[i * ld + j];
                cd_sgemm_nt(N, W, d, inv, sc.av, d, s->pool_wo + (size_t)h * d, W,
                            pt + (size_t)h * W, H * W, 0);
            }
            const float sh = inv / ((float)N * H);
            for (size_t t = 0; t < (size_t)N * H; t++)
                for (int j = 0; j < W; j++) pt[t * W + j] += w->pool_out_b[j] * sh;
        }
        if (rows_deep)
            siglip_deep(m, s, &sc, b, o->heads ? r->heads + idx_blhd(img, 0, 0, L, H, W) : NULL,
                        o->mlps ? r->mlps + idx_bld(img, 0, (size_t)L + 1, W) : NULL, inv);
        if (o->tokens) {
            if (!rows_deep) siglip_coefs(s, b, H, N, sc.c, NULL, NULL);
            siglip_deep_tokens(m, s, &sc, b, r->tokens + idx_blnhd(img, 0, 0, 0, L, N, H, W),
                               inv);
        }
    }
    return CD_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* an image call: validate, plan, allocate, run                                                */

int cd_vision_outputs(const cd_config *c, const cd_vision_opts *opts, int B, cd_vision_result *r,
                      cd_vision_output *outs) {
    cd_vision_opts none;
    memset(&none, 0, sizeof none);
    const cd_vision_opts *o = opts ? opts : &none;
    const int siglip = c->family == CD_FAMILY_SIGLIP, clip = !siglip;
    const int G = c->image_size / c->patch_size, N = siglip ? G * G : 1 + G * G;
    const int T = o->probe ? o->n_probe : 0;
    r->B = B; r->L = c->layers; r->H = c->heads; r->N = N; r->D = c->embed_dim; r->T = T;
    r->W = c->width;
    const int64_t Bn = B, L = c->layers, H = c->heads, D = c->embed_dim, Nn = N, Tn = T;
    const struct { const char *name; float **slot; int on; int nd; int64_t d[5]; } all[] = {
        {"embedding", &r->embedding, 1, 2, {Bn, D}},
        {"ln_stats", &r->ln_stats, 1, 2, {Bn, 3}},
        {"heads", &r->heads, o->heads, 4, {Bn, L, H, D}},
        {"mlps", &r->mlps, o->mlps, 3, {Bn, L + 1, D}},
        {"cls_to_cls", &r->cls_to_cls, clip && o->cls_to_cls, 3, {Bn, L, D}},
        {"tokens", &r->tokens, o->tokens, 5, {Bn, L, Nn, H, D}},
        {"probe", &r->probe_out, clip && o->probe != NULL, 5, {Bn, L, Nn, H, Tn}},
        {"attn_cls", &r->attn_cls, clip && o->attn, 4, {Bn, L, H, Nn}},
        {"attn_mean", &r->attn_mean, clip && o->attn, 4, {Bn, L, Nn, Nn}},
        {"token_embeddings", &r->token_embeddings, clip && o->token_embeddings, 3, {Bn, Nn, D}},
        {"pool_heads", &r->pool_heads, siglip, 3, {Bn, H, D}},
        {"pool_tokens", &r->pool_tokens, siglip && o->pool_tokens, 4, {Bn, Nn, H, D}},
        {"pool_mlp", &r->pool_mlp, siglip, 2, {Bn, D}},
        {"pool_attn", &r->pool_attn, siglip, 3, {Bn, H, Nn}},
    };
    int k = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (!all[i].on) continue;
        outs[k].name = all[i].name;
        outs[k].ndim = all[i].nd;
        memcpy(outs[k].dims, all[i].d, sizeof outs[k].dims);
        outs[k].slot = all[i].slot;
        k++;
    }
    return k;
}

/* floats of one output array (0 on overflow: only for empty arrays is it also 0) */
static int output_floats(const cd_vision_output *out, size_t *n) {
    size_t t = 1;
    for (int i = 0; i < out->ndim; i++)
        if (out->dims[i] < 0 || mul_sz(&t, t, (size_t)out->dims[i])) return -1;
    *n = t;
    return 0;
}

/* images (B, 3, S, S): B >= 0, data present, every value finite */
static cd_status check_images(const float *images, int B, int S, cd_error *err) {
    if (B < 0 || (B > 0 && !images)) {
        set_err(err, "images: expected (B, 3, %d, %d) float32 values with B >= 0", S, S);
        return CD_ERR_VALUE;
    }
    size_t img_n;
    if (mul3(&img_n, (size_t)B, 3, (size_t)S * S)) {
        set_err(err, "images: batch too large");
        return CD_ERR_NOMEM;
    }
    for (size_t i = 0; i < img_n; i++)
        if (!isfinite(images[i])) {
            size_t x = i % S, y = i / S % S, ch = i / ((size_t)S * S) % 3, b = i / (3 * (size_t)S * S);
            set_err(err, "images contains a non-finite value (%s) at index [%zu, %zu, %zu, %zu]",
                    isnan(images[i]) ? "nan" : "inf", b, ch, y, x);
            return CD_ERR_VALUE;
        }
    return CD_OK;
}

/* the options against the model family (no data looked at) */
static cd_status check_vision_opts(const cd_config *c, const cd_vision_opts *o, cd_error *err) {
    const int W = c->width, H = c->heads, D = c->embed_dim;
    if (c->family == CD_FAMILY_SIGLIP) {
        if (o->cls_to_cls || o->probe || o->n_probe || o->attn || o->token_embeddings) {
            set_err(err, "SigLIP has no class token: cls_to_cls, probe, attn and "
                    "token_embeddings are not offered (use pool_tokens for the pooling head's "
                    "per-token terms, heads / mlps / tokens for the deep terms)");
            return CD_ERR_VALUE;
        }
        if (H > 1024 && (o->heads || o->mlps || o->tokens)) {
            set_err(err, "the deep decomposition supports at most 1024 heads, this model has %d",
                    H);
            return CD_ERR_VALUE;
        }
        return CD_OK;
    }
    if (o->pool_tokens) {
        set_err(err, "pool_tokens is a SigLIP output; this is a CLIP model (use tokens)");
        return CD_ERR_VALUE;
    }
    if ((o->probe && o->n_probe <= 0) || (!o->probe && o->n_probe != 0)) {
        set_err(err, "probe: expected (T, %d) directions with T >= 1, got T = %d%s", D, o->n_probe,
                o->probe ? "" : " and no data");
        return CD_ERR_VALUE;
    }
    const int T = o->probe ? o->n_probe : 0;
    if ((int64_t)H * T > INT32_MAX || (int64_t)W * T > INT32_MAX) {
        set_err(err, "probe: %d directions are too many", T);
        return CD_ERR_VALUE;
    }
    return CD_OK;
}

/* validate: the arguments of an image call */
static cd_status vision_validate(const cd_model *m, const float *images, int B,
                                 const cd_vision_opts *o, cd_error *err) {
    const cd_config *c = &m->cfg;
    cd_status st = check_vision_opts(c, o, err);
    if (st) return st;
    if (o->probe) {
        const int D = c->embed_dim;
        for (size_t i = 0; i < (size_t)o->n_probe * D; i++)
            if (!isfinite(o->probe[i])) {
                set_err(err, "probe contains a non-finite value at index [%zu, %zu]", i / D, i % D);
                return CD_ERR_VALUE;
            }
    }
    return check_images(images, B, c->image_size, err);
}

/* The scratch of an image call, whichever the family. */
typedef struct {
    vision_scratch clip;
    siglip_scratch siglip;
    scratch_spec spec[MAX_SCRATCH_SPECS];
    int n_spec;
} image_scratch;

static void image_scratch_specs(image_scratch *s, const cd_config *c, const cd_vision_opts *o) {
    memset(s, 0, sizeof *s);
    s->n_spec = c->family == CD_FAMILY_SIGLIP ? siglip_scratch_specs(&s->siglip, s->spec, c, o)
                                              : vision_scratch_specs(&s->clip, s->spec, c, o);
}

/* plan: images per chunk and the bytes of the call for `nthreads` threads */
static cd_status image_plan(const cd_config *c, const cd_vision_opts *o, int B, size_t budget,
                            int nthreads, cd_vision_plan *p, cd_error *err) {
    memset(p, 0, sizeof *p);
    image_scratch s;
    image_scratch_specs(&s, c, o);
    const int siglip = c->family == CD_FAMILY_SIGLIP;
    const int G = c->image_size / c->patch_size, N = siglip ? G * G : 1 + G * G;
    size_t per_image, fixed;
    if (scratch_bytes(s.spec, s.n_spec, 1, (size_t)nthreads, &per_image, &fixed)) goto too_big;
    size_t chunk = per_image ? budget / per_image : 1;
    if (chunk < 1) chunk = 1;
    if (chunk > (size_t)(B > 1 ? B : 1)) chunk = (size_t)(B > 1 ? B : 1);
    if (chunk > (size_t)INT32_MAX / ((size_t)N + 1)) chunk = (size_t)INT32_MAX / ((size_t)N + 1);
    if (scratch_bytes(s.spec, s.n_spec, chunk, (size_t)nthreads, &per_image, &fixed)) goto too_big;
    p->chunk = (int)chunk;
    p->threads = nthreads;
    p->scratch_per_image = per_image;
    p->scratch_fixed = fixed;
    if (!siglip && needs_fold(o) &&
        mul3(&p->model_bytes, (size_t)c->layers * sizeof(float), (size_t)c->width,
             (size_t)c->embed_dim))
        goto too_big;
    cd_vision_result r;
    memset(&r, 0, sizeof r);
    cd_vision_output outs[CD_VISION_MAX_OUTPUTS];
    const int k = cd_vision_outputs(c, o, 1, &r, outs);
    for (int i = 0; i < k; i++) {
        size_t n;
        if (output_floats(&outs[i], &n) || n > SIZE_MAX / 8 / sizeof(float) ||
            p->result_per_image > SIZE_MAX / 8)
            goto too_big;
        p->result_per_image += n * sizeof(float);
    }
    return CD_OK;
too_big:
    set_err(err, "the scratch of one image is too large to plan");
    return CD_ERR_NOMEM;
}

/* allocate: the scratch of chunks of `chunk` images (NULL when memory is short) */
static void *image_scratch_alloc(image_scratch *s, int chunk, int nthreads) {
    plan_item it[MAX_SCRATCH_SPECS];
    const int k = scratch_items(s->spec, s->n_spec, (size_t)chunk, (size_t)nthreads, it);
    if (k < 0) return NULL;
    s->clip.Bc = s->siglip.Bc = chunk;
    s->clip.blk.n_tiles = s->siglip.blk.n_tiles = nthreads;
    s->clip.nthreads = s->siglip.nthreads = nthreads;
    s->siglip.nthr = chunk < nthreads ? chunk : nthreads;
    return plan_alloc(it, k, NULL);
}

/* run: CLIP, chunk after chunk */
static cd_status clip_run(const cd_model *m, const float *images, int B, const cd_vision_opts *o,
                          const cd_vision_result *r, vision_scratch *s) {
    const cd_config *c = &m->cfg;
    const int S = c->image_size, W = c->width, L = c->layers, D = c->embed_dim, T = o->n_probe;
    if (o->probe)
        for (int l = 0; l < L; l++)
            cd_sgemm_nt(W, T, D, 1.0f, m->fold + idx_bld(l, 0, W, D), D, o->probe, D,
                        s->probe_fold + idx_bld(l, 0, W, T), T, 0);
    const int chunk = s->Bc;
    for (int b0 = 0; b0 < B; b0 += chunk) {
        s->Bc = B - b0 < chunk ? B - b0 : chunk;
        vision_ctx vc = {m, o, r, s, b0};
        cd_status st = vision_forward_chunk(&vc, images + (size_t)b0 * 3 * S * S);
        s->Bc = chunk;
        if (st) return st;
    }
    return CD_OK;
}

/* run: SigLIP, chunk after chunk */
static cd_status siglip_run(const cd_model *m, const float *images, int B,
                            const cd_vision_opts *o, const cd_vision_result *r,
                            siglip_scratch *s) {
    const int S = m->cfg.image_size, W = m->cfg.width, chunk = s->Bc;
    /* the plain matrices the decomposition multiplies by, once per call */
    cd_gemm_unpack(&m->w.pool_out, s->pool_wo);
    if (s->wo) {
        cd_gemm_unpack(&m->w.pool_kv, s->pool_kvw);
        for (int l = 0; l < m->cfg.layers; l++)
            cd_gemm_unpack(&m->w.blocks[l].out, s->wo + idx_bld(l, 0, W, W));
    }
    if (o->tokens) siglip_token_fold(m, s);
    for (int b0 = 0; b0 < B; b0 += chunk) {
        s->Bc = B - b0 < chunk ? B - b0 : chunk;
        cd_status st = siglip_forward_chunk(m, o, r, s, b0, images + (size_t)b0 * 3 * S * S);
        s->Bc = chunk;
        if (st) return st;
    }
    return CD_OK;
}

/* A validated call into the arrays of r (those cd_vision_outputs lists are set). */
static cd_status image_call(const cd_model *m, const float *images, int B,
                            const cd_vision_opts *o, const cd_vision_result *r, size_t budget,
                            cd_error *err) {
    if (B == 0) return CD_OK;
    const cd_config *c = &m->cfg;
    const int siglip = c->family == CD_FAMILY_SIGLIP;
    int prev_threads = push_threads(o->threads);
    const int nthreads = max_threads();
    cd_status st = CD_OK;
    void *block = NULL;
    cd_vision_plan plan;
    image_scratch s;
    if (!siglip && needs_fold(o)) st = ensure_fold(m, err);
    if (!st) st = image_plan(c, o, B, budget, nthreads, &plan, err);
    if (!st) {
        image_scratch_specs(&s, c, o);
        block = image_scratch_alloc(&s, plan.chunk, nthreads);
        if (!block) {
            st = CD_ERR_NOMEM;
            set_err(err, "out of memory for the scratch of %d images", B);
        }
    }
    if (!st) {
        st = siglip ? siglip_run(m, images, B, o, r, &s.siglip)
                    : clip_run(m, images, B, o, r, &s.clip);
        if (st) set_err(err, "interrupted");
    }
    free(block);
    pop_threads(o->threads, prev_threads);
    return st;
}

static const cd_vision_opts *opts_or_none(const cd_vision_opts *o, cd_vision_opts *none) {
    memset(none, 0, sizeof *none);
    return o ? o : none;
}

cd_status cd_encode_image_plan(const cd_config *c, const cd_vision_opts *opts, int B,
                               size_t budget, cd_vision_plan *plan, cd_error *err) {
    if (err) err->msg[0] = '\0';
    if (!c || !plan || B < 0) {
        set_err(err, "cd_encode_image_plan: NULL argument or B < 0");
        return CD_ERR_VALUE;
    }
    cd_vision_opts none;
    const cd_vision_opts *o = opts_or_none(opts, &none);
    cd_status st = cd_check_config(c, "the config", err);
    if (!st) st = check_vision_opts(c, o, err);
    if (st) return st;
    int nthreads = o->threads > 0 ? o->threads : max_threads();
    if (cd_forked_child()) nthreads = 1;
    return image_plan(c, o, B, budget ? budget : CD_SCRATCH_BUDGET, nthreads, plan, err);
}

static cd_status encode_image_into(const cd_model *m, const float *images, int B,
                                   const cd_vision_opts *opts, cd_vision_result *out,
                                   cd_error *err, size_t budget) {
    if (err) err->msg[0] = '\0';
    if (!m || !out) {
        set_err(err, "cd_encode_image_into: NULL argument");
        return CD_ERR_VALUE;
    }
    cd_vision_opts none;
    const cd_vision_opts *o = opts_or_none(opts, &none);
    cd_status st = vision_validate(m, images, B, o, err);
    if (st) return st;
    cd_vision_output outs[CD_VISION_MAX_OUTPUTS];
    const int k = cd_vision_outputs(&m->cfg, o, B, out, outs);
    for (int i = 0; i < k; i++)
        if (B > 0 && !*outs[i].slot) {
            set_err(err, "cd_encode_image_into: the output array %s is missing", outs[i].name);
            return CD_ERR_VALUE;
        }
    return image_call(m, images, B, o, out, budget, err);
}

cd_status cd_encode_image_into(const cd_model *m, const float *images, int B,
                               const cd_vision_opts *opts, cd_vision_result *out, cd_error *err) {
    return encode_image_into(m, images, B, opts, out, err, CD_SCRATCH_BUDGET);
}

void cd_vision_result_free(cd_vision_result *r) {
    if (!r) return;
    free(r->block);
    free(r);
}

/* the allocating form: one block for every output array */
static cd_status encode_image_alloc(const cd_model *m, const float *images, int B,
                                    const cd_vision_opts *opts, cd_vision_result **out,
                                    cd_error *err, size_t budget) {
    if (err) err->msg[0] = '\0';
    if (!m || !out) {
        set_err(err, "cd_encode_image: NULL argument");
        return CD_ERR_VALUE;
    }
    *out = NULL;
    cd_vision_opts none;
    const cd_vision_opts *o = opts_or_none(opts, &none);
    cd_status st = vision_validate(m, images, B, o, err);
    if (st) return st;
    cd_vision_result *r = (cd_vision_result *)calloc(1, sizeof(cd_vision_result));
    if (!r) {
        set_err(err, "out of memory");
        return CD_ERR_NOMEM;
    }
    cd_vision_output outs[CD_VISION_MAX_OUTPUTS];
    plan_item items[CD_VISION_MAX_OUTPUTS];
    const int k = cd_vision_outputs(&m->cfg, o, B, r, outs);
    for (int i = 0; i < k; i++) {
        if (output_floats(&outs[i], &items[i].n)) {
            free(r);
            set_err(err, "the requested outputs for %d images are too large", B);
            return CD_ERR_NOMEM;
        }
        items[i].dst = outs[i].slot;
    }
    r->block = plan_alloc(items, k, &r->block_bytes);
    if (!r->block) {
        free(r);
        set_err(err, "out of memory for the outputs of %d images", B);
        return CD_ERR_NOMEM;
    }
    st = image_call(m, images, B, o, r, budget, err);
    if (st) {
        cd_vision_result_free(r);
        return st;
    }
    *out = r;
    return CD_OK;
}

/* As cd_encode_image with a chosen scratch budget in bytes (tests use it to force chunking). */
cd_status cd_encode_image_budget(const cd_model *m, const float *images, int B,
                                 const cd_vision_opts *opts, cd_vision_result **out,
                                 cd_error *err, size_t budget) {
    return encode_image_alloc(m, images, B, opts, out, err, budget);
}

cd_status cd_encode_image(const cd_model *m, const float *images, int B,
                          const cd_vision_opts *opts, cd_vision_result **out, cd_error *err) {
    return encode_image_alloc(m, images, B, opts, out, err, CD_SCRATCH_BUDGET);
}

/* ------------------------------------------------------------------------------------------ */
/* the text forward                                                                            */

/* Scratch of chunks of Tc texts. */
typedef struct {
    float *x;          /* (Tc*C, W) residual stream */
    block_scratch blk; /* the blocks' activations */
    float *rows;       /* (Tc, W) the end-of-text rows */
    float *rows2;      /* (Tc, W) after ln_final */
} text_scratch;

/* the position whose output is a text's feature: CLIP's end-of-text token, the first position
 * of the largest id in the row (open_clip's argmax); SigLIP's last position */
static int eot_position(const int32_t *row, int C, int siglip) {
    if (siglip) return C - 1;
    int best = 0;
    for (int j = 1; j < C; j++)
        if (row[j] > row[best]) best = j;
    return best;
}

cd_status cd_encode_text(const cd_model *m, const int32_t *tokens, int T, float *out, int threads,
                         cd_cancel_fn cancel, void *cancel_ctx, cd_error *err) {
    if (err) err->msg[0] = '\0';
    if (!m) {
        set_err(err, "cd_encode_text: NULL model");
        return CD_ERR_VALUE;
    }
    const cd_config *c = &m->cfg;
    if (c->text_layers <= 0) {
        set_err(err, "this model has no text tower (text_layers = 0)");
        return CD_ERR_VALUE;
    }
    const int C = c->context_length, W = c->text_width, H = c->text_heads, F = c->text_mlp_dim;
    const int D = c->embed_dim, V = c->vocab_size, Lt = c->text_layers;
    const int siglip = c->family == CD_FAMILY_SIGLIP;
    if (T < 0 || (T > 0 && (!tokens || !out))) {
        set_err(err, "tokens: expected (T, %d) int32 token ids with T >= 0", C);
        return CD_ERR_VALUE;
    }
    for (size_t i = 0; i < (size_t)T * C; i++)
        if (tokens[i] < 0 || tokens[i] >= V) {
            set_err(err, "tokens[%zu, %zu] = %d is outside the vocabulary [0, %d)", i / C, i % C,
                    (int)tokens[i], V);
            return CD_ERR_VALUE;
        }
    if (T == 0) return CD_OK;

    int prev_threads = push_threads(threads);
    cd_status st = CD_OK;
    const size_t Cs = (size_t)C, Ws = (size_t)W;
    const int nthreads = max_threads();
    const size_t rows = Cs < CD_ATT_ROW_BLOCK ? Cs : CD_ATT_ROW_BLOCK;
    text_scratch s;
    memset(&s, 0, sizeof s);
    const scratch_spec spec[] = {
        {&s.x, PER_IMAGE, Cs, Ws, 1},        {&s.blk.ln, PER_IMAGE, Cs, Ws, 1},
        {&s.blk.qkv, PER_IMAGE, Cs, 3 * Ws, 1}, {&s.blk.att, PER_IMAGE, Cs, Ws, 1},
        {&s.blk.fc, PER_IMAGE, Cs, (size_t)F, 1}, {&s.blk.mlp, PER_IMAGE, Cs, Ws, 1},
        {&s.rows, PER_IMAGE, Ws, 1, 1},      {&s.rows2, PER_IMAGE, Ws, 1, 1},
        {&s.blk.tiles, PER_THREAD, rows, Cs, 1},
    };
    const int nspec = (int)(sizeof spec / sizeof spec[0]);
    plan_item it[sizeof spec / sizeof spec[0]];
    void *block = NULL;
    size_t per_text, fixed;
    if (!scratch_bytes(spec, nspec, 1, (size_t)nthreads, &per_text, &fixed)) {
        size_t Tc = CD_SCRATCH_BUDGET / per_text;
        if (Tc < 1) Tc = 1;
        if (Tc > (size_t)T) Tc = (size_t)T;
        if (Tc > (size_t)INT32_MAX / Cs) Tc = (size_t)INT32_MAX / Cs;
        const int k = scratch_items(spec, nspec, Tc, (size_t)nthreads, it);
        if (k > 0) block = plan_alloc(it, k, NULL);
        s.blk.n_tiles = nthreads;
        const cd_weights *w = &m->w;
        for (int t0 = 0; block && t0 < T && !st; t0 += (int)Tc) {
            const int n = T - t0 < (int)Tc ? T - t0 : (int)Tc;
            const int32_t *ids = tokens + (size_t)t0 * C;
            /* a causal tower's end-of-text token never sees the tokens after it: run the chunk
             * only up to its longest text (the same numbers as the full context, a fraction of
             * the work for short texts). SigLIP attends to its padding: all C positions. */
            int Ce = siglip ? C : 1;
            for (int t = 0; !siglip && t < n; t++) {
                const int e = eot_position(ids + (size_t)t * C, C, 0) + 1;
                if (e > Ce) Ce = e;
            }
            if (w->tok_emb_bf16)
                text_embed_bf16_forward(s.x, ids, C, w->tok_emb_bf16, w->tpos, n, Ce, W);
            else
                text_embed_forward(s.x, ids, C, w->tok_emb, w->tpos, n, Ce, W);
            for (int l = 0; l < Lt; l++) {
                if (cancel && cancel(cancel_ctx)) {
                    st = CD_ERR_INTERRUPTED;
                    set_err(err, "interrupted");
                    break;
                }
                block_forward(s.x, &w->tblocks[l], &s.blk, NULL, !siglip, n, Ce, W, H, F,
                              c->text_act, c->ln_eps);
            }
            if (st) break;
            for (int t = 0; t < n; t++) {
                const int e = eot_position(ids + (size_t)t * C, C, siglip);
                memcpy(s.rows + (size_t)t * W, s.x + idx_bld(t, e, (size_t)Ce, Ws),
                       Ws * sizeof(float));
            }
            layernorm_forward(s.rows2, NULL, NULL, s.rows, w->ln_final_w, w->ln_final_b, n, W,
                              c->ln_eps);
            cd_matmul(out + (size_t)t0 * D, s.rows2, &w->tproj, w->tproj_b, n, 0);
        }
    }
    if (!block) {
        st = CD_ERR_NOMEM;
        set_err(err, "out of memory for the scratch of %d texts", T);
    }
    free(block);
    pop_threads(threads, prev_threads);
    return st;
}
