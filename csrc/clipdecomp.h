/* clipdecomp.h -- the public C API of the clipdecomp core.
 *
 * A CLIP ViT image tower (and text tower) forward pass that also returns the exact
 * decomposition of the image embedding into heads, tokens and MLPs ("Interpreting CLIP's
 * Image Representation via Text-Based Decomposition", Gandelsman et al., ICLR 2024).
 * Pure C99 + OpenMP: no Python needed. Every function returns a cd_status and, on failure,
 * fills cd_error.msg with a sentence naming the file / tensor / shape at fault. Nothing here
 * calls exit() or abort().
 *
 * Shapes (used in every comment of the core):
 *   B = images in a batch        S = image side in pixels (e.g. 224)
 *   P = patch side (e.g. 16)     G = S / P patches per side, N = 1 + G*G tokens
 *   W = width (e.g. 768)         L = layers, H = heads, d = W / H (head width)
 *   F = MLP hidden width         D = embedding dim (e.g. 512)
 *   T = texts (or probe directions), C = context length (e.g. 77), V = vocabulary size
 */
#ifndef CLIPDECOMP_H
#define CLIPDECOMP_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CD_OK = 0,
    CD_ERR_IO = 1,          /* file cannot be opened / read / mapped */
    CD_ERR_FORMAT = 2,      /* not a valid safetensors file, bad header, offsets outside file */
    CD_ERR_MISSING = 3,     /* a required tensor is absent */
    CD_ERR_SHAPE = 4,       /* a tensor or input has the wrong shape / dtype */
    CD_ERR_VALUE = 5,       /* bad argument value (NaN input, bad config, ...) */
    CD_ERR_NOMEM = 6,       /* allocation failed or a size overflowed */
    CD_ERR_INTERRUPTED = 7  /* the cancel callback asked to stop */
} cd_status;

typedef struct { char msg[1024]; } cd_error;

typedef enum { CD_ACT_GELU = 0, CD_ACT_QUICK_GELU = 1, CD_ACT_GELU_TANH = 2 } cd_act;
/* GELU = exact erf form; GELU_TANH = its tanh approximation (SigLIP's gelu_pytorch_tanh) */

/* The model family. CLIP: class token, ln_pre, ln_post at the class token, linear projections.
 * SigLIP (and the fixed-resolution SigLIP 2): no class token (N = G*G), a biased patch
 * embedding, no ln_pre, post_layernorm over every token, then the attention-pooling head
 * (a learned probe attending over all tokens, LayerNorm, MLP with a residual; no projection, so
 * embed_dim == width); the text tower is bidirectional, reads the LAST token and maps it by a
 * biased linear head. */
typedef enum { CD_FAMILY_CLIP = 0, CD_FAMILY_SIGLIP = 1 } cd_family;
typedef enum { CD_LAYOUT_AUTO = 0, CD_LAYOUT_OPEN_CLIP = 1, CD_LAYOUT_HF = 2 } cd_layout;

typedef struct {
    /* vision tower */
    int image_size;      /* S, e.g. 224 */
    int patch_size;      /* P, e.g. 16 */
    int width;           /* W, e.g. 768 */
    int layers;          /* L, e.g. 12 */
    int heads;           /* H, e.g. 12 */
    int mlp_dim;         /* F, e.g. 3072 */
    int embed_dim;       /* D, e.g. 512 */
    int act;             /* cd_act of the vision tower */
    float ln_eps;        /* e.g. 1e-5 */
    /* text tower: text_layers == 0 means "no text tower" (encode_text then fails cleanly) */
    int context_length;  /* C, e.g. 77 */
    int vocab_size;      /* V, e.g. 49408 */
    int text_width;      /* e.g. 512 */
    int text_layers;     /* e.g. 12 */
    int text_heads;      /* e.g. 8 */
    int text_mlp_dim;    /* e.g. 2048 */
    int text_act;        /* cd_act of the text tower */
    int family;          /* cd_family; 0 (CLIP) when left zero */
} cd_config;

