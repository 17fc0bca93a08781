/* model_internal.h -- what the C core's model files share: the weights of a loaded model
 * (cd_block, cd_weights, struct cd_model) and small helpers (errors, overflow-checked sizes,
 * one-allocation scratch blocks, OpenMP thread settings). Not part of the public API
 * (clipdecomp.h); included by load.c (checkpoint -> weights) and model.c (the forward passes
 * and the decomposition). Define _POSIX_C_SOURCE before including it. */
#ifndef CLIPDECOMP_MODEL_INTERNAL_H
#define CLIPDECOMP_MODEL_INTERNAL_H
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
    cd_gemm_weight out;           /* (W, W) packed; the decompositions unpack it into their
                                   * scratch where they need the plain matrix */
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
    const float *tok_emb;         /* (V, Wt) float32, in an fp32 model; NULL otherwise */
    const uint16_t *tok_emb_bf16; /* (V, Wt) bf16, in a bf16 / bf16-emulated model (the rows
                                   * are widened as they are looked up); NULL otherwise */
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
    cd_gemm_weight pool_out;      /* (W, W) packed out-projection */
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
    void **owned;                 /* converted / assembled buffers the weights point into */
    int n_owned, cap_owned;
    size_t owned_bytes;           /* their size */
    int has_logit_scale;
    float logit_scale;            /* as stored (a log) */
    int has_logit_bias;
    float logit_bias;             /* SigLIP's, as stored */
    cd_precision precision;       /* of the blocks' matrix products (cd_model_set_precision) */
    /* the fold F (L, W, D), built on first use by a call that decomposes; the only
     * state written after load, behind fold_lock */
    pthread_mutex_t fold_lock;
    atomic_int fold_ready;
    float *fold;
};

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */

static inline void set_err(cd_error *err, const char *fmt, ...) {
    if (!err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

/* *r = a * b, 0 on success, -1 on overflow */
static inline int mul_sz(size_t *r, size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *r = a * b;
    return 0;
}

static inline int mul3(size_t *r, size_t a, size_t b, size_t c) {
    size_t t;
    return mul_sz(&t, a, b) || mul_sz(r, t, c) ? -1 : 0;
}

/* A block of float arrays carved from one allocation. */
typedef struct { float **dst; size_t n; } plan_item;

/* Allocate one block holding every item (n floats each, each CD_ALIGN-aligned) and point
 * *items[i].dst into it; items with dst == NULL are skipped. Returns the block or NULL when the
 * size overflows or memory is short. Zero-sized items still get a valid pointer. */
static inline void *plan_alloc(plan_item *items, int k, size_t *bytes_out) {
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

static inline int max_threads(void) {
#ifdef _OPENMP
    if (cd_forked_child()) return 1;
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* threads > 0: use that many OpenMP threads in this call (one in a forked child, see cpu.h);
 * returns the previous setting */
static inline int push_threads(int threads) {
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

static inline void pop_threads(int threads, int prev) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(prev);
#else
    (void)threads;
    (void)prev;
#endif
}

static inline void act_forward(float *x, size_t n, int act) {
    if (act == CD_ACT_QUICK_GELU) quick_gelu_forward(x, n);
    else if (act == CD_ACT_GELU_TANH) gelu_tanh_forward(x, n);
    else gelu_forward(x, n);
}

/* load.c: the checks of a config; `what` names it in the message */
cd_status cd_check_config(const cd_config *c, const char *what, cd_error *err);

#endif /* CLIPDECOMP_MODEL_INTERNAL_H */
