/* model.c -- CLIP towers from a safetensors checkpoint: loading, the image forward with its
 * decomposition, and the text forward.
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
 * (decomposition.md). Per-token terms are folded: F[l,h] = (W_O[:, h-slice]^T * gamma) @ proj
 * (d x D) is computed once per model, so the term of token i is
 *   a[l,h,0,i] v[l,h,i] @ F[l,h] / (sigma ||emb||) + const(l)
 * and never needs an N x N x H x W intermediate.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clipdecomp.h"
#include "gemm.h"
#include "cpu.h"
#include "ops.h"
#include "safetensors.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif

/* scratch for the activations of one forward chunk: the batch is split so that it stays
 * below this (at least one image or text per chunk) */
#define CD_SCRATCH_BUDGET ((size_t)256 << 20)
#define CD_MAX_DIM (1 << 20)   /* sanity bound on every config entry */
#define CD_ALIGN 64            /* byte alignment of every array in a planned block */

/* ------------------------------------------------------------------------------------------ */
/* structs                                                                                     */

typedef struct {
    const float *ln1_w, *ln1_b;   /* (W) */
    cd_gemm_weight qkv;           /* (3W, W) packed: [q; k; v] */
    const float *qkv_b;           /* (3W) */
    cd_gemm_weight out;           /* (W, W) packed */
    const float *out_w;           /* (W, W) unpacked (out, in), SigLIP's vision blocks only (its
                                   * deep decomposition); CLIP unpacks `out` when it needs it */
    const float *out_b;           /* (W) */
    const float *ln2_w, *ln2_b;   /* (W) */
    cd_gemm_weight fc;            /* (F, W) packed */
    const float *fc_b;            /* (F) */
    cd_gemm_weight proj;          /* (W, F) packed */
    const float *proj_b;          /* (W) */
} cd_block;

typedef struct {
    /* vision */
    const float *class_emb;       /* (W) */
    const float *pos;             /* (N, W) */
    cd_gemm_weight conv;          /* (W, 3*P*P) packed, no bias */
    const float *ln_pre_w, *ln_pre_b;    /* (W) */
    cd_block *blocks;             /* (L) */
    const float *ln_post_w, *ln_post_b;  /* (W) gamma, beta of the decomposition */
    cd_gemm_weight proj;          /* (D, W) packed: proj^T */
    /* text (text_layers > 0) */
    const float *tok_emb;         /* (V, Wt) */
    const float *tpos;            /* (C, Wt) */
    cd_block *tblocks;            /* (text_layers) */
    const float *ln_final_w, *ln_final_b;  /* (Wt) */
    cd_gemm_weight tproj;         /* (D, Wt) packed: text_projection^T */
    /* SigLIP only (see the SigLIP section below) */
    const float *conv_b;          /* (W) patch-embedding bias */
    const float *tproj_b;         /* (D) text head bias */
    const float *pool_q;          /* (W) the probe's query, probe @ W_Q^T + b_Q, once at load */
    cd_gemm_weight pool_kv;       /* (2W, W) packed: [W_K; W_V] of the pooling attention */
    const float *pool_kv_b;       /* (2W) */
    const float *pool_v_w;        /* (W, W) W_V unpacked (the deep decomposition) */
    cd_gemm_weight pool_out;      /* (W, W) packed out-projection */
    const float *pool_out_w;      /* (W, W) unpacked (out, in) */
    const float *pool_out_b;      /* (W) */
    const float *pool_ln_w, *pool_ln_b;  /* (W) the head's LayerNorm */
    cd_gemm_weight pool_fc;       /* (F, W) packed */
    const float *pool_fc_b;       /* (F) */
    cd_gemm_weight pool_proj;     /* (W, F) packed */
    const float *pool_proj_b;     /* (W) */
    const float *pool_const;      /* (W) W_O (W_V beta + b_V) + b_O: the attention part's constant */
} cd_weights;

struct cd_model {
    cd_config cfg;
    cd_layout layout;
    cd_st_file file;              /* the mapping, during load only: closed once the model is
                                   * built, so that a file rewritten later cannot reach it */
    cd_weights w;
    float **owned;                /* converted / assembled buffers the weights point into */
    int n_owned, cap_owned;
    size_t owned_bytes;           /* their size */
    int has_logit_scale;
    float logit_scale;            /* as stored (a log) */
    int has_logit_bias;
    float logit_bias;             /* SigLIP's, as stored */
    cd_precision precision;       /* of the blocks' matrix products (cd_model_set_precision) */
    /* the fold F (L, W, D), built on first use by a call that needs per-token terms; the only
     * state written after load, behind fold_lock */
    pthread_mutex_t fold_lock;
    atomic_int fold_ready;
    float *fold;
};

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */

static void set_err(cd_error *err, const char *fmt, ...) {
    if (!err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

/* *r = a * b, 0 on success, -1 on overflow */
static int mul_sz(size_t *r, size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *r = a * b;
    return 0;
}

static int mul3(size_t *r, size_t a, size_t b, size_t c) {
    size_t t;
    return mul_sz(&t, a, b) || mul_sz(r, t, c) ? -1 : 0;
}

/* A block of float arrays carved from one allocation. */
typedef struct { float **dst; size_t n; } plan_item;

/* Allocate one block holding every item (n floats each, each CD_ALIGN-aligned) and point
 * *items[i].dst into it; items with dst == NULL are skipped. Returns the block or NULL when the
 * size overflows or memory is short. Zero-sized items still get a valid pointer. */
static void *plan_alloc(plan_item *items, int k, size_t *bytes_out) {
    size_t total = 0;
    for (int i = 0; i < k; i++) {
        if (!items[i].dst) continue;
        size_t b;
        if (mul_sz(&b, items[i].n, sizeof(float))) return NULL;
        size_t padded = (b + CD_ALIGN - 1) / CD_ALIGN * CD_ALIGN;
        if (padded < b || total > SIZE_MAX - padded) return NULL;
        total += padded;
    }
    if (total == 0) total = CD_ALIGN;
    void *block = NULL;
    if (posix_memalign(&block, CD_ALIGN, total) != 0) return NULL;
    char *p = (char *)block;
    for (int i = 0; i < k; i++) {
        if (!items[i].dst) continue;
        *items[i].dst = (float *)(void *)p;
        p += (items[i].n * sizeof(float) + CD_ALIGN - 1) / CD_ALIGN * CD_ALIGN;
    }
    if (bytes_out) *bytes_out = total;
    return block;
}

static int max_threads(void) {
#ifdef _OPENMP
    if (cd_forked_child()) return 1;
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* threads > 0: use that many OpenMP threads in this call (one in a forked child, see cpu.h);
 * returns the previous setting */
static int push_threads(int threads) {
    cd_fork_guard();
    cd_mark_omp_used();
    int prev = max_threads();
#ifdef _OPENMP
    if (cd_forked_child()) threads = 1;
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    return prev;
}

static void pop_threads(int threads, int prev) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(prev);
#else
    (void)threads;
    (void)prev;
#endif
}

static void act_forward(float *x, size_t n, int act) {
    if (act == CD_ACT_QUICK_GELU) quick_gelu_forward(x, n);
    else if (act == CD_ACT_GELU_TANH) gelu_tanh_forward(x, n);
    else gelu_forward(x, n);
}

/* ------------------------------------------------------------------------------------------ */
/* loading                                                                                     */

typedef struct {
    cd_model *m;
    const char *prefix;           /* leading key prefix found in the file, e.g. "" or "model." */
    cd_error *err;
    int bare_vision;              /* a SigLIP vision tower saved alone (transformers'
                                   * SiglipVisionModel): its keys lack "vision_model." */
    cd_precision precision;       /* of the blocks' products: each packed block weight is
                                   * converted as soon as it is packed */
    const cd_st_tensor *last;     /* the tensor fetched last, until its pages are released */
} loader;

/* Release the source pages of the tensor fetched last: once a tensor is copied or packed, the
 * mapping's copy of it leaves memory, so that loading peaks near the model's own size. */
static void release_last(loader *ld) {
    if (ld->last) cd_st_release(&ld->m->file, ld->last);
    ld->last = NULL;
}

/* name without its leading "vision_model." when the loader reads a bare vision tower */
static const char *vision_key(const loader *ld, const char *name) {
    static const char VM[] = "vision_model.";
    if (ld->bare_vision && strncmp(name, VM, sizeof VM - 1) == 0) return name + sizeof VM - 1;
    return name;
}

static int own(cd_model *m, float *buf, size_t n_floats) {
    if (m->n_owned == m->cap_owned) {
        int ncap = m->cap_owned ? 2 * m->cap_owned : 64;
        float **no = (float **)realloc(m->owned, (size_t)ncap * sizeof(float *));
        if (!no) return -1;
        m->owned = no;
        m->cap_owned = ncap;
    }
    m->owned[m->n_owned++] = buf;
    m->owned_bytes += n_floats * sizeof(float);
    return 0;
}

static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *dims) {
    size_t n = 0;
    n += (size_t)snprintf(buf + n, cap - n, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* 0 if all n values are finite, else -1 with *bad the index of the first that is not. Scans
 * the bits (exponent all ones) so that it vectorises and holds under any float flags. */
static int find_nonfinite(const float *v, size_t n, size_t *bad) {
    const size_t blk = 4096;
    for (size_t s = 0; s < n; s += blk) {
        const size_t e = n - s < blk ? n : s + blk;
        uint32_t any = 0;
        for (size_t i = s; i < e; i++) {
            uint32_t u;
            memcpy(&u, v + i, sizeof u);
            any |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
        }
        if (!any) continue;
        for (size_t i = s; i < e; i++)
            if (!isfinite(v[i])) {
                *bad = i;
                return -1;
            }
    }
    return 0;
}

/* Tensor prefix + base + leaf, shape-checked against dims (ndim of them), as float32:
 * *vals points in place into the mapping, or to a converted copy also returned in *tmp
 * (the caller frees it or hands it to the model). NaN or infinite values are refused, naming
 * the tensor. */
static cd_status fetch(loader *ld, const char *base, const char *leaf, int ndim,
                       const int64_t *dims, const float **vals, float **tmp) {
    char name[512];
    *vals = NULL;
    *tmp = NULL;
    release_last(ld);   /* every caller is done with the previous tensor */
    int n = snprintf(name, sizeof name, "%s%s%s", ld->prefix, vision_key(ld, base),
                     vision_key(ld, leaf));
    if (n < 0 || (size_t)n >= sizeof name) {
        set_err(ld->err, "%s: tensor name too long", ld->m->file.path);
        return CD_ERR_FORMAT;
    }
    const cd_st_tensor *t = cd_st_find(&ld->m->file, name);
    if (!t) {
        set_err(ld->err, "%s: tensor '%s' is missing (%s layout)", ld->m->file.path, name,
                ld->m->layout == CD_LAYOUT_HF ? "HF transformers" : "open_clip");
        return CD_ERR_MISSING;
    }
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == dims[i];
    if (!same) {
        char want[128], got[128];
        fmt_shape(want, sizeof want, ndim, dims);
        fmt_shape(got, sizeof got, t->ndim, t->shape);
        set_err(ld->err, "%s: tensor '%s' has shape %s, expected %s from the config",
                ld->m->file.path, name, got, want);
        return CD_ERR_SHAPE;
    }
    cd_status st = cd_st_read_f32(&ld->m->file, t, vals, tmp, ld->err);
    if (st) return st;
    ld->last = t;
    if (*tmp) release_last(ld);   /* converted: the source is no longer read */
    size_t bad;
    if (find_nonfinite(*vals, t->numel, &bad)) {
        float x = (*vals)[bad];
        set_err(ld->err, "%s: tensor '%s' (%s) holds a non-finite value (%s) at flat index %zu "
                "of %zu: the checkpoint is corrupt, or was saved from a diverged run",
                ld->m->file.path, name, cd_st_dtype_name(t->dtype),
                isnan(x) ? "nan" : x > 0 ? "inf" : "-inf", bad, t->numel);
        free(*tmp);
        *tmp = NULL;
        *vals = NULL;
        return CD_ERR_VALUE;
    }
    return CD_OK;
}

/* fetch() for a tensor the model keeps: always a copy the model owns (the mapping is closed
 * after load) */
static cd_status keep(loader *ld, const float **out, const char *base, const char *leaf,
                      int ndim, const int64_t *dims) {
    float *tmp;
    cd_status st = fetch(ld, base, leaf, ndim, dims, out, &tmp);
    if (st) return st;
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)dims[i];  /* == numel, checked by the parser */
    if (!tmp) {
        size_t bytes;
        if (mul_sz(&bytes, n ? n : 1, sizeof(float)) || !(tmp = (float *)malloc(bytes))) {
            *out = NULL;
            set_err(ld->err, "%s: out of memory", ld->m->file.path);
            return CD_ERR_NOMEM;
        }
        memcpy(tmp, *out, n * sizeof(float));
        *out = tmp;
    }
    release_last(ld);
    if (own(ld->m, tmp, n ? n : 1)) {
        free(tmp);
        *out = NULL;
        set_err(ld->err, "%s: out of memory", ld->m->file.path);
        return CD_ERR_NOMEM;
    }
    return CD_OK;
}

static cd_status pack_err(loader *ld, const char *what) {
    set_err(ld->err, "%s: out of memory packing '%s%s'", ld->m->file.path, ld->prefix, what);
    return CD_ERR_NOMEM;
}

/* A packed block weight in the loader's precision (cd_model_set_precision's conversion, one
 * weight at a time, so that the float32 copy of the whole model never exists). */
static cd_status to_precision(loader *ld, cd_gemm_weight *pw, const char *what) {
    if (ld->precision == CD_PRECISION_FP32 || pw->precision != CD_GEMM_FP32) return CD_OK;
    const int gp = ld->precision == CD_PRECISION_BF16 ? CD_GEMM_BF16 : CD_GEMM_BF16_EMULATED;
    return cd_gemm_to_bf16(pw, gp) ? pack_err(ld, what) : CD_OK;
}

/* fetch() of a linear weight (OC, K) packed for cd_matmul; the float data is not kept */
static cd_status pack(loader *ld, cd_gemm_weight *pw, const char *base, const char *leaf, int OC,
                      int K) {
    const float *v;
    float *tmp;
    int64_t dims[2] = {OC, K};
    cd_status st = fetch(ld, base, leaf, 2, dims, &v, &tmp);
    if (st) return st;
    int rc = cd_gemm_pack(pw, v, OC, K);
    free(tmp);
    release_last(ld);
    return rc ? pack_err(ld, leaf) : CD_OK;
}

/* pack() of a transformer block's weight in the loader's precision (bf16 packed straight from
 * the source, without float32 panels in between) */
static cd_status pack_block(loader *ld, cd_gemm_weight *pw, const char *base, const char *leaf,
                            int OC, int K) {
    if (ld->precision != CD_PRECISION_BF16) {
        cd_status st = pack(ld, pw, base, leaf, OC, K);
        return st ? st : to_precision(ld, pw, leaf);
    }
    const float *v;
    float *tmp;
    int64_t dims[2] = {OC, K};
    cd_status st = fetch(ld, base, leaf, 2, dims, &v, &tmp);
    if (st) return st;
    int rc = cd_gemm_pack_bf16(pw, v, OC, K);
    free(tmp);
    release_last(ld);
    return rc ? pack_err(ld, leaf) : CD_OK;
}

/* A projection stored (K, OC) (in, out) as in open_clip: transpose, then pack. */
static cd_status pack_transposed(loader *ld, cd_gemm_weight *pw, const char *key, int K, int OC) {
    const float *v;
    float *tmp;
    int64_t dims[2] = {K, OC};
    cd_status st = fetch(ld, "", key, 2, dims, &v, &tmp);
    if (st) return st;
    size_t n;
    float *tr = mul3(&n, (size_t)K, (size_t)OC, sizeof(float)) ? NULL : (float *)malloc(n);
    if (!tr) { free(tmp); return pack_err(ld, key); }
    for (int k = 0; k < K; k++)
        for (int o = 0; o < OC; o++) tr[(size_t)o * K + k] = v[(size_t)k * OC + o];
    free(tmp);
    release_last(ld);
    int rc = cd_gemm_pack(pw, tr, OC, K);
    free(tr);
    return rc ? pack_err(ld, key) : CD_OK;
}

/* The leaf names of a block whose q, k, v projections are one (3W, W) tensor: LayerNorms and
 * linear layers are "<name>.weight" / "<name>.bias", the fused projection qkv_w / qkv_b. */
typedef struct { const char *ln1, *qkv_w, *qkv_b, *out, *ln2, *fc, *proj; } fused_block_keys;
static const fused_block_keys OPEN_CLIP_BLOCK = {"ln_1", "attn.in_proj_weight",
    "attn.in_proj_bias", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"};
static const fused_block_keys TIMM_BLOCK = {"norm1", "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"};

/* "<name>.<part>" in buf (the names above are short constants) */
static const char *leaf_name(char *buf, size_t cap, const char *name, const char *part) {
    snprintf(buf, cap, "%s.%s", name, part);
    return buf;
}

static cd_status load_fused_block(loader *ld, cd_block *blk, const char *base, int W, int F,
                                  int keep_out, const fused_block_keys *k) {
    const int64_t dW[1] = {W}, dF[1] = {F}, d3W[1] = {3 * (int64_t)W}, dWW[2] = {W, W};
    cd_status st;
    char b[96];
#define TRY(x) do { if ((st = (x)) != CD_OK) return st; } while (0)
    TRY(keep(ld, &blk->ln1_w, base, leaf_name(b, sizeof b, k->ln1, "weight"), 1, dW));
    TRY(keep(ld, &blk->ln1_b, base, leaf_name(b, sizeof b, k->ln1, "bias"), 1, dW));
    TRY(pack_block(ld, &blk->qkv, base, k->qkv_w, 3 * W, W));
    TRY(keep(ld, &blk->qkv_b, base, k->qkv_b, 1, d3W));
    /* SigLIP's deep decomposition keeps the plain matrix too, read before the packed copy is
     * converted */
    if (keep_out) TRY(keep(ld, &blk->out_w, base, leaf_name(b, sizeof b, k->out, "weight"), 2,
                           dWW));
    TRY(pack_block(ld, &blk->out, base, leaf_name(b, sizeof b, k->out, "weight"), W, W));
    TRY(keep(ld, &blk->out_b, base, leaf_name(b, sizeof b, k->out, "bias"), 1, dW));
    TRY(keep(ld, &blk->ln2_w, base, leaf_name(b, sizeof b, k->ln2, "weight"), 1, dW));
    TRY(keep(ld, &blk->ln2_b, base, leaf_name(b, sizeof b, k->ln2, "bias"), 1, dW));
    TRY(pack_block(ld, &blk->fc, base, leaf_name(b, sizeof b, k->fc, "weight"), F, W));
    TRY(keep(ld, &blk->fc_b, base, leaf_name(b, sizeof b, k->fc, "bias"), 1, dF));
    TRY(pack_block(ld, &blk->proj, base, leaf_name(b, sizeof b, k->proj, "weight"), W, F));
    TRY(keep(ld, &blk->proj_b, base, leaf_name(b, sizeof b, k->proj, "bias"), 1, dW));
    return CD_OK;
}

/* One residual block. base: e.g. "visual.transformer.resblocks.3." (open_clip) or
 * "vision_model.encoder.layers.3." (HF). keep_out: keep the unpacked out-projection. */
static cd_status load_block(loader *ld, cd_block *blk, const char *base, int W, int F,
                            int keep_out) {
    const int64_t dW[1] = {W}, dF[1] = {F}, dWW[2] = {W, W};
    cd_status st;
    const int hf = ld->m->layout == CD_LAYOUT_HF;
    if (!hf) return load_fused_block(ld, blk, base, W, F, keep_out, &OPEN_CLIP_BLOCK);
    TRY(keep(ld, &blk->ln1_w, base, "layer_norm1.weight", 1, dW));
    TRY(keep(ld, &blk->ln1_b, base, "layer_norm1.bias", 1, dW));
    /* q, k, v projections -> one (3W, W) weight and (3W) bias */
    {
        static const char *wn[3] = {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                    "self_attn.v_proj.weight"};
        static const char *bn[3] = {"self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                    "self_attn.v_proj.bias"};
        size_t ww, cat_bytes;
        if (mul_sz(&ww, (size_t)W, (size_t)W) || mul3(&cat_bytes, ww, 3, sizeof(float)))
            return pack_err(ld, "self_attn");
        float *cat = (float *)malloc(cat_bytes);
        float *bias = (float *)malloc(3 * (size_t)W * sizeof(float));
        if (!cat || !bias || own(ld->m, bias, 3 * (size_t)W)) {
            free(cat);
            free(bias);
            return pack_err(ld, "self_attn");
        }
        for (int i = 0; i < 3; i++) {
            const float *v;
            float *tmp;
            st = fetch(ld, base, wn[i], 2, dWW, &v, &tmp);
            if (st) { free(cat); return st; }
            memcpy(cat + i * ww, v, ww * sizeof(float));
            free(tmp);
            release_last(ld);
            st = fetch(ld, base, bn[i], 1, dW, &v, &tmp);
            if (st) { free(cat); return st; }
            memcpy(bias + (size_t)i * W, v, (size_t)W * sizeof(float));
            free(tmp);
            release_last(ld);
        }
        int rc = ld->precision == CD_PRECISION_BF16 ? cd_gemm_pack_bf16(&blk->qkv, cat, 3 * W, W)
                                                    : cd_gemm_pack(&blk->qkv, cat, 3 * W, W);
        free(cat);
        if (rc) return pack_err(ld, "self_attn");
        blk->qkv_b = bias;
        TRY(to_precision(ld, &blk->qkv, "self_attn"));
    }
    if (keep_out) TRY(keep(ld, &blk->out_w, base, "self_attn.out_proj.weight", 2, dWW));
    TRY(pack_block(ld, &blk->out, base, "self_attn.out_proj.weight", W, W));
    TRY(keep(ld, &blk->out_b, base, "self_attn.out_proj.bias", 1, dW));
    TRY(keep(ld, &blk->ln2_w, base, "layer_norm2.weight", 1, dW));
    TRY(keep(ld, &blk->ln2_b, base, "layer_norm2.bias", 1, dW));
    TRY(pack_block(ld, &blk->fc, base, "mlp.fc1.weight", F, W));
    TRY(keep(ld, &blk->fc_b, base, "mlp.fc1.bias", 1, dF));
    TRY(pack_block(ld, &blk->proj, base, "mlp.fc2.weight", W, F));
    TRY(keep(ld, &blk->proj_b, base, "mlp.fc2.bias", 1, dW));
    return CD_OK;
}

static cd_status load_vision(loader *ld) {
    cd_model *m = ld->m;
    const cd_config *c = &m->cfg;
    const int W = c->width, P = c->patch_size, G = c->image_size / c->patch_size;
    const int64_t N = 1 + (int64_t)G * G;
    const int64_t dW[1] = {W}, dNW[2] = {N, W}, dconv[4] = {W, 3, P, P};
    const int hf = m->layout == CD_LAYOUT_HF;
    cd_status st;
    const float *v;
    float *tmp;
    /* patch embedding: conv (W, 3, P, P) viewed as (W, 3*P*P) */
    st = fetch(ld, "", hf ? "vision_model.embeddings.patch_embedding.weight" : "visual.conv1.weight",
               4, dconv, &v, &tmp);
    if (st) return st;
    int rc = cd_gemm_pack(&m->w.conv, v, W, 3 * P * P);
    free(tmp);
    release_last(ld);
    if (rc) return pack_err(ld, "patch embedding");
    TRY(keep(ld, &m->w.class_emb, "",
             hf ? "vision_model.embeddings.class_embedding" : "visual.class_embedding", 1, dW));
    TRY(keep(ld, &m->w.pos, "",
             hf ? "vision_model.embeddings.position_embedding.weight" : "visual.positional_embedding",
             2, dNW));
    TRY(keep(ld, &m->w.ln_pre_w, "", hf ? "vision_model.pre_layrnorm.weight" : "visual.ln_pre.weight",
             1, dW));
    TRY(keep(ld, &m->w.ln_pre_b, "", hf ? "vision_model.pre_layrnorm.bias" : "visual.ln_pre.bias",
             1, dW));
    m->w.blocks = (cd_block *)calloc((size_t)c->layers, sizeof(cd_block));
    if (!m->w.blocks) return pack_err(ld, "blocks");
    for (int l = 0; l < c->layers; l++) {
        char base[96];
        snprintf(base, sizeof base,
                 hf ? "vision_model.encoder.layers.%d." : "visual.transformer.resblocks.%d.", l);
        TRY(load_block(ld, &m->w.blocks[l], base, W, c->mlp_dim, 0));
    }
    TRY(keep(ld, &m->w.ln_post_w, "",
             hf ? "vision_model.post_layernorm.weight" : "visual.ln_post.weight", 1, dW));
    TRY(keep(ld, &m->w.ln_post_b, "",
             hf ? "vision_model.post_layernorm.bias" : "visual.ln_post.bias", 1, dW));
    if (hf) TRY(pack(ld, &m->w.proj, "", "visual_projection.weight", c->embed_dim, W));
    else TRY(pack_transposed(ld, &m->w.proj, "visual.proj", W, c->embed_dim));
    return CD_OK;
}

static cd_status load_text(loader *ld) {
    cd_model *m = ld->m;
    const cd_config *c = &m->cfg;
    const int W = c->text_width;
    const int64_t dW[1] = {W}, dVW[2] = {c->vocab_size, W}, dCW[2] = {c->context_length, W};
    const int hf = m->layout == CD_LAYOUT_HF;
    cd_status st;
    const char *tok = hf ? "text_model.embeddings.token_embedding.weight" : "token_embedding.weight";
    char probe[512];
    snprintf(probe, sizeof probe, "%s%s", ld->prefix, tok);
    if (!cd_st_find(&m->file, probe)) {
        set_err(ld->err, "%s: tensor '%s' is missing: the file has no text tower (%s layout); "
                "set text_layers to 0 for an image-only model", m->file.path, probe,
                hf ? "HF transformers" : "open_clip");
        return CD_ERR_MISSING;
    }
    TRY(keep(ld, &m->w.tok_emb, "", tok, 2, dVW));
    TRY(keep(ld, &m->w.tpos, "",
             hf ? "text_model.embeddings.position_embedding.weight" : "positional_embedding", 2,
             dCW));
    m->w.tblocks = (cd_block *)calloc((size_t)c->text_layers, sizeof(cd_block));
    if (!m->w.tblocks) return pack_err(ld, "text blocks");
    for (int l = 0; l < c->text_layers; l++) {
        char base[96];
        snprintf(base, sizeof base,
                 hf ? "text_model.encoder.layers.%d." : "transformer.resblocks.%d.", l);
        TRY(load_block(ld, &m->w.tblocks[l], base, W, c->text_mlp_dim, 0));
    }
    TRY(keep(ld, &m->w.ln_final_w, "",
             hf ? "text_model.final_layer_norm.weight" : "ln_final.weight", 1, dW));
    TRY(keep(ld, &m->w.ln_final_b, "",
             hf ? "text_model.final_layer_norm.bias" : "ln_final.bias", 1, dW));
    if (hf) TRY(pack(ld, &m->w.tproj, "", "text_projection.weight", c->embed_dim, W));
    else TRY(pack_transposed(ld, &m->w.tproj, "text_projection", W, c->embed_dim));
    return CD_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* SigLIP loading: transformers' SiglipModel layout (the fixed-resolution SigLIP 2 checkpoints
 * use it too; the encoder blocks share CLIP's HF keys), Siglip2Model's (NaFlex) at its native
 * grid, and open_clip's timm-based layout ("visual.trunk.*" with timm's block keys, "text.*"
 * with open_clip's).                                                                          */

/* a copy of n floats of `src` that the model owns */
static cd_status own_copy(loader *ld, const float **out, const float *src, size_t n) {
    float *buf = (float *)malloc((n ? n : 1) * sizeof(float));
    if (!buf || own(ld->m, buf, n ? n : 1)) {
        free(buf);
        set_err(ld->err, "%s: out of memory", ld->m->file.path);
        return CD_ERR_NOMEM;
    }
    memcpy(buf, src, n * sizeof(float));
    *out = buf;
    return CD_OK;
}

/* the pooling head. HF: "vision_model.head." probe, attention (nn.MultiheadAttention:
 * in_proj_weight (3W, W) = [W_Q; W_K; W_V], in_proj_bias, out_proj), layernorm, mlp.fc1 / fc2.
 * open_clip (timm): "visual.trunk.attn_pool." latent, q (W, W), kv (2W, W) = [W_K; W_V], proj,
 * norm, mlp.fc1 / fc2. Both are read into one (3W, W) weight and (3W) bias. */
static cd_status load_siglip_head(loader *ld) {
    cd_model *m = ld->m;
    cd_weights *w = &m->w;
    const int W = m->cfg.width, F = m->cfg.mlp_dim;
    const int oc = m->layout == CD_LAYOUT_OPEN_CLIP;
    const int64_t dW[1] = {W}, dF[1] = {F}, d3W[1] = {3 * (int64_t)W}, dWW[2] = {W, W},
                  dP[3] = {1, 1, W}, dIn[2] = {3 * (int64_t)W, W}, d2W[1] = {2 * (int64_t)W},
                  dKV[2] = {2 * (int64_t)W, W};
    const char *base = oc ? "visual.trunk.attn_pool." : "vision_model.head.";
    const char *out = oc ? "proj" : "attention.out_proj";
    const char *lnn = oc ? "norm" : "layernorm";
    cd_status st;
    const float *probe, *in_b, *in_w;
    float *tmp;
    const size_t WW = (size_t)W * W;
    TRY(keep(ld, &probe, base, oc ? "latent" : "probe", 3, dP));
    if (!oc) {
        TRY(keep(ld, &in_b, base, "attention.in_proj_bias", 1, d3W));
        st = fetch(ld, base, "attention.in_proj_weight", 2, dIn, &in_w, &tmp);
        if (st) return st;
    } else {
        /* [q; kv] assembled into a buffer of the model's */
        float *cat_w = (float *)malloc(3 * WW * sizeof(float));
        float *cat_b = (float *)malloc(3 * (size_t)W * sizeof(float));
        if (!cat_w || !cat_b || own(m, cat_b, 3 * (size_t)W)) {
            free(cat_w);
            free(cat_b);
            return pack_err(ld, "visual.trunk.attn_pool");
        }
        struct { const char *name; int nd; const int64_t *dims; float *dst; size_t n; } parts[4] = {
            {"q.weight", 2, dWW, cat_w, WW}, {"kv.weight", 2, dKV, cat_w + WW, 2 * WW},
            {"q.bias", 1, dW, cat_b, (size_t)W}, {"kv.bias", 1, d2W, cat_b + W, 2 * (size_t)W}};
        for (int i = 0; i < 4; i++) {
            const float *v;
            float *t;
            st = fetch(ld, base, parts[i].name, parts[i].nd, parts[i].dims, &v, &t);
            if (st) { free(cat_w); return st; }
            memcpy(parts[i].dst, v, parts[i].n * sizeof(float));
            free(t);
            release_last(ld);
        }
        in_w = cat_w;
        tmp = cat_w;
        in_b = cat_b;
    }
    /* q = probe @ W_Q^T + b_Q, in double */
    float *q = (float *)malloc((size_t)W * sizeof(float));
    if (!q || own(m, q, (size_t)W)) {
        free(q);
        free(tmp);
        return pack_err(ld, "vision_model.head.attention");
    }
    for (int o = 0; o < W; o++) {
        double acc = in_b[o];
        for (int j = 0; j < W; j++) acc += (double)in_w[(size_t)o * W + j] * probe[j];
        q[o] = (float)acc;
    }
    w->pool_q = q;
    int rc = cd_gemm_pack(&w->pool_kv, in_w + WW, 2 * W, W);
    st = rc ? pack_err(ld, "attention.in_proj_weight") : own_copy(ld, &w->pool_v_w, in_w + 2 * WW, WW);
    free(tmp);
    release_last(ld);
    if (st) return st;
    w->pool_kv_b = in_b + W;
    char b[96];
    TRY(pack(ld, &w->pool_out, base, leaf_name(b, sizeof b, out, "weight"), W, W));
    TRY(keep(ld, &w->pool_out_w, base, b, 2, dWW));
    TRY(keep(ld, &w->pool_out_b, base, leaf_name(b, sizeof b, out, "bias"), 1, dW));
    TRY(keep(ld, &w->pool_ln_w, base, leaf_name(b, sizeof b, lnn, "weight"), 1, dW));
    TRY(keep(ld, &w->pool_ln_b, base, leaf_name(b, sizeof b, lnn, "bias"), 1, dW));
    TRY(pack(ld, &w->pool_fc, base, "mlp.fc1.weight", F, W));
    TRY(keep(ld, &w->pool_fc_b, base, "mlp.fc1.bias", 1, dF));
    TRY(pack(ld, &w->pool_proj, base, "mlp.fc2.weight", W, F));
    TRY(keep(ld, &w->pool_proj_b, base, "mlp.fc2.bias", 1, dW));
    /* pool_const = W_O (W_V beta + b_V) + b_O, in double */
    float *pc = (float *)malloc((size_t)W * sizeof(float));
    double *vb = (double *)malloc((size_t)W * sizeof(double));
    if (!pc || !vb || own(m, pc, (size_t)W)) {
        free(pc);
        free(vb);
        return pack_err(ld, "vision_model.head");
    }
    for (int o = 0; o < W; o++) {
        double acc = w->pool_kv_b[W + o];
        for (int j = 0; j < W; j++) acc += (double)w->pool_v_w[(size_t)o * W + j] * w->ln_post_b[j];
        vb[o] = acc;
    }
    for (int o = 0; o < W; o++) {
        double acc = w->pool_out_b[o];
        for (int j = 0; j < W; j++) acc += (double)w->pool_out_w[(size_t)o * W + j] * vb[j];
        pc[o] = (float)acc;
    }
    free(vb);
    w->pool_const = pc;
    return CD_OK;
}

static cd_status load_siglip_vision(loader *ld) {
    cd_model *m = ld->m;
    const cd_config *c = &m->cfg;
    const int W = c->width, P = c->patch_size, G = c->image_size / c->patch_size;
    const int64_t N = (int64_t)G * G;
    const int64_t dW[1] = {W}, dNW[2] = {N, W}, d1NW[3] = {1, N, W}, dconv[4] = {W, 3, P, P};
    const int oc = m->layout == CD_LAYOUT_OPEN_CLIP;
    cd_status st;
    const float *v;
    float *tmp;
    const char *pe = oc ? "visual.trunk.patch_embed.proj.weight"
                        : "vision_model.embeddings.patch_embedding.weight";
    char name[512];
    snprintf(name, sizeof name, "%s%s", ld->prefix, vision_key(ld, pe));
    const cd_st_tensor *t = cd_st_find(&m->file, name);
    int rc;
    if (t && t->ndim == 2 && !oc) {
        /* SigLIP 2 (Siglip2Model): a linear layer over patches flattened as (py, px, c); at
         * the native grid (image_size = P * sqrt(num_patches)) its position embeddings need no
         * resizing, so it is the conv (W, 3, P, P) with the weight reordered */
        const int64_t dlin[2] = {W, 3 * (int64_t)P * P};
        st = fetch(ld, "", pe, 2, dlin, &v, &tmp);
        if (st) return st;
        const size_t K = (size_t)3 * P * P;
        float *conv = (float *)malloc((size_t)W * K * sizeof(float));
        if (!conv) { free(tmp); return pack_err(ld, "patch embedding"); }
        for (size_t o = 0; o < (size_t)W; o++)
            for (int ch = 0; ch < 3; ch++)
                for (int py = 0; py < P; py++)
                    for (int px = 0; px < P; px++)
                        conv[o * K + ((size_t)ch * P + py) * P + px] =
                            v[o * K + ((size_t)py * P + px) * 3 + ch];
        free(tmp);
        release_last(ld);
        rc = cd_gemm_pack(&m->w.conv, conv, W, (int)K);
        free(conv);
    } else {
        st = fetch(ld, "", pe, 4, dconv, &v, &tmp);
        if (st) return st;
        rc = cd_gemm_pack(&m->w.conv, v, W, 3 * P * P);
        free(tmp);
        release_last(ld);
    }
    if (rc) return pack_err(ld, "patch embedding");
    TRY(keep(ld, &m->w.conv_b, "", oc ? "visual.trunk.patch_embed.proj.bias"
                                      : "vision_model.embeddings.patch_embedding.bias", 1, dW));
    if (oc) TRY(keep(ld, &m->w.pos, "", "visual.trunk.pos_embed", 3, d1NW));
    else TRY(keep(ld, &m->w.pos, "", "vision_model.embeddings.position_embedding.weight", 2, dNW));
    m->w.blocks = (cd_block *)calloc((size_t)c->layers, sizeof(cd_block));
    if (!m->w.blocks) return pack_err(ld, "blocks");
    for (int l = 0; l < c->layers; l++) {
        char base[96];
        snprintf(base, sizeof base, oc ? "visual.trunk.blocks.%d." : "vision_model.encoder.layers.%d.",
                 l);
        if (oc) TRY(load_fused_block(ld, &m->w.blocks[l], base, W, c->mlp_dim, 1, &TIMM_BLOCK));
        else TRY(load_block(ld, &m->w.blocks[l], base, W, c->mlp_dim, 1));
    }
    TRY(keep(ld, &m->w.ln_post_w, "", oc ? "visual.trunk.norm.weight"
                                         : "vision_model.post_layernorm.weight", 1, dW));
    TRY(keep(ld, &m->w.ln_post_b, "", oc ? "visual.trunk.norm.bias"
                                         : "vision_model.post_layernorm.bias", 1, dW));
    return load_siglip_head(ld);
}

static cd_status load_siglip_text(loader *ld) {
    cd_model *m = ld->m;
    const cd_config *c = &m->cfg;
    const int W = c->text_width, D = c->embed_dim;
    const int64_t dW[1] = {W}, dD[1] = {D}, dVW[2] = {c->vocab_size, W},
                  dCW[2] = {c->context_length, W};
    cd_status st;
    const int oc = m->layout == CD_LAYOUT_OPEN_CLIP;
    const char *tok = oc ? "text.token_embedding.weight"
                         : "text_model.embeddings.token_embedding.weight";
    char probe[512];
    snprintf(probe, sizeof probe, "%s%s", ld->prefix, tok);
    if (!cd_st_find(&m->file, probe)) {
        set_err(ld->err, "%s: tensor '%s' is missing: the file has no text tower; set "
                "text_layers to 0 for an image-only model", m->file.path, probe);
        return CD_ERR_MISSING;
    }
    TRY(keep(ld, &m->w.tok_emb, "", tok, 2, dVW));
    TRY(keep(ld, &m->w.tpos, "", oc ? "text.positional_embedding"
                                    : "text_model.embeddings.position_embedding.weight", 2, dCW));
    m->w.tblocks = (cd_block *)calloc((size_t)c->text_layers, sizeof(cd_block));
    if (!m->w.tblocks) return pack_err(ld, "text blocks");
    for (int l = 0; l < c->text_layers; l++) {
        char base[96];
        snprintf(base, sizeof base, oc ? "text.transformer.resblocks.%d."
                                       : "text_model.encoder.layers.%d.", l);
        TRY(load_block(ld, &m->w.tblocks[l], base, W, c->text_mlp_dim, 0));
    }
    TRY(keep(ld, &m->w.ln_final_w, "", oc ? "text.ln_final.weight"
                                          : "text_model.final_layer_norm.weight", 1, dW));
    TRY(keep(ld, &m->w.ln_final_b, "", oc ? "text.ln_final.bias"
                                          : "text_model.final_layer_norm.bias", 1, dW));
    TRY(pack(ld, &m->w.tproj, "", oc ? "text.text_projection.weight" : "text_model.head.weight",
             D, W));
    TRY(keep(ld, &m->w.tproj_b, "", oc ? "text.text_projection.bias" : "text_model.head.bias", 1,
             dD));
    return CD_OK;
}
#undef TRY

static cd_status check_config(const cd_config *c, const char *path, cd_error *err) {
    struct { const char *name; int v; } vis[] = {
        {"image_size", c->image_size}, {"patch_size", c->patch_size}, {"width", c->width},
        {"layers", c->layers}, {"heads", c->heads}, {"mlp_dim", c->mlp_dim},
        {"embed_dim", c->embed_dim}};
    for (size_t i = 0; i < sizeof vis / sizeof vis[0]; i++)
        if (vis[i].v <= 0 || vis[i].v > CD_MAX_DIM) {
            set_err(err, "%s: config %s = %d must be in [1, %d]", path, vis[i].name, vis[i].v,
                    CD_MAX_DIM);
            return CD_ERR_VALUE;
        }
    if (c->image_size < c->patch_size) {
        set_err(err, "%s: config image_size = %d is smaller than patch_size = %d", path,
                c->image_size, c->patch_size);
        return CD_ERR_VALUE;
    }
    /* SigLIP's patch convolution drops the last image_size % patch_size rows and columns
     * (so400m/14 at 384 pixels: a 27 x 27 grid over 378 of them); CLIP's sizes always divide */
    if (c->family != CD_FAMILY_SIGLIP && c->image_size % c->patch_size) {
        set_err(err, "%s: config image_size = %d is not a multiple of patch_size = %d", path,
                c->image_size, c->patch_size);
        return CD_ERR_VALUE;
    }
    int G = c->image_size / c->patch_size;
    if ((int64_t)G * G + 1 > CD_MAX_DIM) {
        set_err(err, "%s: config image_size / patch_size = %d gives too many tokens", path, G);
        return CD_ERR_VALUE;
    }
    if ((int64_t)3 * c->patch_size * c->patch_size > CD_MAX_DIM) {
        set_err(err, "%s: config patch_size = %d is too large", path, c->patch_size);
        return CD_ERR_VALUE;
    }
    if (c->width % c->heads) {
        set_err(err, "%s: config width = %d is not a multiple of heads = %d", path, c->width,
                c->heads);
        return CD_ERR_VALUE;
    }
    {
        /* strides handed to the GEMMs are ints */
        const int64_t N = 1 + (int64_t)G * G, W = c->width, F = c->mlp_dim;
        const int64_t big[] = {N * 3 * W, N * F, N * N, (int64_t)c->layers * W * W,
                               (int64_t)c->layers * N * N, (int64_t)c->heads * c->embed_dim,
                               (int64_t)c->layers * c->heads * W};
        for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
            if (big[i] > INT32_MAX) {
                set_err(err, "%s: config too large for this implementation (image_size %d, "
                        "patch_size %d, width %d, layers %d, heads %d, mlp_dim %d)", path,
                        c->image_size, c->patch_size, c->width, c->layers, c->heads, c->mlp_dim);
                return CD_ERR_VALUE;
            }
    }
    if (c->act != CD_ACT_GELU && c->act != CD_ACT_QUICK_GELU && c->act != CD_ACT_GELU_TANH) {
        set_err(err, "%s: config act = %d is none of gelu (0), quick_gelu (1), gelu_tanh (2)",
                path, c->act);
        return CD_ERR_VALUE;
    }
    if (c->family != CD_FAMILY_CLIP && c->family != CD_FAMILY_SIGLIP) {
        set_err(err, "%s: config family = %d is neither clip (0) nor siglip (1)", path, c->family);
        return CD_ERR_VALUE;
    }
    if (c->family == CD_FAMILY_SIGLIP && c->embed_dim != c->width) {
        set_err(err, "%s: config embed_dim = %d must equal width = %d for SigLIP (its image "
                "embedding is the pooling head's output, with no projection)", path,
                c->embed_dim, c->width);
        return CD_ERR_VALUE;
    }
    if (!(c->ln_eps > 0.0f) || !isfinite(c->ln_eps)) {
        set_err(err, "%s: config ln_eps = %g must be positive", path, (double)c->ln_eps);
        return CD_ERR_VALUE;
    }
    if (c->text_layers < 0) {
        set_err(err, "%s: config text_layers = %d must be >= 0", path, c->text_layers);
        return CD_ERR_VALUE;
    }
    if (c->text_layers == 0) return CD_OK;
    struct { const char *name; int v; } txt[] = {
        {"context_length", c->context_length}, {"vocab_size", c->vocab_size},
        {"text_width", c->text_width}, {"text_layers", c->text_layers},
        {"text_heads", c->text_heads}, {"text_mlp_dim", c->text_mlp_dim}};
    for (size_t i = 0; i < sizeof txt / sizeof txt[0]; i++)
        if (txt[i].v <= 0 || txt[i].v > (i == 1 ? INT32_MAX : CD_MAX_DIM)) {
            set_err(err, "%s: config %s = %d is out of range", path, txt[i].name, txt[i].v);
            return CD_ERR_VALUE;
        }
    if ((int64_t)c->context_length * 3 * c->text_width > INT32_MAX ||
        (int64_t)c->context_length * c->text_mlp_dim > INT32_MAX) {
        set_err(err, "%s: text config too large for this implementation", path);
        return CD_ERR_VALUE;
    }
    if (c->text_width % c->text_heads) {
        set_err(err, "%s: config text_width = %d is not a multiple of text_heads = %d", path,
                c->text_width, c->text_heads);
        return CD_ERR_VALUE;
    }
    if (c->text_act != CD_ACT_GELU && c->text_act != CD_ACT_QUICK_GELU &&
        c->text_act != CD_ACT_GELU_TANH) {
        set_err(err, "%s: config text_act = %d is none of gelu (0), quick_gelu (1), gelu_tanh (2)",
                path, c->text_act);
        return CD_ERR_VALUE;
    }
    return CD_OK;
}

cd_status cd_config_check(const cd_config *cfg, cd_error *err) {
    if (err) err->msg[0] = '\0';
    if (!cfg) {
        set_err(err, "cd_config_check: NULL argument");
        return CD_ERR_VALUE;
    }
    return check_config(cfg, "model config", err);
}

/* The key prefix under which `anchor` appears ("" or ending in '.'), or -1 if absent. */
static int find_prefix(const cd_st_file *f, const char *anchor, char *prefix, size_t cap) {
    size_t an = strlen(anchor);
    for (int i = 0; i < f->n_tensors; i++) {
        const char *name = f->tensors[i].name;
        size_t n = strlen(name);
        if (n < an || strcmp(name + n - an, anchor) != 0) continue;
        size_t pn = n - an;
        if (pn > 0 && name[pn - 1] != '.') continue;
        if (pn >= cap) continue;
        memcpy(prefix, name, pn);
        prefix[pn] = '\0';
        return 0;
    }
    return -1;
}

/* A block past the configured count means the config undercounts the layers: refuse rather
 * than silently run a truncated tower. */
static cd_status check_no_extra_block(loader *ld, int text) {
    const cd_model *m = ld->m;
    const int hf = m->layout == CD_LAYOUT_HF;
    const int n = text ? m->cfg.text_layers : m->cfg.layers;
    const int sg = m->cfg.family == CD_FAMILY_SIGLIP;
    char name[512];
    if (text)
        snprintf(name, sizeof name, hf ? "%stext_model.encoder.layers.%d.layer_norm1.weight"
                                    : sg ? "%stext.transformer.resblocks.%d.ln_1.weight"
                                         : "%stransformer.resblocks.%d.ln_1.weight", ld->prefix, n);
    else
        snprintf(name, sizeof name, hf ? (ld->bare_vision ? "%sencoder.layers.%d.layer_norm1.weight"
                                    : "%svision_model.encoder.layers.%d.layer_norm1.weight")
                                    : sg ? "%svisual.trunk.blocks.%d.norm1.weight"
                                         : "%svisual.transformer.resblocks.%d.ln_1.weight",
                 ld->prefix, n);
    if (!cd_st_find(&m->file, name)) return CD_OK;
    set_err(ld->err, "%s: config %s = %d, but the file has a block %d ('%s')", m->file.path,
            text ? "text_layers" : "layers", n, n, name);
    return CD_ERR_SHAPE;
}

static void free_block(cd_block *b) {
    cd_gemm_weight_free(&b->qkv);
    cd_gemm_weight_free(&b->out);
    cd_gemm_weight_free(&b->fc);
    cd_gemm_weight_free(&b->proj);
}

void cd_model_free(cd_model *m) {
    if (!m) return;
    if (m->w.blocks)
        for (int l = 0; l < m->cfg.layers; l++) free_block(&m->w.blocks[l]);
    if (m->w.tblocks)
        for (int l = 0; l < m->cfg.text_layers; l++) free_block(&m->w.tblocks[l]);
    free(m->w.blocks);
    free(m->w.tblocks);
    cd_gemm_weight_free(&m->w.conv);
    cd_gemm_weight_free(&m->w.proj);
    cd_gemm_weight_free(&m->w.tproj);
    cd_gemm_weight_free(&m->w.pool_kv);
    cd_gemm_weight_free(&m->w.pool_out);
    cd_gemm_weight_free(&m->w.pool_fc);
    cd_gemm_weight_free(&m->w.pool_proj);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->fold);
    pthread_mutex_destroy(&m->fold_lock);
    cd_st_close(&m->file);
    free(m);
}

cd_status cd_model_load(cd_model **out, const char *path, const cd_config *cfg, cd_layout layout,
                        cd_error *err) {
    return cd_model_load_as(out, path, cfg, layout, CD_PRECISION_FP32, err);
}

cd_status cd_model_load_as(cd_model **out, const char *path, const cd_config *cfg,
                           cd_layout layout, cd_precision precision, cd_error *err) {
    if (err) err->msg[0] = '\0';
    if (!out || !path || !cfg) {
        set_err(err, "cd_model_load: NULL argument");
        return CD_ERR_VALUE;
    }
    *out = NULL;
    cd_status st = check_config(cfg, path, err);
    if (st) return st;
    if (precision != CD_PRECISION_FP32 && precision != CD_PRECISION_BF16 &&
        precision != CD_PRECISION_BF16_EMULATED) {
        set_err(err, "%s: unknown precision %d", path, (int)precision);
        return CD_ERR_VALUE;
    }
    if (precision == CD_PRECISION_BF16 && !cd_cpu_has_bf16()) {
        set_err(err, "precision bf16 needs a CPU with AVX512_BF16 (and the avx512 path); this "
                "one runs '%s' without it: use bf16-emulated for the same numbers at fp32 speed",
                cd_isa_name());
        return CD_ERR_VALUE;
    }
    if (layout != CD_LAYOUT_AUTO && layout != CD_LAYOUT_OPEN_CLIP && layout != CD_LAYOUT_HF) {
        set_err(err, "%s: unknown layout %d", path, (int)layout);
        return CD_ERR_VALUE;
    }
    cd_model *m = (cd_model *)calloc(1, sizeof(cd_model));
    if (!m) {
        set_err(err, "%s: out of memory", path);
        return CD_ERR_NOMEM;
    }
    if (pthread_mutex_init(&m->fold_lock, NULL) != 0) {
        free(m);
        set_err(err, "%s: cannot create a mutex", path);
        return CD_ERR_NOMEM;
    }
    atomic_init(&m->fold_ready, 0);
    m->cfg = *cfg;
    st = cd_st_open(&m->file, path, err);
    if (st) { cd_model_free(m); return st; }

    const int siglip = cfg->family == CD_FAMILY_SIGLIP;
    const char *OC_ANCHOR = siglip ? "visual.trunk.attn_pool.latent" : "visual.class_embedding";
    const char *HF_ANCHOR = siglip ? "vision_model.head.probe"
                                   : "vision_model.embeddings.class_embedding";
    char prefix[256];
    int have_oc = find_prefix(&m->file, OC_ANCHOR, prefix, sizeof prefix) == 0;
    int bare = 0;
    if (siglip && layout != CD_LAYOUT_OPEN_CLIP && !have_oc &&
        find_prefix(&m->file, HF_ANCHOR, prefix, sizeof prefix) != 0 &&
        cd_st_find(&m->file, "head.probe") &&
        cd_st_find(&m->file, "embeddings.patch_embedding.weight")) {
        bare = 1;   /* transformers' SiglipVisionModel saved alone */
        layout = CD_LAYOUT_HF;
        prefix[0] = '\0';
    }
    if (bare) {
        if (cfg->text_layers > 0) {
            set_err(err, "%s: a SigLIP vision tower saved alone (no text tower): set "
                    "text_layers to 0", path);
            cd_model_free(m);
            return CD_ERR_MISSING;
        }
    } else if (layout == CD_LAYOUT_AUTO) {
        if (have_oc) {
            layout = CD_LAYOUT_OPEN_CLIP;
        } else if (find_prefix(&m->file, HF_ANCHOR, prefix, sizeof prefix) == 0) {
            layout = CD_LAYOUT_HF;
        } else {
            set_err(err, "%s: neither an open_clip nor a HF transformers %s checkpoint: no "
                    "tensor named '%s' or '%s' among its %d tensors", path,
                    siglip ? "SigLIP" : "CLIP", OC_ANCHOR, HF_ANCHOR, m->file.n_tensors);
            cd_model_free(m);
            return CD_ERR_MISSING;
        }
    } else {
        const char *anchor = layout == CD_LAYOUT_HF ? HF_ANCHOR : OC_ANCHOR;
        if (find_prefix(&m->file, anchor, prefix, sizeof prefix) != 0) {
            set_err(err, "%s: tensor '%s' is missing (%s layout)", path, anchor,
                    layout == CD_LAYOUT_HF ? "HF transformers" : "open_clip");
            cd_model_free(m);
            return CD_ERR_MISSING;
        }
    }
    m->layout = layout;
    loader ld = {m, prefix, err, bare, precision, NULL};
    st = siglip ? load_siglip_vision(&ld) : load_vision(&ld);
    if (!st) st = check_no_extra_block(&ld, 0);
    if (!st && cfg->text_layers > 0) st = siglip ? load_siglip_text(&ld) : load_text(&ld);
    if (!st && cfg->text_layers > 0) st = check_no_extra_block(&ld, 1);
    if (!st) {
        char name[512];
        snprintf(name, sizeof name, "%slogit_scale", prefix);
        const cd_st_tensor *t = cd_st_find(&m->file, name);
        if (t && t->numel == 1 &&
            (t->dtype == CD_DT_F32 || t->dtype == CD_DT_F16 || t->dtype == CD_DT_BF16)) {
            const float *v;
            float *tmp;
            st = cd_st_read_f32(&m->file, t, &v, &tmp, err);
            if (!st) {
                m->has_logit_scale = 1;
                m->logit_scale = v[0];
            }
            free(tmp);
        }
        snprintf(name, sizeof name, "%slogit_bias", prefix);
        t = cd_st_find(&m->file, name);
        if (!st && t && t->numel == 1 &&
            (t->dtype == CD_DT_F32 || t->dtype == CD_DT_F16 || t->dtype == CD_DT_BF16)) {
            const float *v;
            float *tmp;
            st = cd_st_read_f32(&m->file, t, &v, &tmp, err);
            if (!st) {
                m->has_logit_bias = 1;
                m->logit_bias = v[0];
            }
            free(tmp);
        }
    }
    if (st) {
        cd_model_free(m);
        return st;
    }
    /* every weight is now packed or copied: drop the mapping, so that the model no longer
     * depends on the file (rewriting or truncating it would otherwise crash a later call) */
    cd_st_close(&m->file);
    m->precision = precision;
#ifdef __GLIBC__
    malloc_trim(0);   /* hand the heap the loader's temporaries left back to the system */
#endif
    *out = m;
    return CD_OK;
}

static size_t weight_bytes(const cd_gemm_weight *w) {
    return w->packed_len * sizeof(float) + w->packed_bf16_len * sizeof(uint32_t);
}

size_t cd_model_nbytes(const cd_model *m) {
    size_t n = m->owned_bytes + weight_bytes(&m->w.conv) + weight_bytes(&m->w.proj) +
               weight_bytes(&m->w.tproj) + weight_bytes(&m->w.pool_kv) +
               weight_bytes(&m->w.pool_out) + weight_bytes(&m->w.pool_fc) +
               weight_bytes(&m->w.pool_proj);
    for (int t = 0; t < 2; t++) {
        const cd_block *blocks = t == 0 ? m->w.blocks : m->w.tblocks;
        const int L = t == 0 ? m->cfg.layers : m->cfg.text_layers;
        for (int l = 0; blocks && l < L; l++)
            n += weight_bytes(&blocks[l].qkv) + weight_bytes(&blocks[l].out) +
                 weight_bytes(&blocks[l].fc) + weight_bytes(&blocks[l].proj);
    }
    if (atomic_load_explicit(&((cd_model *)m)->fold_ready, memory_order_acquire))
        n += (size_t)m->cfg.layers * m->cfg.width * m->cfg.embed_dim * sizeof(float);
    return n;
}

const cd_config *cd_model_config(const cd_model *m) { return &m->cfg; }
cd_layout cd_model_layout(const cd_model *m) { return m->layout; }

int cd_model_logit_scale(const cd_model *m, float *log_scale) {
    if (!m->has_logit_scale) return 0;
    if (log_scale) *log_scale = m->logit_scale;
    return 1;
}

int cd_model_logit_bias(const cd_model *m, float *bias) {
    if (!m->has_logit_bias) return 0;
    if (bias) *bias = m->logit_bias;
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* precision: the four packed weights of every block (both towers) converted to bf16; the
 * patch embedding, the projections and everything the decomposition folds stay float32       */

int cd_has_bf16(void) { return cd_cpu_has_bf16(); }

cd_precision cd_model_precision(const cd_model *m) { return m->precision; }

cd_status cd_model_set_precision(cd_model *m, cd_precision p, cd_error *err) {
    if (p == m->precision) return CD_OK;
    if (m->precision != CD_PRECISION_FP32 ||
        (p != CD_PRECISION_BF16 && p != CD_PRECISION_BF16_EMULATED)) {
        set_err(err, "precision can only go from fp32 to bf16 or bf16-emulated, once (this "
                "model is %s; load the file again for another)",
                m->precision == CD_PRECISION_FP32 ? "fp32" : "bf16");
        return CD_ERR_VALUE;
    }
    if (p == CD_PRECISION_BF16 && !cd_cpu_has_bf16()) {
        set_err(err, "precision bf16 needs a CPU with AVX512_BF16 (and the avx512 path); this "
                "one runs '%s' without it: use bf16-emulated for the same numbers at fp32 speed",
                cd_isa_name());
        return CD_ERR_VALUE;
    }
    const int gp = p == CD_PRECISION_BF16 ? CD_GEMM_BF16 : CD_GEMM_BF16_EMULATED;
    for (int t = 0; t < 2; t++) {
        cd_block *blocks = t == 0 ? m->w.blocks : m->w.tblocks;
        const int L = t == 0 ? m->cfg.layers : m->cfg.text_layers;
        for (int l = 0; blocks && l < L; l++) {
            cd_gemm_weight *ws[4] = {&blocks[l].qkv, &blocks[l].out, &blocks[l].fc,
                                     &blocks[l].proj};
            for (int i = 0; i < 4; i++) {
                /* a failure part-way leaves a mixed model: say so, the caller drops it */
                if (ws[i]->precision == CD_GEMM_FP32 && cd_gemm_to_bf16(ws[i], gp) != 0) {
                    m->precision = p;
                    set_err(err, "out of memory converting the weights to bf16 (the model is "
                            "now unusable: load it again)");
                    return CD_ERR_NOMEM;
                }
            }
        }
    }
    m->precision = p;
    return CD_OK;
}

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
/* the image forward                                                                           */

/* Scratch of one chunk of Bc images. */
typedef struct {
    int Bc;
    float *x;          /* (Bc*N, W) residual stream */
    float *ln;         /* (Bc*N, W) LayerNorm output */
    float *qkv;        /* (Bc*N, 3W) */
    float *att;        /* (Bc*N, W) attention output; also the patch embeddings (Bc*G*G, W) */
    float *fc;         /* (Bc, max(N*F, 3*S*S)): MLP hidden (Bc*N, F); first the patches
                        * (Bc*G*G, 3*P*P) */
    float *mlp;        /* (Bc*N, W) MLP output */
    float *a0;         /* (Bc, H, N) class-token attention of the current layer */
    float *rows;       /* (Bc, W) gathered class rows */
    float *rows2;      /* (Bc, W) */
    float *stats;      /* (Bc, 3) mu, sigma, ||emb|| */
    float *heads_raw;  /* (Bc, L, H, W) */
    float *mlps_raw;   /* (Bc, L+1, W) */
    float *cls_raw;    /* (Bc, L, W) */
    float *const_rows; /* (Bc*L, W) the constant of the per-token terms, before the projection */
    float *tconst;     /* (Bc*L, D) ... after it */
    float *pconst;     /* (Bc*L, T) ... probed */
} vision_chunk;

/* Scratch shared by the chunks of one call. */
typedef struct {
    int nthreads;
    float *att_tiles;  /* (nthreads, min(N, CD_ATT_ROW_BLOCK), N) */
    float *av;         /* (nthreads, N, d) attention-weighted values of one head */
    float *probe_fold; /* (L, W, T) = F[l] @ probe^T */
    float *wo;         /* (W, W) the current layer's out-projection, unpacked from the one
                        * (packed) copy the model keeps */
} vision_call;

typedef struct {
    const cd_model *m;
    const cd_vision_opts *o;
    cd_vision_result *r;
    vision_chunk *ch;
    vision_call *call;
    int b0;            /* first image of the chunk in the batch */
} vision_ctx;

/* the decomposition's work while layer l's attention probabilities and values are in hand */
static void decompose_layer(vision_ctx *vc, int l) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_vision_opts *o = vc->o;
    vision_chunk *ch = vc->ch;
    const int Bc = ch->Bc, W = c->width, H = c->heads, d = W / H, L = c->layers;
    const int G = c->image_size / c->patch_size, N = 1 + G * G, D = c->embed_dim;
    const int T = o->n_probe;
    const cd_block *blk = &m->w.blocks[l];
    const size_t ldq = (size_t)3 * W;
    const float *out_w = vc->call->wo;
    if (o->heads || o->cls_to_cls) cd_gemm_unpack(&blk->out, vc->call->wo);

    if (o->heads) {
        /* c[b,l,h] = W_O[:, h-slice] @ z[b,l,h] + b_O / H with z = att[b, 0, h-slice] */
        for (int h = 0; h < H; h++)
            cd_sgemm_nt(Bc, W, d, 1.0f, ch->att + (size_t)h * d, N * W, out_w + (size_t)h * d,
                        W, ch->heads_raw + ((size_t)l * H + h) * W, L * H * W, 0);
        const float inv_h = 1.0f / (float)H;
        for (int b = 0; b < Bc; b++)
            for (int h = 0; h < H; h++) {
                float *row = ch->heads_raw + (((size_t)b * L + l) * H + h) * W;
                for (int w = 0; w < W; w++) row[w] += blk->out_b[w] * inv_h;
            }
    }
    if (o->cls_to_cls) {
        /* sum over heads of the class token's own term: W_O @ [a[h,0,0] v[h,0]]_h + b_O / N */
        for (int b = 0; b < Bc; b++) {
            const float *v0 = ch->qkv + (size_t)b * N * ldq + 2 * (size_t)W;
            float *t = ch->rows + (size_t)b * W;
            for (int h = 0; h < H; h++) {
                float a = ch->a0[((size_t)b * H + h) * N];
                for (int j = 0; j < d; j++) t[h * d + j] = a * v0[h * d + j];
            }
        }
        cd_sgemm_nt(Bc, W, W, 1.0f, ch->rows, W, out_w, W, ch->cls_raw + (size_t)l * W,
                    L * W, 0);
        const float inv_n = 1.0f / (float)N;
        for (int b = 0; b < Bc; b++) {
            float *row = ch->cls_raw + ((size_t)b * L + l) * W;
            for (int w = 0; w < W; w++) row[w] += blk->out_b[w] * inv_n;
        }
    }
    if (o->tokens || o->probe) {
        /* per (image, head): av[i] = a[h,0,i] v[h,i]; raw token terms av @ F[l,h] (and the
         * probe's av @ F[l,h] @ probe^T); scaled and shifted once sigma and ||emb|| are known */
        const float *fold = m->fold;
        #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(vc->call->nthreads)
        for (int b = 0; b < Bc; b++) {
            for (int h = 0; h < H; h++) {
#ifdef _OPENMP
                float *av = vc->call->av + (size_t)omp_get_thread_num() * N * d;
#else
                float *av = vc->call->av;
#endif
                const float *a = ch->a0 + ((size_t)b * H + h) * N;
                const float *v = ch->qkv + (size_t)b * N * ldq + 2 * (size_t)W + (size_t)h * d;
                for (int i = 0; i < N; i++)
                    for (int j = 0; j < d; j++) av[(size_t)i * d + j] = a[i] * v[i * ldq + j];
                const size_t img = (size_t)vc->b0 + b;
                if (o->tokens)
                    cd_sgemm_nn(N, D, d, 1.0f, av, d, fold + ((size_t)l * W + (size_t)h * d) * D, D,
                                vc->r->tokens + (((img * L + l) * N) * H + h) * D, H * D, 0);
                if (o->probe)
                    cd_sgemm_nn(N, T, d, 1.0f, av, d,
                                vc->call->probe_fold + ((size_t)l * W + (size_t)h * d) * T, T,
                                vc->r->probe_out + (((img * L + l) * N) * H + h) * T, H * T, 0);
            }
        }
    }
    if (o->attn)
        for (int b = 0; b < Bc; b++)
            memcpy(vc->r->attn_cls + (((size_t)vc->b0 + b) * L + l) * H * N,
                   ch->a0 + (size_t)b * H * N, (size_t)H * N * sizeof(float));
}

/* map the raw terms of the chunk through ln_post and proj, reference convention */
static void decompose_final(vision_ctx *vc) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_vision_opts *o = vc->o;
    vision_chunk *ch = vc->ch;
    cd_vision_result *r = vc->r;
    const int Bc = ch->Bc, W = c->width, H = c->heads, L = c->layers, D = c->embed_dim;
    const int G = c->image_size / c->patch_size, N = 1 + G * G, T = o->n_probe;
    const float K = (float)(2 * L + 1);
    const float *gamma = m->w.ln_post_w, *beta = m->w.ln_post_b;
    const size_t b0 = (size_t)vc->b0;

    struct { int want; float *raw; float *dst; int per_img; float k_inv; } maps[3] = {
        {o->heads, ch->heads_raw, r->heads, L * H, 1.0f / (K * H)},
        {o->mlps, ch->mlps_raw, r->mlps, L + 1, 1.0f / K},
        {o->cls_to_cls, ch->cls_raw, r->cls_to_cls, L, 1.0f / (K * N)},
    };
    for (int k = 0; k < 3; k++) {
        if (!maps[k].want) continue;
        const int R = maps[k].per_img;
        for (int b = 0; b < Bc; b++) {
            const float *s = ch->stats + 3 * (size_t)b;
            decomp_ln_rows(maps[k].raw + (size_t)b * R * W, (size_t)R, W, s[0], s[1], gamma, beta,
                           maps[k].k_inv);
        }
        float *dst = maps[k].dst + b0 * R * D;
        cd_matmul(dst, maps[k].raw, &m->w.proj, NULL, Bc * R, 0);
        for (int b = 0; b < Bc; b++) {
            const float nrm = ch->stats[3 * (size_t)b + 2];
            const float inv = nrm > 0.0f ? 1.0f / nrm : 0.0f;
            float *x = dst + (size_t)b * R * D;
            for (size_t i = 0; i < (size_t)R * D; i++) x[i] *= inv;
        }
    }
    if (!o->tokens && !o->probe) return;
    /* const(b, l) = ((b_O / (N H) - mu / (K N H)) gamma / sigma + beta / (K N H)) @ proj / ||emb|| */
    const float k_inv = 1.0f / (K * N * H), inv_nh = 1.0f / ((float)N * H);
    for (int b = 0; b < Bc; b++) {
        const float *s = ch->stats + 3 * (size_t)b;
        for (int l = 0; l < L; l++) {
            float *row = ch->const_rows + ((size_t)b * L + l) * W;
            const float *bo = m->w.blocks[l].out_b;
            for (int w = 0; w < W; w++) row[w] = bo[w] * inv_nh;
        }
        decomp_ln_rows(ch->const_rows + (size_t)b * L * W, (size_t)L, W, s[0], s[1], gamma, beta,
                       k_inv);
    }
    cd_matmul(ch->tconst, ch->const_rows, &m->w.proj, NULL, Bc * L, 0);
    for (int b = 0; b < Bc; b++) {
        const float nrm = ch->stats[3 * (size_t)b + 2];
        const float inv = nrm > 0.0f ? 1.0f / nrm : 0.0f;
        for (size_t i = 0; i < (size_t)L * D; i++) ch->tconst[(size_t)b * L * D + i] *= inv;
    }
    if (o->probe)
        cd_sgemm_nt(Bc * L, T, D, 1.0f, ch->tconst, D, o->probe, D, ch->pconst, T, 0);
    for (int b = 0; b < Bc; b++) {
        const float *s = ch->stats + 3 * (size_t)b;
        const float den = s[1] * s[2];
        const float scale = den > 0.0f ? 1.0f / den : 0.0f;
        for (int l = 0; l < L; l++) {
            const size_t bl = (b0 + b) * L + l;
            if (o->tokens)
                scale_shift_rows(r->tokens + bl * N * H * D, (size_t)N * H, D, D, scale,
                                 ch->tconst + ((size_t)b * L + l) * D);
            if (o->probe)
                scale_shift_rows(r->probe_out + bl * N * H * T, (size_t)N * H, T, T, scale,
                                 ch->pconst + ((size_t)b * L + l) * T);
        }
    }
}

/* images (Bc, 3, S, S) of the chunk starting at vc->b0 */
static cd_status vision_forward_chunk(vision_ctx *vc, const float *images) {
    const cd_model *m = vc->m;
    const cd_config *c = &m->cfg;
    const cd_weights *w = &m->w;
    const cd_vision_opts *o = vc->o;
    vision_chunk *ch = vc->ch;
    const int Bc = ch->Bc, W = c->width, H = c->heads, L = c->layers, F = c->mlp_dim;
    const int S = c->image_size, P = c->patch_size, G = S / P, N = 1 + G * G, D = c->embed_dim;
    const int R = Bc * N;
    const size_t RW = (size_t)R * W;

    /* embeddings: x = [cls ; patches @ conv^T] + pos, then ln_pre */
    patches_forward(ch->fc, images, Bc, S, P);
    cd_matmul(ch->att, ch->fc, &w->conv, NULL, Bc * G * G, 0);
    vision_embed_forward(ch->x, ch->att, w->class_emb, w->pos, Bc, N, W);
    layernorm_forward(ch->x, NULL, NULL, ch->x, w->ln_pre_w, w->ln_pre_b, R, W, c->ln_eps);
    if (o->mlps)
        for (int b = 0; b < Bc; b++)
            memcpy(ch->mlps_raw + (size_t)b * (L + 1) * W, ch->x + (size_t)b * N * W,
                   (size_t)W * sizeof(float));

    for (int l = 0; l < L; l++) {
        if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;
        const cd_block *blk = &w->blocks[l];
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_RESIDUAL, l, vc->b0, Bc, ch->x);
        /* x += out_proj(MHA(ln_1(x))) */
        layernorm_forward(ch->ln, NULL, NULL, ch->x, blk->ln1_w, blk->ln1_b, R, W, c->ln_eps);
        cd_matmul(ch->qkv, ch->ln, &blk->qkv, blk->qkv_b, R, 0);
        attention_forward(ch->att, ch->a0, (size_t)H * N,
                          o->attn ? vc->r->attn_mean + ((size_t)vc->b0 * L + l) * N * N : NULL,
                          (size_t)L * N * N, ch->qkv, Bc, N, W, H, 0, vc->call->att_tiles,
                          vc->call->nthreads);
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_ATTN_CLS, l, vc->b0, Bc, ch->a0);
        decompose_layer(vc, l);
        cd_matmul(ch->x, ch->att, &blk->out, blk->out_b, R, 1);
        /* x += c_proj(act(c_fc(ln_2(x)))) */
        layernorm_forward(ch->ln, NULL, NULL, ch->x, blk->ln2_w, blk->ln2_b, R, W, c->ln_eps);
        cd_matmul(ch->fc, ch->ln, &blk->fc, blk->fc_b, R, 0);
        act_forward(ch->fc, (size_t)R * F, c->act);
        if (o->capture) o->capture(o->capture_ctx, CD_CAPTURE_MLP_ACT, l, vc->b0, Bc, ch->fc);
        cd_matmul(ch->mlp, ch->fc, &blk->proj, blk->proj_b, R, 0);
        if (o->mlps)
            for (int b = 0; b < Bc; b++)
                memcpy(ch->mlps_raw + ((size_t)b * (L + 1) + l + 1) * W, ch->mlp + (size_t)b * N * W,
                       (size_t)W * sizeof(float));
        residual_forward(ch->x, ch->mlp, RW);
    }

    /* emb = ln_post(x[0]) @ proj; ln_stats = (mu, sigma, ||emb||) */
    for (int b = 0; b < Bc; b++)
        memcpy(ch->rows + (size_t)b * W, ch->x + (size_t)b * N * W, (size_t)W * sizeof(float));
    cd_vision_result *r = vc->r;
    float *emb = r->embedding + (size_t)vc->b0 * D;
    for (int b = 0; b < Bc; b++) {
        float mean, sigma;
        layernorm_forward(ch->rows2 + (size_t)b * W, &mean, &sigma, ch->rows + (size_t)b * W,
                          w->ln_post_w, w->ln_post_b, 1, W, c->ln_eps);
        ch->stats[3 * (size_t)b] = mean;
        ch->stats[3 * (size_t)b + 1] = sigma;
    }
    cd_matmul(emb, ch->rows2, &w->proj, NULL, Bc, 0);
    if (o->token_embeddings) {  /* every token through ln_post and proj (ch->ln is free now) */
        layernorm_forward(ch->ln, NULL, NULL, ch->x, w->ln_post_w, w->ln_post_b, R, W, c->ln_eps);
        cd_matmul(r->token_embeddings + (size_t)vc->b0 * N * D, ch->ln, &w->proj, NULL, R, 0);
    }
    for (int b = 0; b < Bc; b++) {
        double s = 0.0;
        for (int j = 0; j < D; j++) s += (double)emb[(size_t)b * D + j] * emb[(size_t)b * D + j];
        ch->stats[3 * (size_t)b + 2] = (float)sqrt(s);
        memcpy(r->ln_stats + 3 * ((size_t)vc->b0 + b), ch->stats + 3 * (size_t)b,
               3 * sizeof(float));
    }
    decompose_final(vc);
    return CD_OK;
}

void cd_vision_result_free(cd_vision_result *r) {
    if (!r) return;
    free(r->block);
    free(r);
}

/* The scratch arrays of a chunk of Bc images, as plan items (returns how many, -1 on overflow). */
static int chunk_plan(vision_chunk *ch, plan_item *it, const cd_config *c, const cd_vision_opts *o,
                      size_t Bc) {
    const size_t W = (size_t)c->width, H = (size_t)c->heads, L = (size_t)c->layers;
    const size_t F = (size_t)c->mlp_dim, D = (size_t)c->embed_dim, T = (size_t)o->n_probe;
    const size_t S = (size_t)c->image_size, G = S / (size_t)c->patch_size, N = 1 + G * G;
    const size_t fcw = F * N > 3 * S * S ? F * N : 3 * S * S;  /* MLP hidden, or the patches */
    const int tok = o->tokens || o->probe;
    struct { float **dst; size_t a, b, cc; int on; } spec[] = {
        {&ch->x, Bc, N, W, 1},          {&ch->ln, Bc, N, W, 1},
        {&ch->qkv, Bc, N, 3 * W, 1},    {&ch->att, Bc, N, W, 1},
        {&ch->fc, Bc, fcw, 1, 1},       {&ch->mlp, Bc, N, W, 1},
        {&ch->a0, Bc, H, N, 1},         {&ch->rows, Bc, W, 1, 1},
        {&ch->rows2, Bc, W, 1, 1},      {&ch->stats, Bc, 3, 1, 1},
        {&ch->heads_raw, Bc, L * H, W, o->heads},
        {&ch->mlps_raw, Bc, L + 1, W, o->mlps},
        {&ch->cls_raw, Bc, L, W, o->cls_to_cls},
        {&ch->const_rows, Bc, L, W, tok}, {&ch->tconst, Bc, L, D, tok},
        {&ch->pconst, Bc, L, T, o->probe != NULL},
    };
    int k = 0;
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        if (!spec[i].on) continue;
        if (mul3(&it[k].n, spec[i].a, spec[i].b, spec[i].cc)) return -1;
        it[k++].dst = spec[i].dst;
    }
    return k;
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
 * The per-token attention outputs and MLP outputs of every layer are kept (chunk scratch)
 * until p and sigma are known at the end.                                                     */

typedef struct {
    int Bc;
    float *x, *ln, *qkv, *att, *fc, *mlp;  /* as vision_chunk (N = G*G tokens) */
    float *tiles;      /* (nthreads, min(N, CD_ATT_ROW_BLOCK), N) attention score tiles */
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
    int nthr;
    float *av;         /* (N, d) p-weighted values of one head (pool_tokens) */
    float *c;          /* (H, N) p / sigma of one image */
    float *u;          /* (R, H, W) R = L+1 + L*H raw rows, per pooling head */
    float *zu;         /* (R, W) */
    float *y;          /* (R, W) */
} siglip_chunk;

/* one thread's share of the per-thread scratch */
typedef struct { float *av, *c, *u, *zu, *y; } siglip_scratch;

static siglip_scratch siglip_thread_scratch(const siglip_chunk *ch, const cd_config *cf, int t) {
    const size_t W = (size_t)cf->width, H = (size_t)cf->heads, L = (size_t)cf->layers;
    const size_t G = (size_t)(cf->image_size / cf->patch_size), N = G * G, d = W / H;
    const size_t R = L + 1 + L * H, ts = (size_t)t;
    siglip_scratch sc = {ch->av + ts * N * d, ch->c ? ch->c + ts * H * N : NULL,
                         ch->u ? ch->u + ts * R * H * W : NULL,
                         ch->zu ? ch->zu + ts * R * W : NULL, ch->y ? ch->y + ts * R * W : NULL};
    return sc;
}

static int siglip_chunk_plan(siglip_chunk *ch, plan_item *it, const cd_config *c, int deep,
                             int nthreads, int nthr, size_t Bc) {
    const size_t W = (size_t)c->width, H = (size_t)c->heads, L = (size_t)c->layers;
    const size_t F = (size_t)c->mlp_dim, S = (size_t)c->image_size, G = S / (size_t)c->patch_size;
    const size_t N = G * G, d = W / H, R = L + 1 + L * H, T = (size_t)nthr;
    const size_t fcw = F * N > 3 * S * S ? F * N : 3 * S * S;
    const size_t rows = N < CD_ATT_ROW_BLOCK ? N : CD_ATT_ROW_BLOCK;
    struct { float **dst; size_t a, b, cc; int on; } spec[] = {
        {&ch->x, Bc, N, W, 1}, {&ch->ln, Bc, N, W, 1}, {&ch->qkv, Bc, N, 3 * W, 1},
        {&ch->att, Bc, N, W, 1}, {&ch->fc, Bc, fcw, 1, 1}, {&ch->mlp, Bc, N, W, 1},
        {&ch->tiles, (size_t)nthreads, rows, N, 1}, {&ch->p, Bc, H, N, 1},
        {&ch->mu, Bc, N, 1, 1}, {&ch->sigma, Bc, N, 1, 1}, {&ch->z, Bc, W, 1, 1},
        {&ch->a, Bc, W, 1, 1}, {&ch->aln, Bc, W, 1, 1}, {&ch->pmlp, Bc, W, 1, 1},
        {&ch->pfc, Bc, F, 1, 1}, {&ch->keep, Bc, (2 * L + 1) * N, W, deep},
        {&ch->av, T, N, d, 1}, {&ch->c, T, H, N, deep}, {&ch->u, T, R * H, W, deep},
        {&ch->zu, T, R, W, deep}, {&ch->y, T, R, W, deep},
    };
    ch->nthr = nthr;
    int k = 0;
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        if (!spec[i].on) continue;
        if (mul3(&it[k].n, spec[i].a, spec[i].b, spec[i].cc)) return -1;
        it[k++].dst = spec[i].dst;
    }
    return k;
}

