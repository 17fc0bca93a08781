/* load.c -- a CLIP or SigLIP model from a safetensors checkpoint (open_clip, transformers or
 * timm key names): every tensor checked against the config, then copied or packed for the GEMM
 * (in bf16 straight from the file when asked), tensor by tensor, with the mapped pages of each
 * released as soon as it is held (docs/memory.md). Also the config checks, the model's size
 * (cd_model_nbytes) and the switch of precision after loading. The forward passes that use
 * these weights are in model.c. */
#define _POSIX_C_SOURCE 200809L
#include "model_internal.h"

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

/* hand buf (bytes long) to the model, which frees it; 0, or -1 when memory is short */
static int own_bytes(cd_model *m, void *buf, size_t bytes) {
    if (m->n_owned == m->cap_owned) {
        int ncap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **no = (void **)realloc(m->owned, (size_t)ncap * sizeof(void *));
        if (!no) return -1;
        m->owned = no;
        m->cap_owned = ncap;
    }
    m->owned[m->n_owned++] = buf;
    m->owned_bytes += bytes;
    return 0;
}

static int own(cd_model *m, float *buf, size_t n_floats) {
    return own_bytes(m, buf, n_floats * sizeof(float));
}

/* free an owned buffer (bytes long) before the model ends */
static void disown(cd_model *m, const void *buf, size_t bytes) {
    for (int i = 0; i < m->n_owned; i++)
        if (m->owned[i] == buf) {
            free(m->owned[i]);
            m->owned[i] = m->owned[--m->n_owned];
            m->owned_bytes -= bytes;
            return;
        }
}