typedef struct cd_model cd_model;

/* Whether the core can run a model of this config: every entry in range, the divisibility
 * rules (image by patch for CLIP, width by heads), sizes within the int strides of the GEMMs.
 * The one validation of a config: cd_model_load runs it first, and the Python package's
 * ModelConfig asks it too. CD_ERR_VALUE with a message naming the entry. */
cd_status cd_config_check(const cd_config *cfg, cd_error *err);

/* Load a .safetensors checkpoint (open_clip or HF transformers key layout; F32/F16/BF16).
 * The file is memory-mapped read-only while loading and closed before this returns; every
 * tensor is checked against cfg, then copied or packed into the model's own memory, and its
 * pages of the mapping are released at once, so that loading peaks near the size of the loaded
 * model rather than file + model. cfg->text_layers == 0 loads the image tower alone (any text
 * tower in the file is left unread). */
cd_status cd_model_load(cd_model **out, const char *path, const cd_config *cfg,
                        cd_layout layout, cd_error *err);
void cd_model_free(cd_model *m);
/* Bytes the model holds: its weights as stored (packed, in their precision), plus the
 * per-token fold once a call has built it. */
size_t cd_model_nbytes(const cd_model *m);
const cd_config *cd_model_config(const cd_model *m);
cd_layout cd_model_layout(const cd_model *m);            /* the layout actually found */
/* The checkpoint's `logit_scale` as stored (a log: exp() gives CLIP's temperature). Returns 1 and
 * sets *log_scale when the file has one, else 0. */
int cd_model_logit_scale(const cd_model *m, float *log_scale);
/* SigLIP's `logit_bias` as stored. Returns 1 and sets *bias when the file has one, else 0. */
int cd_model_logit_bias(const cd_model *m, float *bias);

/* Precision of the matrix products of the transformer blocks (both towers). The patch
 * embedding, the final projections, the attention products and every fold of the decomposition
 * stay float32. */
typedef enum {
    CD_PRECISION_FP32 = 0,          /* the default */
    CD_PRECISION_BF16 = 1,          /* weights stored as bf16 (half the memory), activations
                                     * rounded to bf16 as they enter each product, products summed
                                     * in float32 by AVX512_BF16's vdpbf16ps; needs cd_has_bf16() */
    CD_PRECISION_BF16_EMULATED = 2  /* the same roundings on any CPU, computed by the float32
                                     * kernels: the numbers of CD_PRECISION_BF16 up to the order
                                     * of float32 sums, at float32 speed and memory */
} cd_precision;

/* 1 if this CPU runs CD_PRECISION_BF16 (AVX512_BF16 and the avx512 path in use), else 0 */
int cd_has_bf16(void);
/* Convert a freshly loaded model from CD_PRECISION_FP32 to `p`, once and for good (load the file
 * again to go back). Not while another thread uses the model. CD_ERR_VALUE for a conversion that
 * is not fp32 -> bf16 / bf16-emulated, or bf16 on a CPU without it. */
cd_status cd_model_set_precision(cd_model *m, cd_precision p, cd_error *err);
cd_precision cd_model_precision(const cd_model *m);
/* cd_model_load with the blocks' weights converted to `precision` one by one as they are
 * packed (the result of cd_model_set_precision without a float32 copy of the whole model ever
 * existing). Same errors as cd_model_set_precision for a precision the CPU lacks. */
cd_status cd_model_load_as(cd_model **out, const char *path, const cd_config *cfg,
                           cd_layout layout, cd_precision precision, cd_error *err);

/* Called (from the calling thread only, never inside a parallel region) between layers;
 * a non-zero return stops the computation with CD_ERR_INTERRUPTED. */
typedef int (*cd_cancel_fn)(void *ctx);