/* the deep terms of image b of the chunk into heads (L, H, D) and mlps (L+1, D) of the result
 * (either may be NULL: not wanted) */
static void siglip_deep(const cd_model *m, const siglip_chunk *ch, const siglip_scratch *sc,
                        int b, float *heads, float *mlps, float inv_norm) {
    const cd_config *cf = &m->cfg;
    const cd_weights *w = &m->w;
    const int W = cf->width, H = cf->heads, L = cf->layers, d = W / H;
    const int G = cf->image_size / cf->patch_size, N = G * G, R = L + 1 + L * H;
    const float K = (float)(2 * L + 1);
    const size_t NW = (size_t)N * W, HW = (size_t)H * W;
    const float *keep = ch->keep + (size_t)b * (2 * L + 1) * NW;
    const float *p = ch->p + (size_t)b * H * N, *mu = ch->mu + (size_t)b * N;
    const float *sigma = ch->sigma + (size_t)b * N;
    double csum[1024], cmu[1024];  /* H <= W <= CD_MAX_DIM; H > 1024 is refused below */
    for (int h = 0; h < H; h++) {
        double s = 0.0, sm = 0.0;
        for (int i = 0; i < N; i++) {
            const float ci = p[(size_t)h * N + i] / sigma[i];
            sc->c[(size_t)h * N + i] = ci;
            s += ci;
            sm += (double)ci * mu[i];
        }
        csum[h] = s;
        cmu[h] = sm;
    }
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
        float *zc = sc->zu;
        cd_sgemm_nn(H, W, N, 1.0f, sc->c, N, keep + (size_t)(L + 1 + l) * NW, W, zc, W, 0);
        for (int hp = 0; hp < H; hp++) {
            float *u = sc->u + (size_t)(L + 1 + l * H + hp) * HW;
            cd_sgemm_nt(H, W, d, 1.0f, zc + (size_t)hp * d, W, blk->out_w + (size_t)hp * d, W,
                        u, W, 0);
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
    for (int h = 0; h < H; h++)
        cd_sgemm_nt(R, d, W, 1.0f, sc->u + (size_t)h * W, H * W, w->pool_v_w + (size_t)h * d * W,
                    W, sc->zu + (size_t)h * d, W, 0);
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

static cd_status siglip_forward_chunk(const cd_model *m, const cd_vision_opts *o,
                                      cd_vision_result *r, siglip_chunk *ch, int nthreads,
                                      int b0, const float *images) {
    const cd_config *c = &m->cfg;
    const cd_weights *w = &m->w;
    const int Bc = ch->Bc, W = c->width, H = c->heads, L = c->layers, F = c->mlp_dim;
    const int S = c->image_size, P = c->patch_size, G = S / P, N = G * G, d = W / H;
    const int R = Bc * N, deep = o->heads || o->mlps;
    const size_t RW = (size_t)R * W, NW = (size_t)N * W, KN = (size_t)(2 * L + 1) * NW;

    /* x = patches @ conv^T + conv_b + pos */
    patches_forward(ch->fc, images, Bc, S, P);
    cd_matmul(ch->x, ch->fc, &w->conv, w->conv_b, R, 0);
    for (int b = 0; b < Bc; b++) residual_forward(ch->x + (size_t)b * NW, w->pos, NW);
    if (deep)
        for (int b = 0; b < Bc; b++)
            memcpy(ch->keep + (size_t)b * KN, ch->x + (size_t)b * NW, NW * sizeof(float));
    for (int l = 0; l < L; l++) {
        if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;
        const cd_block *blk = &w->blocks[l];
        layernorm_forward(ch->ln, NULL, NULL, ch->x, blk->ln1_w, blk->ln1_b, R, W, c->ln_eps);
        cd_matmul(ch->qkv, ch->ln, &blk->qkv, blk->qkv_b, R, 0);
        attention_forward(ch->att, NULL, 0, NULL, 0, ch->qkv, Bc, N, W, H, 0, ch->tiles, nthreads);
        if (deep)
            for (int b = 0; b < Bc; b++)
                memcpy(ch->keep + (size_t)b * KN + (size_t)(L + 1 + l) * NW,
                       ch->att + (size_t)b * NW, NW * sizeof(float));
        cd_matmul(ch->x, ch->att, &blk->out, blk->out_b, R, 1);
        layernorm_forward(ch->ln, NULL, NULL, ch->x, blk->ln2_w, blk->ln2_b, R, W, c->ln_eps);
        cd_matmul(ch->fc, ch->ln, &blk->fc, blk->fc_b, R, 0);
        act_forward(ch->fc, (size_t)R * F, c->act);
        cd_matmul(ch->mlp, ch->fc, &blk->proj, blk->proj_b, R, 0);
        if (deep)
            for (int b = 0; b < Bc; b++)
                memcpy(ch->keep + (size_t)b * KN + (size_t)(1 + l) * NW,
                       ch->mlp + (size_t)b * NW, NW * sizeof(float));
        residual_forward(ch->x, ch->mlp, RW);
    }
    if (o->cancel && o->cancel(o->cancel_ctx)) return CD_ERR_INTERRUPTED;

    /* post_layernorm over every token, then the pooling attention: k | v = y @ [W_K; W_V]^T */
    layernorm_forward(ch->ln, ch->mu, ch->sigma, ch->x, w->ln_post_w, w->ln_post_b, R, W,
                      c->ln_eps);
    cd_matmul(ch->qkv, ch->ln, &w->pool_kv, w->pool_kv_b, R, 0);   /* (R, 2W) */
    const float scale = 1.0f / sqrtf((float)d);
    const size_t ld = (size_t)2 * W;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < Bc; b++)
        for (int h = 0; h < H; h++) {
            float *p = ch->p + ((size_t)b * H + h) * N;
            const float *q = w->pool_q + (size_t)h * d;
            const float *k = ch->qkv + (size_t)b * N * ld + (size_t)h * d;
            for (int i = 0; i < N; i++) {
                float s = 0.0f;
                for (int j = 0; j < d; j++) s += q[j] * k[(size_t)i * ld + j];
                p[i] = s * scale;
            }
            softmax_forward(p, N, N);
            const float *v = k + W;
            float *z = ch->z + (size_t)b * W + (size_t)h * d;
            for (int j = 0; j < d; j++) z[j] = 0.0f;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < d; j++) z[j] += p[i] * v[(size_t)i * ld + j];
        }
    /* a = z @ W_O^T + b_O; emb = a + fc2(act(fc1(LN(a)))) */
    cd_matmul(ch->a, ch->z, &w->pool_out, w->pool_out_b, Bc, 0);
    layernorm_forward(ch->aln, NULL, NULL, ch->a, w->pool_ln_w, w->pool_ln_b, Bc, W, c->ln_eps);
    cd_matmul(ch->pfc, ch->aln, &w->pool_fc, w->pool_fc_b, Bc, 0);
    act_forward(ch->pfc, (size_t)Bc * F, c->act);
    cd_matmul(ch->pmlp, ch->pfc, &w->pool_proj, w->pool_proj_b, Bc, 0);

    /* per image, in parallel: every product below runs on one thread inside the region */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(ch->nthr)
    for (int b = 0; b < Bc; b++) {
#ifdef _OPENMP
        const siglip_scratch sc = siglip_thread_scratch(ch, c, omp_get_thread_num());
#else
        const siglip_scratch sc = siglip_thread_scratch(ch, c, 0);
#endif
        const size_t img = (size_t)b0 + b;
        float *emb = r->embedding + img * W;
        double s = 0.0;
        for (int j = 0; j < W; j++) {
            emb[j] = ch->a[(size_t)b * W + j] + ch->pmlp[(size_t)b * W + j];
            s += (double)emb[j] * emb[j];
        }
        const float nrm = (float)sqrt(s), inv = nrm > 0.0f ? 1.0f / nrm : 0.0f;
        r->ln_stats[3 * img] = 0.0f;
        r->ln_stats[3 * img + 1] = 0.0f;
        r->ln_stats[3 * img + 2] = nrm;
        memcpy(r->pool_attn + img * H * N, ch->p + (size_t)b * H * N, (size_t)H * N * sizeof(float));
        for (int j = 0; j < W; j++) r->pool_mlp[img * W + j] = ch->pmlp[(size_t)b * W + j] * inv;
        /* pool_heads[h] = (W_O[:, h] z_h + b_O / H) / ||emb|| */
        float *ph = r->pool_heads + img * H * W;
        for (int h = 0; h < H; h++)
            cd_sgemm_nt(1, W, d, inv, ch->z + (size_t)b * W + (size_t)h * d, W,
                        w->pool_out_w + (size_t)h * d, W, ph + (size_t)h * W, W, 0);
        for (int h = 0; h < H; h++)
            for (int j = 0; j < W; j++) ph[(size_t)h * W + j] += w->pool_out_b[j] * inv / H;
        if (o->pool_tokens) {
            /* pool_tokens[i, h] = (p[h,i] W_O[:, h] v_h(y_i) + b_O / (N H)) / ||emb|| */
            float *pt = r->pool_tokens + img * (size_t)N * H * W;
            for (int h = 0; h < H; h++) {
                const float *p = ch->p + ((size_t)b * H + h) * N;
                const float *v = ch->qkv + (size_t)b * N * ld + W + (size_t)h * d;
                for (int i = 0; i < N; i++)
                    for (int j = 0; j < d; j++) sc.av[(size_t)i * d + j] = p[i] * v[i * ld + j];
                cd_sgemm_nt(N, W, d, inv, sc.av, d, w->pool_out_w + (size_t)h * d, W,
                            pt + (size_t)h * W, H * W, 0);
            }
            const float sh = inv / ((float)N * H);
            for (size_t t = 0; t < (size_t)N * H; t++)
                for (int j = 0; j < W; j++) pt[t * W + j] += w->pool_out_b[j] * sh;
        }
        if (deep)
            siglip_deep(m, ch, &sc, b, o->heads ? r->heads + img * (size_t)L * H * W : NULL,
                        o->mlps ? r->mlps + img * (size_t)(L + 1) * W : NULL, inv);
    }
    return CD_OK;
}