/* n float32 values as bf16 (round to nearest even), in a new buffer; NULL when memory is short */
static uint16_t *bf16_copy(const float *v, size_t n) {
    size_t bytes;
    if (mul_sz(&bytes, n ? n : 1, sizeof(uint16_t))) return NULL;
    uint16_t *out = (uint16_t *)malloc(bytes);
    if (out)
        for (size_t i = 0; i < n; i++) out[i] = cd_bf16_from_f32(v[i]);
    return out;
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

/* The text token table (V, Wt): kept as keep() does in an fp32 model, as bf16 in a bf16 or
 * bf16-emulated one (its float32 values are read, rounded, and not kept) */
static cd_status keep_token_table(loader *ld, const char *key, const int64_t *dVW) {
    cd_weights *w = &ld->m->w;
    if (ld->precision == CD_PRECISION_FP32) return keep(ld, &w->tok_emb, "", key, 2, dVW);
    const float *v;
    float *tmp;
    cd_status st = fetch(ld, "", key, 2, dVW, &v, &tmp);
    if (st) return st;
    const size_t n = (size_t)dVW[0] * (size_t)dVW[1];   /* == numel, checked by the parser */
    uint16_t *t = bf16_copy(v, n);
    free(tmp);
    release_last(ld);
    if (!t || own_bytes(ld->m, t, (n ? n : 1) * sizeof(uint16_t))) {
        free(t);
        set_err(ld->err, "%s: out of memory", ld->m->file.path);
        return CD_ERR_NOMEM;
    }
    w->tok_emb_bf16 = t;
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
                                  const fused_block_keys *k) {
    const int64_t dW[1] = {W}, dF[1] = {F}, d3W[1] = {3 * (int64_t)W};
    cd_status st;
    char b[96];
#define TRY(x) do { if ((st = (x)) != CD_OK) return st; } while (0)
    TRY(keep(ld, &blk->ln1_w, base, leaf_name(b, sizeof b, k->ln1, "weight"), 1, dW));
    TRY(keep(ld, &blk->ln1_b, base, leaf_name(b, sizeof b, k->ln1, "bias"), 1, dW));
    TRY(pack_block(ld, &blk->qkv, base, k->qkv_w, 3 * W, W));
    TRY(keep(ld, &blk->qkv_b, base, k->qkv_b, 1, d3W));
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
 * "vision_model.encoder.layers.3." (HF). */
static cd_status load_block(loader *ld, cd_block *blk, const char *base, int W, int F) {
    const int64_t dW[1] = {W}, dF[1] = {F}, dWW[2] = {W, W};
    cd_status st;
    const int hf = ld->m->layout == CD_LAYOUT_HF;
    if (!hf) return load_fused_block(ld, blk, base, W, F, &OPEN_CLIP_BLOCK);
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
        TRY(load_block(ld, &m->w.blocks[l], base, W, c->mlp_dim));
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
    TRY(keep_token_table(ld, tok, dVW));
    TRY(keep(ld, &m->w.tpos, "",
             hf ? "text_model.embeddings.position_embedding.weight" : "positional_embedding", 2,
             dCW));
    m->w.tblocks = (cd_block *)calloc((size_t)c->text_layers, sizeof(cd_block));
    if (!m->w.tblocks) return pack_err(ld, "text blocks");
    for (int l = 0; l < c->text_layers; l++) {
        char base[96];
        snprintf(base, sizeof base,
                 hf ? "text_model.encoder.layers.%d." : "transformer.resblocks.%d.", l);
        TRY(load_block(ld, &m->w.tblocks[l], base, W, c->text_mlp_dim));
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
    w->pool_kv_b = in_b + W;
    /* pool_const = W_O (W_V beta + b_V) + b_O, in double, from the plain matrices while they
     * are at hand: the model keeps W_V and W_O packed only */
    float *pc = (float *)malloc((size_t)W * sizeof(float));
    double *vb = (double *)malloc((size_t)W * sizeof(double));
    if (!pc || !vb || own(m, pc, (size_t)W)) {
        free(pc);
        free(vb);
        free(tmp);
        return pack_err(ld, "vision_model.head");
    }
    int rc = cd_gemm_pack(&w->pool_kv, in_w + WW, 2 * W, W);
    for (int o = 0; !rc && o < W; o++) {
        double acc = w->pool_kv_b[W + o];
        for (int j = 0; j < W; j++)
            acc += (double)in_w[2 * WW + (size_t)o * W + j] * w->ln_post_b[j];
        vb[o] = acc;
    }
    free(tmp);
    release_last(ld);
    char b[96];
    const float *ow;
    st = rc ? pack_err(ld, "attention.in_proj_weight")
            : keep(ld, &w->pool_out_b, base, leaf_name(b, sizeof b, out, "bias"), 1, dW);
    if (!st) st = fetch(ld, base, leaf_name(b, sizeof b, out, "weight"), 2, dWW, &ow, &tmp);
    if (st) {
        free(vb);
        return st;
    }
    rc = cd_gemm_pack(&w->pool_out, ow, W, W);
    for (int o = 0; !rc && o < W; o++) {
        double acc = w->pool_out_b[o];
        for (int j = 0; j < W; j++) acc += (double)ow[(size_t)o * W + j] * vb[j];
        pc[o] = (float)acc;
    }
    free(vb);
    free(tmp);
    release_last(ld);
    if (rc) return pack_err(ld, b);
    w->pool_const = pc;
    TRY(keep(ld, &w->pool_ln_w, base, leaf_name(b, sizeof b, lnn, "weight"), 1, dW));
    TRY(keep(ld, &w->pool_ln_b, base, leaf_name(b, sizeof b, lnn, "bias"), 1, dW));
    TRY(pack(ld, &w->pool_fc, base, "mlp.fc1.weight", F, W));
    TRY(keep(ld, &w->pool_fc_b, base, "mlp.fc1.bias", 1, dF));
    TRY(pack(ld, &w->pool_proj, base, "mlp.fc2.weight", W, F));
    TRY(keep(ld, &w->pool_proj_b, base, "mlp.fc2.bias", 1, dW));
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
        if (oc) TRY(load_fused_block(ld, &m->w.blocks[l], base, W, c->mlp_dim, &TIMM_BLOCK));
        else TRY(load_block(ld, &m->w.blocks[l], base, W, c->mlp_dim));
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
    TRY(keep_token_table(ld, tok, dVW));
    TRY(keep(ld, &m->w.tpos, "", oc ? "text.positional_embedding"
                                    : "text_model.embeddings.position_embedding.weight", 2, dCW));
    m->w.tblocks = (cd_block *)calloc((size_t)c->text_layers, sizeof(cd_block));
    if (!m->w.tblocks) return pack_err(ld, "text blocks");
    for (int l = 0; l < c->text_layers; l++) {
        char base[96];
        snprintf(base, sizeof base, oc ? "text.transformer.resblocks.%d."
                                       : "text_model.encoder.layers.%d.", l);
        TRY(load_block(ld, &m->w.tblocks[l], base, W, c->text_mlp_dim));
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

cd_status cd_check_config(const cd_config *c, const char *path, cd_error *err) {
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
    return cd_check_config(cfg, "model config", err);
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
    cd_status st = cd_check_config(cfg, path, err);
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
/* precision: the four packed weights of every block (both towers) and the text token table
 * converted to bf16; the patch embedding, the projections and everything the decomposition
 * folds stay float32                                                                          */

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
    if (m->w.tok_emb) {   /* the text token table, as a bf16 load keeps it */
        const size_t n = (size_t)m->cfg.vocab_size * (size_t)m->cfg.text_width;
        uint16_t *t = bf16_copy(m->w.tok_emb, n);
        if (!t || own_bytes(m, t, (n ? n : 1) * sizeof(uint16_t))) {
            free(t);
            set_err(err, "out of memory converting the weights to bf16");
            return CD_ERR_NOMEM;
        }
        disown(m, m->w.tok_emb, (n ? n : 1) * sizeof(float));
        m->w.tok_emb = NULL;
        m->w.tok_emb_bf16 = t;
    }
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