/* Capture points of the image forward, for analyses that need activations the decomposition
 * does not keep (neurons.c). The callback runs on the calling thread, outside parallel regions,
 * for the chunk of Bc images that starts at image b0 of the call; `data` is valid during the
 * callback only. */
typedef enum {
    CD_CAPTURE_RESIDUAL = 0,  /* (Bc, N, W) residual stream entering layer l, before its ln_1 */
    CD_CAPTURE_ATTN_CLS = 1,  /* (Bc, H, N) softmax attention of the class token in layer l */
    CD_CAPTURE_MLP_ACT = 2    /* (Bc, N, F) MLP hidden of layer l after the activation */
} cd_capture_point;
typedef void (*cd_capture_fn)(void *ctx, cd_capture_point what, int layer, int b0, int Bc,
                              const float *data);

typedef struct {
    int heads;        /* fill heads      (B, L, H, D) */
    int mlps;         /* fill mlps       (B, L+1, D)  row 0 = the ln_pre term */
    int cls_to_cls;   /* fill cls_to_cls (B, L, D) */
    int tokens;       /* fill tokens     (B, L, N, H, D); SigLIP: the deep per-token terms */
    const float *probe; int n_probe; /* optional (T, D) directions: fill probe_out (B, L, N, H, T) */
    int attn;         /* fill attn_cls (B, L, H, N) and attn_mean (B, L, N, N) */
    int threads;      /* <= 0: OpenMP default */
    cd_cancel_fn cancel; void *cancel_ctx;   /* may be NULL */
    int token_embeddings; /* fill token_embeddings (B, N, D) */
    cd_capture_fn capture; void *capture_ctx; /* may be NULL */
    int pool_tokens;  /* SigLIP only: fill pool_tokens (B, N, H, D) */
} cd_vision_opts;

/* Everything one cd_encode_image call produced. One allocation (`block`) holds all arrays;
 * arrays not requested are NULL. All decomposition terms follow the reference convention of
 * the paper's code and are divided by ||embedding||, so for every image b:
 *   heads[b].sum(L, H) + mlps[b].sum(L+1) == embedding[b] / ||embedding[b]||            */
typedef struct {
    int B, L, H, N, D, T, W;
    float *embedding;   /* (B, D)  ln_post(x_L[0]) @ proj, NOT normalised */
    float *ln_stats;    /* (B, 3)  mu, sigma = sqrt(var + eps) of x_L[0], ||embedding|| */
    float *heads;       /* (B, L, H, D) */
    float *mlps;        /* (B, L+1, D) */
    float *cls_to_cls;  /* (B, L, D) */
    float *tokens;      /* (B, L, N, H, D) */
    float *probe_out;   /* (B, L, N, H, T) == tokens @ probe^T */
    float *attn_cls;    /* (B, L, H, N) softmax attention of the class token */
    float *attn_mean;   /* (B, L, N, N) attention averaged over heads */
    float *token_embeddings; /* (B, N, D) ln_post(x_L[n]) @ proj for every token n: the
                              * tokens' own projections (the patch-token baseline) */
    /* SigLIP only (the pooling head; H = pooling heads = encoder heads, D = W), each divided by
     * ||embedding||: pool_heads[b].sum(H) + pool_mlp[b] == embedding[b] / ||embedding[b]||.
     * heads / mlps then hold the deep terms of the attention part:
     *   heads[b].sum(L, H) + mlps[b].sum(L+1) == pool_heads[b].sum(H)   (docs/decomposition.md)
     * and tokens (B, L, N, H, D) each encoder head's deep term at each token:
     *   tokens[b].sum(N) == heads[b] */
    float *pool_heads;  /* (B, H, D) the pooling attention per head, out-proj bias / H each */
    float *pool_tokens; /* (B, N, H, D) per (token, head), out-proj bias / (N H) each */
    float *pool_mlp;    /* (B, D) the pooling MLP's output (the residual's second branch) */
    float *pool_attn;   /* (B, H, N) the probe's softmax attention */
    void *block;        /* owner of all of the above */
    size_t block_bytes;
} cd_vision_result;