static cd_status siglip_encode_image(const cd_model *m, const float *images, int B,
                                     const cd_vision_opts *o, cd_vision_result **out,
                                     cd_error *err, size_t budget) {
    const cd_config *c = &m->cfg;
    const int W = c->width, H = c->heads, L = c->layers, D = c->embed_dim;
    const int S = c->image_size, G = S / c->patch_size, N = G * G;
    if (o->cls_to_cls || o->tokens || o->probe || o->n_probe || o->attn) {
        set_err(err, "SigLIP has no class token: cls_to_cls, tokens, probe and attn are not "
                "offered (use pool_tokens for the pooling head's per-token terms, heads / mlps "
                "for the deep terms)");
        return CD_ERR_VALUE;
    }
    if (H > 1024 && (o->heads || o->mlps)) {
        set_err(err, "the deep decomposition supports at most 1024 heads, this model has %d", H);
        return CD_ERR_VALUE;
    }
    cd_status st = check_images(images, B, S, err);
    if (st) return st;
    cd_vision_result *r = (cd_vision_result *)calloc(1, sizeof(cd_vision_result));
    if (!r) {
        set_err(err, "out of memory");
        return CD_ERR_NOMEM;
    }
    r->B = B; r->L = L; r->H = H; r->N = N; r->D = D; r->T = 0; r->W = W;
    const size_t Bs = (size_t)B, Ls = (size_t)L, Hs = (size_t)H, Ns = (size_t)N, Ds = (size_t)D;
    struct { float **dst; size_t a, b, cc, e; int on; } rs[] = {
        {&r->embedding, Bs, Ds, 1, 1, 1}, {&r->ln_stats, Bs, 3, 1, 1, 1},
        {&r->heads, Bs, Ls, Hs, Ds, o->heads}, {&r->mlps, Bs, Ls + 1, Ds, 1, o->mlps},
        {&r->pool_heads, Bs, Hs, Ds, 1, 1}, {&r->pool_tokens, Bs, Ns, Hs, Ds, o->pool_tokens},
        {&r->pool_mlp, Bs, Ds, 1, 1, 1}, {&r->pool_attn, Bs, Hs, Ns, 1, 1},
    };
    plan_item items[8];
    int k = 0;
    for (size_t i = 0; i < sizeof rs / sizeof rs[0]; i++) {
        if (!rs[i].on) continue;
        size_t t;
        if (mul3(&t, rs[i].a, rs[i].b, rs[i].cc) || mul_sz(&items[k].n, t, rs[i].e)) {
            free(r);
            set_err(err, "the requested outputs for %d images are too large", B);
            return CD_ERR_NOMEM;
        }
        items[k++].dst = rs[i].dst;
    }
    r->block = plan_alloc(items, k, &r->block_bytes);
    if (!r->block) {
        free(r);
        set_err(err, "out of memory for the outputs of %d images", B);
        return CD_ERR_NOMEM;
    }
    if (B == 0) {
        *out = r;
        return CD_OK;
    }
    int prev_threads = push_threads(o->threads);
    const int nthreads = max_threads(), deep = o->heads || o->mlps;
    siglip_chunk ch;
    memset(&ch, 0, sizeof ch);
    void *block = NULL;
    plan_item ci[24];
    int nc = siglip_chunk_plan(&ch, ci, c, deep, nthreads, 1, 1);
    size_t per_image = 0;
    for (int i = 0; nc > 0 && i < nc; i++) {
        if (per_image > SIZE_MAX / 8 - ci[i].n) { nc = -1; break; }
        per_image += ci[i].n + CD_ALIGN / sizeof(float);
    }
    if (nc > 0) {
        size_t Bc = budget / (per_image * sizeof(float));
        if (Bc < 1) Bc = 1;
        if (Bc > (size_t)B) Bc = (size_t)B;
        if (Bc > (size_t)INT32_MAX / (Ns + 1)) Bc = (size_t)INT32_MAX / (Ns + 1);
        ch.Bc = (int)Bc;
        /* per-image work runs on min(threads, Bc) threads, each with its own scratch */
        nc = siglip_chunk_plan(&ch, ci, c, deep, nthreads,
                               (int)(Bc < (size_t)nthreads ? Bc : (size_t)nthreads), Bc);
        if (nc > 0) block = plan_alloc(ci, nc, NULL);
    }
    if (!block) {
        st = CD_ERR_NOMEM;
        set_err(err, "out of memory for the scratch of %d images", B);
    }
    for (int b0 = 0; !st && b0 < B; b0 += ch.Bc) {
        const int Bfull = ch.Bc;
        if (B - b0 < ch.Bc) ch.Bc = B - b0;
        st = siglip_forward_chunk(m, o, r, &ch, nthreads, b0, images + (size_t)b0 * 3 * S * S);
        ch.Bc = Bfull;
        if (st) set_err(err, "interrupted");
    }
    free(block);
    pop_threads(o->threads, prev_threads);
    if (st) {
        cd_vision_result_free(r);
        return st;
    }
    *out = r;
    return CD_OK;
}