/* images: (B, 3, S, S) float32, already normalised. SigLIP refuses cls_to_cls, probe, attn and
 * token_embeddings (the class-token arrays) with CD_ERR_VALUE; pool_heads, pool_mlp and
 * pool_attn are always filled for it. The result is allocated by the core (free it with
 * cd_vision_result_free); cd_encode_image_into fills arrays the caller allocated. */
cd_status cd_encode_image(const cd_model *m, const float *images, int B,
                          const cd_vision_opts *opts, cd_vision_result **out, cd_error *err);
void cd_vision_result_free(cd_vision_result *r);

/* One output array of an image call: its name, its shape (dims[0] = B) and the field of a
 * cd_vision_result that points to it. */
typedef struct {
    const char *name;   /* "embedding", "ln_stats", "heads", ..., "probe" (probe_out), ... */
    int ndim;
    int64_t dims[5];
    float **slot;
} cd_vision_output;
#define CD_VISION_MAX_OUTPUTS 16

/* The arrays that an image call with `opts` (NULL: none) fills for B images on a model of config
 * `c`, in the order of cd_vision_result, with slots into *r; also sets r->B .. r->W. Returns how
 * many (at most CD_VISION_MAX_OUTPUTS). Options the family does not offer are left out here and
 * refused by the call. */
int cd_vision_outputs(const cd_config *c, const cd_vision_opts *opts, int B, cd_vision_result *r,
                      cd_vision_output *outs);

/* As cd_encode_image, into arrays the caller allocated: every array cd_vision_outputs lists must
 * be set in *out (float32, C order, its shape), the others are ignored; out->block is not used.
 * Every element of the listed arrays is written. The arrays must not overlap each other or the
 * images. */
cd_status cd_encode_image_into(const cd_model *m, const float *images, int B,
                               const cd_vision_opts *opts, cd_vision_result *out, cd_error *err);

/* The memory of an image call. */
typedef struct {
    int chunk;                 /* images the core computes at once */
    int threads;               /* OpenMP threads of the call */
    size_t scratch_per_image;  /* bytes of activations per image of a chunk */
    size_t scratch_fixed;      /* bytes of scratch per call that do not grow with the chunk
                                * (attention tiles, per-thread buffers, the probe's fold) */
    size_t model_bytes;        /* bytes the model keeps from the first such call on (the
                                * per-token fold of tokens / probe), 0 if none */
    size_t result_per_image;   /* bytes of the output arrays per image */
} cd_vision_plan;

/* The plan of an image call of B images with `opts` on a model of config `c` (checked as
 * cd_model_load checks it) within a scratch budget in bytes (0: the core's default, 256 MiB):
 * the call then allocates chunk * scratch_per_image + scratch_fixed bytes of scratch, and the
 * caller result_per_image * B bytes of outputs. */
cd_status cd_encode_image_plan(const cd_config *c, const cd_vision_opts *opts, int B,
                               size_t budget, cd_vision_plan *plan, cd_error *err);

/* tokens: (T, C) int32 token ids; features at argmax(ids) (the end-of-text token), or at the
 * last position C - 1 for SigLIP (whose ids are padded to C).
 * out: (T, D) float32, caller-allocated, NOT normalised. */
cd_status cd_encode_text(const cd_model *m, const int32_t *tokens, int T, float *out,
                         int threads, cd_cancel_fn cancel, void *cancel_ctx, cd_error *err);

/* Instruction-set path in use: "avx512", "avx2" or "generic". Chosen at first use from the
 * CPU, or forced with the environment variable CLIPDECOMP_ISA (avx512 | avx2 | generic). */
const char *cd_isa_name(void);
/* Force a path (for tests); returns 0 on success, -1 if the CPU lacks it or the name is unknown. */
int cd_set_isa(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* CLIPDECOMP_H */