static cd_status encode_image_impl(const cd_model *m, const float *images, int B,
                                   const cd_vision_opts *opts_in, cd_vision_result **out,
                                   cd_error *err, size_t budget) {
    if (err) err->msg[0] = '\0';
    if (!m || !out) {
        set_err(err, "cd_encode_image: NULL argument");
        return CD_ERR_VALUE;
    }
    *out = NULL;
    cd_vision_opts none;
    memset(&none, 0, sizeof none);
    const cd_vision_opts *o = opts_in ? opts_in : &none;
    if (m->cfg.family == CD_FAMILY_SIGLIP)
        return siglip_encode_image(m, images, B, o, out, err, budget);
    if (o->pool_tokens) {
        set_err(err, "pool_tokens is a SigLIP output; this is a CLIP model (use tokens)");
        return CD_ERR_VALUE;
    }
    const cd_config *c = &m->cfg;
    const int W = c->width, H = c->heads, L = c->layers, D = c->embed_dim, d = W / H;
    const int S = c->image_size, G = S / c->patch_size, N = 1 + G * G;
    cd_status st = check_images(images, B, S, err);
    if (st) return st;
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
    if (o->probe) {
        for (size_t i = 0; i < (size_t)T * D; i++)
            if (!isfinite(o->probe[i])) {
                set_err(err, "probe contains a non-finite value at index [%zu, %zu]", i / D, i % D);
                return CD_ERR_VALUE;
            }
    }

    /* the result block */
    cd_vision_result *r = (cd_vision_result *)calloc(1, sizeof(cd_vision_result));
    if (!r) {
        set_err(err, "out of memory");
        return CD_ERR_NOMEM;
    }
    r->B = B; r->L = L; r->H = H; r->N = N; r->D = D; r->T = T; r->W = W;
    const size_t Bs = (size_t)B, Ls = (size_t)L, Hs = (size_t)H, Ns = (size_t)N, Ds = (size_t)D;
    struct { float **dst; size_t a, b, cc, e; int on; } rs[] = {
        {&r->embedding, Bs, Ds, 1, 1, 1},       {&r->ln_stats, Bs, 3, 1, 1, 1},
        {&r->heads, Bs, Ls, Hs, Ds, o->heads},  {&r->mlps, Bs, Ls + 1, Ds, 1, o->mlps},
        {&r->cls_to_cls, Bs, Ls, Ds, 1, o->cls_to_cls},
        {&r->tokens, Bs, Ls, Ns, Hs * Ds, o->tokens},
        {&r->probe_out, Bs, Ls, Ns, Hs * (size_t)T, o->probe != NULL},
        {&r->attn_cls, Bs, Ls, Hs, Ns, o->attn}, {&r->attn_mean, Bs, Ls, Ns, Ns, o->attn},
        {&r->token_embeddings, Bs, Ns, Ds, 1, o->token_embeddings},
    };
    plan_item items[16];
    int k = 0;
    for (size_t i = 0; i < sizeof rs / sizeof rs[0]; i++) {
        if (!rs[i].on) continue;
        size_t t;
        if (mul3(&t, rs[i].a, rs[i].b, rs[i].cc) || mul_sz(&items[k].n, t, rs[i].e)) {
            free(r);
            set_err(err, "the requested outputs for %d images are too large", B);
            return CD_ERR_NOMEM;
        }
        items[k++].dst = rs[i].dst;
    }
    r->block = plan_alloc(items, k, &r->block_bytes);
    if (!r->block) {
        free(r);
        set_err(err, "out of memory for the outputs of %d images", B);
        return CD_ERR_NOMEM;
    }
    if (B == 0) {
        *out = r;
        return CD_OK;
    }

    int prev_threads = push_threads(o->threads);
    vision_call call;
    memset(&call, 0, sizeof call);
    void *call_block = NULL, *chunk_block = NULL;
    vision_chunk ch;
    memset(&ch, 0, sizeof ch);

    if (o->tokens || o->probe) {
        st = ensure_fold(m, err);
        if (st) goto done;
    }
    /* per-call scratch */
    call.nthreads = max_threads();
    {
        plan_item ci[4];
        int nc = 0;
        if (mul3(&ci[nc].n, (size_t)call.nthreads, Ns < CD_ATT_ROW_BLOCK ? Ns : CD_ATT_ROW_BLOCK,
                 Ns)) goto nomem;
        ci[nc++].dst = &call.att_tiles;
        if (mul3(&ci[nc].n, (size_t)call.nthreads, Ns, (size_t)d)) goto nomem;
        ci[nc++].dst = &call.av;
        if (o->probe) {
            if (mul3(&ci[nc].n, Ls, (size_t)W, (size_t)T)) goto nomem;
            ci[nc++].dst = &call.probe_fold;
        }
        if (o->heads || o->cls_to_cls) {
            if (mul_sz(&ci[nc].n, (size_t)W, (size_t)W)) goto nomem;
            ci[nc++].dst = &call.wo;
        }
        call_block = plan_alloc(ci, nc, NULL);
        if (!call_block) goto nomem;
    }
    if (o->probe)
        for (int l = 0; l < L; l++)
            cd_sgemm_nt(W, T, D, 1.0f, m->fold + (size_t)l * W * D, D, o->probe, D,
                        call.probe_fold + (size_t)l * W * T, T, 0);

    /* chunk size: images whose scratch fits the budget */
    {
        plan_item ci[20];
        int nc = chunk_plan(&ch, ci, c, o, 1);
        if (nc < 0) goto nomem;
        size_t per_image = 0;
        for (int i = 0; i < nc; i++) {
            if (per_image > SIZE_MAX / 4 - ci[i].n) goto nomem;
            per_image += ci[i].n + CD_ALIGN / sizeof(float);
        }
        size_t Bc = budget / (per_image * sizeof(float));
        if (Bc < 1) Bc = 1;
        if (Bc > (size_t)B) Bc = (size_t)B;
        if (Bc > (size_t)INT32_MAX / Ns) Bc = (size_t)INT32_MAX / Ns;
        ch.Bc = (int)Bc;
        nc = chunk_plan(&ch, ci, c, o, Bc);
        if (nc < 0) goto nomem;
        chunk_block = plan_alloc(ci, nc, NULL);
        if (!chunk_block) goto nomem;
    }

    for (int b0 = 0; b0 < B; b0 += ch.Bc) {
        const int Bfull = ch.Bc;
        if (B - b0 < ch.Bc) ch.Bc = B - b0;
        vision_ctx vc = {m, o, r, &ch, &call, b0};
        st = vision_forward_chunk(&vc, images + (size_t)b0 * 3 * S * S);
        ch.Bc = Bfull;
        if (st) {
            set_err(err, "interrupted");
            goto done;
        }
    }
    goto done;
nomem:
    st = CD_ERR_NOMEM;
    set_err(err, "out of memory for the scratch of %d images", B);
done:
    free(call_block);
    free(chunk_block);
    pop_threads(o->threads, prev_threads);
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
    return encode_image_impl(m, images, B, opts, out, err, budget);
}

cd_status cd_encode_image(const cd_model *m, const float *images, int B,
                          const cd_vision_opts *opts, cd_vision_result **out, cd_error *err) {
    return encode_image_impl(m, images, B, opts, out, err, CD_SCRATCH_BUDGET);
}

/* ------------------------------------------------------------------------------------------ */
/* the text forward                                                                            */

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
    size_t per_text = Cs * (Ws * 7 + (size_t)F) + 2 * Ws + 64;
    size_t Tc = CD_SCRATCH_BUDGET / (per_text * sizeof(float));
    if (Tc < 1) Tc = 1;
    if (Tc > (size_t)T) Tc = (size_t)T;
    float *x, *ln, *qkv, *att, *fc, *mlp, *rows, *rows2, *tiles;
    plan_item it[9] = {{&x, 0}, {&ln, 0}, {&qkv, 0}, {&att, 0}, {&fc, 0}, {&mlp, 0},
                       {&rows, 0}, {&rows2, 0}, {&tiles, 0}};
    void *block = NULL;
    if (mul3(&it[0].n, Tc, Cs, Ws) || mul3(&it[2].n, Tc, Cs, 3 * Ws) ||
        mul3(&it[4].n, Tc, Cs, (size_t)F) || mul_sz(&it[6].n, Tc, Ws) ||
        mul3(&it[8].n, (size_t)nthreads, Cs, Cs)) {
        st = CD_ERR_NOMEM;
    } else {
        it[1].n = it[3].n = it[5].n = it[0].n;
        it[7].n = it[6].n;
        block = plan_alloc(it, 9, NULL);
        if (!block) st = CD_ERR_NOMEM;
    }
    if (st) {
        set_err(err, "out of memory for the scratch of %d texts", T);
        pop_threads(threads, prev_threads);
        return st;
    }
    const cd_weights *w = &m->w;
    for (int t0 = 0; t0 < T && !st; t0 += (int)Tc) {
        const int n = T - t0 < (int)Tc ? T - t0 : (int)Tc;
        const int R = n * C;
        const int32_t *ids = tokens + (size_t)t0 * C;
        text_embed_forward(x, ids, w->tok_emb, w->tpos, n, C, W);
        for (int l = 0; l < Lt; l++) {
            if (cancel && cancel(cancel_ctx)) {
                st = CD_ERR_INTERRUPTED;
                set_err(err, "interrupted");
                break;
            }
            const cd_block *blk = &w->tblocks[l];
            layernorm_forward(ln, NULL, NULL, x, blk->ln1_w, blk->ln1_b, R, W, c->ln_eps);
            cd_matmul(qkv, ln, &blk->qkv, blk->qkv_b, R, 0);
            attention_forward(att, NULL, 0, NULL, 0, qkv, n, C, W, H, !siglip, tiles, nthreads);
            cd_matmul(x, att, &blk->out, blk->out_b, R, 1);
            layernorm_forward(ln, NULL, NULL, x, blk->ln2_w, blk->ln2_b, R, W, c->ln_eps);
            cd_matmul(fc, ln, &blk->fc, blk->fc_b, R, 0);
            act_forward(fc, (size_t)R * F, c->text_act);
            cd_matmul(mlp, fc, &blk->proj, blk->proj_b, R, 0);
            residual_forward(x, mlp, (size_t)R * W);
        }
        if (st) break;
        /* the end-of-text token: first position of the largest id (SigLIP: the last one) */
        for (int t = 0; t < n; t++) {
            const int32_t *row = ids + (size_t)t * C;
            int best = siglip ? C - 1 : 0;
            for (int j = 1; !siglip && j < C; j++)
                if (row[j] > row[best]) best = j;
            memcpy(rows + (size_t)t * W, x + ((size_t)t * C + best) * W, Ws * sizeof(float));
        }
        layernorm_forward(rows2, NULL, NULL, rows, w->ln_final_w, w->ln_final_b, n, W, c->ln_eps);
        cd_matmul(out + (size_t)t0 * D, rows2, &w->tproj, w->tproj_b, n, 0);
    }
    free(block);
    pop_threads(threads, prev_threads);
    return st;
}
