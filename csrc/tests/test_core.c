/* test_core.c -- the C core without Python: the forward, the decomposition and the loader
 * against the expected outputs of the NumPy oracle (csrc/tests/make_fixture.py), plus the
 * error paths. Usage: test_core FIXTURE_DIR. Exit status 0 when every check passes.
 *
 * Shapes as in clipdecomp.h: B images, L layers, N tokens, H heads, D embedding dim,
 * T probe directions (or texts), C context length.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clipdecomp.h"
#include "gemm.h"
#include "ops.h"
#include "safetensors.h"

/* internal entry point of model.c: cd_encode_image with a chosen scratch budget */
cd_status cd_encode_image_budget(const cd_model *m, const float *images, int B,
                                 const cd_vision_opts *opts, cd_vision_result **out,
                                 cd_error *err, size_t budget);

static int n_checks = 0, n_failed = 0;
static const char *dir;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        n_checks++;                                                        \
        if (!(cond)) {                                                     \
            n_failed++;                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* fixture                                                                                     */

typedef struct {
    cd_config cfg;
    int B, T, n_probe, N;
    float logit_scale;
    float *images, *probe;
    int32_t *ids;
    float *embedding, *ln_stats, *heads, *mlps, *cls_to_cls, *tokens, *probe_out, *attn_cls,
        *attn_mean, *text;
} fixture;

static char *path_in(const char *name) {
    static char buf[8][1024];
    static int k = 0;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void *read_bin(const char *name, size_t count, size_t elem) {
    char fn[256];
    snprintf(fn, sizeof fn, "%s.bin", name);
    FILE *f = fopen(path_in(fn), "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path_in(fn));
        return NULL;
    }
    void *buf = malloc(count * elem + 1);
    size_t got = buf ? fread(buf, elem, count + 1, f) : 0;
    fclose(f);
    if (got != count) {
        fprintf(stderr, "%s: expected %zu values, found %zu\n", fn, count, got);
        free(buf);
        return NULL;
    }
    return buf;
}

static int load_fixture(fixture *fx) {
    memset(fx, 0, sizeof *fx);
    FILE *f = fopen(path_in("meta.txt"), "r");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path_in("meta.txt"));
        return -1;
    }
    char key[64];
    double v;
    while (fscanf(f, "%63s %lf", key, &v) == 2) {
        cd_config *c = &fx->cfg;
        struct { const char *k; int *p; } ints[] = {
            {"image_size", &c->image_size}, {"patch_size", &c->patch_size}, {"width", &c->width},
            {"layers", &c->layers}, {"heads", &c->heads}, {"mlp_dim", &c->mlp_dim},
            {"embed_dim", &c->embed_dim}, {"act", &c->act},
            {"context_length", &c->context_length}, {"vocab_size", &c->vocab_size},
            {"text_width", &c->text_width}, {"text_layers", &c->text_layers},
            {"text_heads", &c->text_heads}, {"text_mlp_dim", &c->text_mlp_dim},
            {"text_act", &c->text_act}, {"B", &fx->B}, {"T", &fx->T}, {"n_probe", &fx->n_probe}};
        for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
            if (!strcmp(key, ints[i].k)) *ints[i].p = (int)v;
        if (!strcmp(key, "ln_eps")) c->ln_eps = (float)v;
        if (!strcmp(key, "logit_scale")) fx->logit_scale = (float)v;
    }
    fclose(f);
    const cd_config *c = &fx->cfg;
    const size_t B = fx->B, L = c->layers, H = c->heads, D = c->embed_dim, S = c->image_size;
    const size_t G = S / c->patch_size, N = 1 + G * G, Tp = fx->n_probe;
    fx->N = (int)N;
    struct { void **dst; const char *name; size_t n; size_t elem; } arr[] = {
        {(void **)&fx->images, "images", B * 3 * S * S, 4},
        {(void **)&fx->ids, "ids", (size_t)fx->T * c->context_length, 4},
        {(void **)&fx->probe, "probe", Tp * D, 4},
        {(void **)&fx->embedding, "embedding", B * D, 4},
        {(void **)&fx->ln_stats, "ln_stats", B * 3, 4},
        {(void **)&fx->heads, "heads", B * L * H * D, 4},
        {(void **)&fx->mlps, "mlps", B * (L + 1) * D, 4},
        {(void **)&fx->cls_to_cls, "cls_to_cls", B * L * D, 4},
        {(void **)&fx->tokens, "tokens", B * L * N * H * D, 4},
        {(void **)&fx->probe_out, "probe_out", B * L * N * H * Tp, 4},
        {(void **)&fx->attn_cls, "attn_cls", B * L * H * N, 4},
        {(void **)&fx->attn_mean, "attn_mean", B * L * N * N, 4},
        {(void **)&fx->text, "text", (size_t)fx->T * D, 4},
    };
    for (size_t i = 0; i < sizeof arr / sizeof arr[0]; i++) {
        *arr[i].dst = read_bin(arr[i].name, arr[i].n, arr[i].elem);
        if (!*arr[i].dst) return -1;
    }
    return 0;
}

static void free_fixture(fixture *fx) {
    void *p[] = {fx->images, fx->probe, fx->ids, fx->embedding, fx->ln_stats, fx->heads,
                 fx->mlps, fx->cls_to_cls, fx->tokens, fx->probe_out, fx->attn_cls,
                 fx->attn_mean, fx->text};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

/* max |a - b| / max(max |b|, floor): the largest difference relative to the array's scale */
static double rel_diff(const float *a, const float *b, size_t n, double floor) {
    double md = 0, mb = floor;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= md)) md = d;  /* NaN propagates as a failure */
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    }
    return md / mb;
}

#define TOL 2e-5

static void expect_close(const char *what, const char *name, const float *got, const float *want,
                         size_t n, double tol) {
    double r = rel_diff(got, want, n, 1e-6);
    printf("  %-28s %-12s max rel diff %.2e\n", what, name, r);
    CHECK(r <= tol, "%s: %s differs from the oracle by %.3e (tol %.1e)", what, name, r, tol);
}

/* ------------------------------------------------------------------------------------------ */
/* the numbers                                                                                 */

static cd_model *load_model(const char *file, const cd_config *cfg, cd_layout layout) {
    cd_model *m = NULL;
    cd_error err;
    cd_status st = cd_model_load(&m, path_in(file), cfg, layout, &err);
    CHECK(st == CD_OK, "loading %s: status %d: %s", file, st, err.msg);
    return st == CD_OK ? m : NULL;
}

static void check_model(const fixture *fx, const char *file, cd_layout want_layout) {
    const cd_config *c = &fx->cfg;
    const size_t B = fx->B, L = c->layers, H = c->heads, D = c->embed_dim, N = fx->N;
    const size_t Tp = fx->n_probe;
    cd_model *m = load_model(file, c, CD_LAYOUT_AUTO);
    if (!m) return;
    CHECK(cd_model_layout(m) == want_layout, "%s: layout %d, expected %d", file,
          cd_model_layout(m), want_layout);
    float ls = 0;
    CHECK(cd_model_logit_scale(m, &ls) == 1 && ls == fx->logit_scale,
          "%s: logit_scale %g, expected %g", file, ls, fx->logit_scale);
    cd_vision_opts o;
    memset(&o, 0, sizeof o);
    o.heads = o.mlps = o.cls_to_cls = o.tokens = o.attn = 1;
    o.probe = fx->probe;
    o.n_probe = fx->n_probe;
    cd_vision_result *r = NULL;
    cd_error err;
    cd_status st = cd_encode_image(m, fx->images, fx->B, &o, &r, &err);
    CHECK(st == CD_OK, "%s: encode_image status %d: %s", file, st, err.msg);
    if (st == CD_OK) {
        CHECK(r->B == (int)B && r->L == (int)L && r->H == (int)H && r->N == (int)N &&
              r->D == (int)D && r->T == (int)Tp, "%s: result dims", file);
        expect_close(file, "embedding", r->embedding, fx->embedding, B * D, TOL);
        expect_close(file, "ln_stats", r->ln_stats, fx->ln_stats, B * 3, TOL);
        expect_close(file, "heads", r->heads, fx->heads, B * L * H * D, TOL);
        expect_close(file, "mlps", r->mlps, fx->mlps, B * (L + 1) * D, TOL);
        expect_close(file, "cls_to_cls", r->cls_to_cls, fx->cls_to_cls, B * L * D, TOL);
        expect_close(file, "tokens", r->tokens, fx->tokens, B * L * N * H * D, TOL);
        expect_close(file, "probe_out", r->probe_out, fx->probe_out, B * L * N * H * Tp, TOL);
        expect_close(file, "attn_cls", r->attn_cls, fx->attn_cls, B * L * H * N, TOL);
        expect_close(file, "attn_mean", r->attn_mean, fx->attn_mean, B * L * N * N, TOL);

        /* the identity: heads.sum(L, H) + mlps.sum(L+1) == emb / ||emb|| */
        double worst = 0;
        for (size_t b = 0; b < B; b++) {
            double nrm = r->ln_stats[3 * b + 2];
            for (size_t j = 0; j < D; j++) {
                double s = 0;
                for (size_t i = 0; i < L * H; i++) s += r->heads[(b * L * H + i) * D + j];
                for (size_t i = 0; i < L + 1; i++) s += r->mlps[(b * (L + 1) + i) * D + j];
                double e = fabs(s - r->embedding[b * D + j] / nrm);
                if (e > worst) worst = e;
            }
        }
        CHECK(worst < 1e-5, "%s: identity off by %.3e", file, worst);
        /* tokens summed over N == heads; cls_to_cls == tokens[:, :, 0].sum(H) */
        double wt = 0, wc = 0;
        for (size_t b = 0; b < B; b++)
            for (size_t l = 0; l < L; l++) {
                for (size_t h = 0; h < H; h++)
                    for (size_t j = 0; j < D; j++) {
                        double s = 0;
                        for (size_t n = 0; n < N; n++)
                            s += r->tokens[((((b * L + l) * N + n) * H) + h) * D + j];
                        double e = fabs(s - r->heads[((b * L + l) * H + h) * D + j]);
                        if (e > wt) wt = e;
                    }
                for (size_t j = 0; j < D; j++) {
                    double s = 0;
                    for (size_t h = 0; h < H; h++) s += r->tokens[(((b * L + l) * N) * H + h) * D + j];
                    double e = fabs(s - r->cls_to_cls[(b * L + l) * D + j]);
                    if (e > wc) wc = e;
                }
            }
        CHECK(wt < 1e-5, "%s: tokens.sum(N) differs from heads by %.3e", file, wt);
        CHECK(wc < 1e-5, "%s: tokens[:, :, 0].sum(H) differs from cls_to_cls by %.3e", file, wc);
        cd_vision_result_free(r);
    }
    /* only the embedding: everything else NULL; chunked (one image at a time) gives the same */
    r = NULL;
    st = cd_encode_image(m, fx->images, fx->B, NULL, &r, &err);
    CHECK(st == CD_OK && r && !r->heads && !r->mlps && !r->tokens && !r->probe_out &&
          !r->attn_cls && !r->attn_mean && !r->cls_to_cls, "%s: plain encode", file);
    cd_vision_result *r1 = NULL;
    o.threads = 1;
    st = cd_encode_image_budget(m, fx->images, fx->B, &o, &r1, &err, 1);
    CHECK(st == CD_OK, "%s: chunked encode status %d: %s", file, st, err.msg);
    if (r && r1) {
        expect_close(file, "embedding (plain)", r->embedding, fx->embedding, B * D, TOL);
        expect_close(file, "embedding (chunked)", r1->embedding, fx->embedding, B * D, TOL);
        expect_close(file, "tokens (chunked)", r1->tokens, fx->tokens, B * L * N * H * D, TOL);
        expect_close(file, "probe_out (chunked)", r1->probe_out, fx->probe_out,
                     B * L * N * H * Tp, TOL);
        expect_close(file, "attn_mean (chunked)", r1->attn_mean, fx->attn_mean, B * L * N * N,
                     TOL);
        expect_close(file, "heads (chunked)", r1->heads, fx->heads, B * L * H * D, TOL);
    }
    cd_vision_result_free(r);
    cd_vision_result_free(r1);

    /* into caller-allocated arrays (one malloc each, as cd_vision_outputs lists them) */
    {
        cd_vision_result into;
        memset(&into, 0, sizeof into);
        cd_vision_output outs[CD_VISION_MAX_OUTPUTS];
        const int k = cd_vision_outputs(c, &o, fx->B, &into, outs);
        CHECK(k == 9 && into.B == (int)B && into.N == (int)N && into.T == (int)Tp,
              "%s: %d outputs listed", file, k);
        st = cd_encode_image_into(m, fx->images, fx->B, &o, &into, &err);
        CHECK(st == CD_ERR_VALUE && strstr(err.msg, "embedding"),
              "%s: into without arrays: status %d: %s", file, st, err.msg);
        for (int i = 0; i < k; i++) {
            size_t n = 1;
            for (int j = 0; j < outs[i].ndim; j++) n *= (size_t)outs[i].dims[j];
            *outs[i].slot = (float *)malloc(n * sizeof(float));
        }
        st = cd_encode_image_into(m, fx->images, fx->B, &o, &into, &err);
        CHECK(st == CD_OK, "%s: encode_image_into status %d: %s", file, st, err.msg);
        if (st == CD_OK) {
            expect_close(file, "embedding (into)", into.embedding, fx->embedding, B * D, TOL);
            expect_close(file, "heads (into)", into.heads, fx->heads, B * L * H * D, TOL);
            expect_close(file, "tokens (into)", into.tokens, fx->tokens, B * L * N * H * D, TOL);
            expect_close(file, "probe_out (into)", into.probe_out, fx->probe_out,
                         B * L * N * H * Tp, TOL);
            expect_close(file, "attn_mean (into)", into.attn_mean, fx->attn_mean,
                         B * L * N * N, TOL);
        }
        for (int i = 0; i < k; i++) free(*outs[i].slot);
        cd_vision_plan plan;
        st = cd_encode_image_plan(c, &o, fx->B, 1, &plan, &err);
        CHECK(st == CD_OK && plan.chunk == 1 && plan.threads == 1 && plan.scratch_per_image > 0 &&
              plan.model_bytes == L * (size_t)c->width * D * sizeof(float) &&
              plan.result_per_image == (D + 3 + L * H * D + (L + 1) * D + L * D +
                                        L * N * H * D + L * N * H * Tp + L * H * N + L * N * N) *
                                       sizeof(float),
              "%s: plan status %d chunk %d: %s", file, st, plan.chunk, err.msg);
    }

    /* text */
    float *text = (float *)calloc((size_t)fx->T * D, sizeof(float));
    st = cd_encode_text(m, fx->ids, fx->T, text, 0, NULL, NULL, &err);
    CHECK(st == CD_OK, "%s: encode_text status %d: %s", file, st, err.msg);
    if (st == CD_OK) expect_close(file, "text", text, fx->text, (size_t)fx->T * D, TOL);
    free(text);
    cd_model_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* errors                                                                                      */

static int stop_after(void *ctx) {
    int *k = (int *)ctx;
    return --*k < 0;
}

static void check_runtime_errors(const fixture *fx) {
    const cd_config *c = &fx->cfg;
    cd_model *m = load_model("model_oc_f32.safetensors", c, CD_LAYOUT_OPEN_CLIP);
    if (!m) return;
    cd_error err;
    cd_vision_result *r = NULL;
    cd_vision_opts o;
    memset(&o, 0, sizeof o);
    o.heads = o.tokens = 1;
    int budget = 1;  /* stop before the second layer */
    o.cancel = stop_after;
    o.cancel_ctx = &budget;
    cd_status st = cd_encode_image(m, fx->images, fx->B, &o, &r, &err);
    CHECK(st == CD_ERR_INTERRUPTED && r == NULL, "cancel: status %d", st);
    budget = 0;
    float out[64 * 24];
    st = cd_encode_text(m, fx->ids, fx->T, out, 0, stop_after, &budget, &err);
    CHECK(st == CD_ERR_INTERRUPTED, "text cancel: status %d", st);

    const size_t n_img = (size_t)fx->B * 3 * c->image_size * c->image_size;
    float *bad = (float *)malloc(n_img * sizeof(float));
    memcpy(bad, fx->images, n_img * sizeof(float));
    bad[n_img - 1] = NAN;
    o.cancel = NULL;
    st = cd_encode_image(m, bad, fx->B, &o, &r, &err);
    CHECK(st == CD_ERR_VALUE && strstr(err.msg, "images") && strstr(err.msg, "[2, 2, 15, 15]"),
          "NaN image: status %d, '%s'", st, err.msg);
    bad[n_img - 1] = INFINITY;
    st = cd_encode_image(m, bad, fx->B, &o, &r, &err);
    CHECK(st == CD_ERR_VALUE && strstr(err.msg, "inf"), "inf image: status %d, '%s'", st, err.msg);
    free(bad);
    st = cd_encode_image(m, fx->images, -1, &o, &r, &err);
    CHECK(st == CD_ERR_VALUE, "B = -1: status %d", st);
    o.n_probe = 3;
    st = cd_encode_image(m, fx->images, 1, &o, &r, &err);
    CHECK(st == CD_ERR_VALUE && strstr(err.msg, "probe"), "probe without data: status %d", st);
    o.n_probe = 0;
    st = cd_encode_image(m, fx->images, 0, &o, &r, &err);
    CHECK(st == CD_OK && r && r->B == 0 && r->embedding && r->heads,
          "B = 0: status %d", st);
    cd_vision_result_free(r);

    int32_t ids[8] = {1, 2, 3, 50, 0, 0, 0, 0};
    st = cd_encode_text(m, ids, 1, out, 0, NULL, NULL, &err);
    CHECK(st == CD_ERR_VALUE && strstr(err.msg, "[0, 3]"), "bad token: status %d '%s'", st,
          err.msg);
    ids[3] = -1;
    st = cd_encode_text(m, ids, 1, out, 0, NULL, NULL, &err);
    CHECK(st == CD_ERR_VALUE, "negative token: status %d", st);
    cd_model_free(m);

    /* an image-only model */
    cd_config vc = *c;
    vc.text_layers = 0;
    m = load_model("model_hf_vision.safetensors", &vc, CD_LAYOUT_AUTO);
    if (m) {
        CHECK(cd_model_layout(m) == CD_LAYOUT_HF, "prefixed HF layout");
        CHECK(cd_model_logit_scale(m, NULL) == 0, "no logit_scale expected");
        ids[3] = 3;
        st = cd_encode_text(m, ids, 1, out, 0, NULL, NULL, &err);
        CHECK(st == CD_ERR_VALUE && strstr(err.msg, "text"), "text on image-only: %d", st);
        st = cd_encode_image(m, fx->images, fx->B, NULL, &r, &err);
        CHECK(st == CD_OK, "image-only encode: %s", err.msg);
        if (st == CD_OK)
            expect_close("model_hf_vision", "embedding", r->embedding, fx->embedding,
                         (size_t)fx->B * c->embed_dim, TOL);
        cd_vision_result_free(r);
        cd_model_free(m);
    }
}

static void check_load_errors(const fixture *fx) {
    cd_model *m = NULL;
    cd_error err;
    cd_config c = fx->cfg;
    cd_status st;

    st = cd_model_load(&m, path_in("model_hf_vision.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_MISSING && strstr(err.msg, "text_model.embeddings.token_embedding") &&
          m == NULL, "missing text tower: %d '%s'", st, err.msg);
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_HF, &err);
    CHECK(st == CD_ERR_MISSING && strstr(err.msg, "vision_model"), "forced HF: %d '%s'", st,
          err.msg);
    st = cd_model_load(&m, path_in("no_such_file.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_IO && strstr(err.msg, "no_such_file"), "no file: %d '%s'", st, err.msg);
    st = cd_model_load(&m, dir, &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_IO, "directory: %d '%s'", st, err.msg);

    c.width = 48;  /* wrong config -> the first tensor whose shape disagrees */
    c.heads = 4;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_SHAPE && strstr(err.msg, "visual.conv1.weight") &&
          strstr(err.msg, "[48, 3, 4, 4]") && strstr(err.msg, "[32, 3, 4, 4]"),
          "wrong width: %d '%s'", st, err.msg);
    c = fx->cfg;
    c.mlp_dim = 65;
    st = cd_model_load(&m, path_in("model_hf_f16.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_SHAPE && strstr(err.msg, "mlp.fc1.weight"), "wrong mlp_dim: %d '%s'", st,
          err.msg);
    c = fx->cfg;
    c.vocab_size = 49;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_SHAPE && strstr(err.msg, "token_embedding"), "wrong vocab: %d '%s'", st,
          err.msg);
    c = fx->cfg;
    c.layers = 1;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_SHAPE && strstr(err.msg, "layers = 1") &&
          strstr(err.msg, "visual.transformer.resblocks.1.ln_1.weight"), "too few layers: %d '%s'",
          st, err.msg);
    c = fx->cfg;
    c.text_layers = 1;
    st = cd_model_load(&m, path_in("model_hf_f16.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_SHAPE && strstr(err.msg, "text_layers = 1"), "too few text layers: %d '%s'",
          st, err.msg);
    c = fx->cfg;
    c.layers = 3;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_MISSING && strstr(err.msg, "resblocks.2."), "too many layers: %d '%s'",
          st, err.msg);
    c = fx->cfg;
    c.patch_size = 5;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_VALUE && strstr(err.msg, "patch_size"), "bad patch: %d '%s'", st, err.msg);
    c = fx->cfg;
    c.heads = 5;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_VALUE, "heads not dividing width: %d", st);
    c = fx->cfg;
    c.act = 7;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_VALUE, "bad act: %d", st);
    c = fx->cfg;
    c.ln_eps = NAN;
    st = cd_model_load(&m, path_in("model_oc_f32.safetensors"), &c, CD_LAYOUT_AUTO, &err);
    CHECK(st == CD_ERR_VALUE, "bad eps: %d", st);
    CHECK(m == NULL, "no model after failures");
}

/* a file image: 8-byte length + header + data */
static cd_status open_header(const char *hdr, size_t data_len, cd_error *err, cd_st_file *f) {
    size_t n = strlen(hdr);
    unsigned char *buf = (unsigned char *)calloc(8 + n + data_len + 1, 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, hdr, n);
    cd_status st = cd_st_open_buffer(f, buf, 8 + n + data_len, "test.safetensors", err);
    free(buf);  /* only the parsed fields are used after this */
    return st;
}

static void check_safetensors(void) {
    cd_st_file f;
    cd_error err;
    struct { const char *hdr; size_t data; cd_status want; const char *msg; } cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 24, CD_OK, ""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 23, CD_ERR_FORMAT,
         "outside the data section"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24, CD_ERR_FORMAT,
         "need 24 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[8,4]}}", 24, CD_ERR_FORMAT,
         "data_offsets"},
        {"{\"a\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8, CD_ERR_FORMAT,
         "unknown dtype 'Q7'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 8, CD_ERR_FORMAT,
         "integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 8, CD_ERR_FORMAT,
         "integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
         "\"data_offsets\":[0,4]}}", 8, CD_ERR_FORMAT, "overflow"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,99999999999999999999999]}}",
         8, CD_ERR_FORMAT, "too large"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 8, CD_ERR_FORMAT, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, CD_ERR_FORMAT,
         "twice"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", 8, CD_ERR_FORMAT,
         "trailing"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 8, CD_ERR_FORMAT,
         "expected"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}   ", 8, CD_ERR_FORMAT,
         "expected"},
        {"[1, 2]", 8, CD_ERR_FORMAT, "expected '{'"},
        {"{\"a\\u0000b\":{}}", 8, CD_ERR_FORMAT, "NUL"},
        {"{\"a\\ud800\":{}}", 8, CD_ERR_FORMAT, "surrogate"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,2,3,4,5,6,7,8,9],\"data_offsets\":[0,4]}}", 8,
         CD_ERR_FORMAT, "dimensions"},
        {"{\"__metadata__\":{\"k\":\"v\",\"n\":[1,{\"x\":null}],\"t\":true},"
         "\"b\\u00e9\\ud83d\\ude00\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,2],"
         "\"extra\":-1.5e3}}", 2, CD_OK, ""},
        {"{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]},\"e\":{\"dtype\":\"F16\","
         "\"shape\":[0,5],\"data_offsets\":[8,8]}}", 8, CD_OK, ""},
        {"{}", 0, CD_OK, ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        err.msg[0] = '\0';
        cd_status st = open_header(cases[i].hdr, cases[i].data, &err, &f);
        CHECK(st == cases[i].want && strstr(err.msg, cases[i].msg) &&
              (st == CD_OK || strstr(err.msg, "test.safetensors")),
              "header case %zu: status %d (want %d), '%s'", i, st, cases[i].want, err.msg);
        if (st == CD_OK && i == 18) {
            const cd_st_tensor *t = cd_st_find(&f, "b\xc3\xa9\xf0\x9f\x98\x80");
            CHECK(t && t->ndim == 0 && t->numel == 1 && t->dtype == CD_DT_BF16, "unicode name");
        }
        if (st == CD_OK && i == 19) {
            const cd_st_tensor *t = cd_st_find(&f, "a");
            const float *v;
            float *owned;
            CHECK(t && cd_st_read_f32(&f, t, &v, &owned, &err) == CD_ERR_SHAPE &&
                  strstr(err.msg, "'a'") && strstr(err.msg, "I64"), "I64 read: '%s'", err.msg);
            t = cd_st_find(&f, "e");
            CHECK(t && t->numel == 0 && cd_st_read_f32(&f, t, &v, &owned, &err) == CD_OK,
                  "empty F16 tensor");
            free(owned);
            CHECK(cd_st_find(&f, "zz") == NULL, "absent name");
        }
        cd_st_close(&f);
    }
    /* length field problems */
    unsigned char small[7] = {0};
    CHECK(cd_st_open_buffer(&f, small, sizeof small, "s", &err) == CD_ERR_FORMAT, "7 bytes");
    cd_st_close(&f);
    unsigned char huge[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, '{', '}'};
    CHECK(cd_st_open_buffer(&f, huge, sizeof huge, "h", &err) == CD_ERR_FORMAT &&
          strstr(err.msg, "limit"), "huge header length: '%s'", err.msg);
    cd_st_close(&f);
    unsigned char past[16] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    CHECK(cd_st_open_buffer(&f, past, sizeof past, "p", &err) == CD_ERR_FORMAT &&
          strstr(err.msg, "only 8 bytes follow"), "header past the end: '%s'", err.msg);
    cd_st_close(&f);

    /* a truncated checkpoint on disk */
    FILE *in = fopen(path_in("model_oc_f32.safetensors"), "rb");
    FILE *outf = fopen(path_in("truncated.safetensors"), "wb");
    if (in && outf) {
        char buf[4096];
        size_t total = 0, n;
        while ((n = fread(buf, 1, sizeof buf, in)) > 0 && total < 100000) {
            fwrite(buf, 1, n, outf);
            total += n;
        }
    }
    if (in) fclose(in);
    if (outf) fclose(outf);
    cd_status st = cd_st_open(&f, path_in("truncated.safetensors"), &err);
    CHECK(st == CD_ERR_FORMAT && strstr(err.msg, "truncated"), "truncated file: %d '%s'", st,
          err.msg);
    cd_st_close(&f);
    outf = fopen(path_in("empty.safetensors"), "wb");
    if (outf) fclose(outf);
    st = cd_st_open(&f, path_in("empty.safetensors"), &err);
    CHECK(st == CD_ERR_FORMAT, "empty file: %d", st);
    cd_st_close(&f);

    /* conversions: every F16 pattern against ldexp, BF16 against the bit shift */
    int bad16 = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        int e = (h >> 10) & 31, mnt = h & 1023;
        double want = e == 0 ? ldexp(mnt, -24) : e == 31 ? (mnt ? NAN : INFINITY)
                                                          : ldexp(1024 + mnt, e - 25);
        if (h & 0x8000) want = -want;
        float got = cd_half_to_float((uint16_t)h);
        if (isnan(want) ? !isnan(got) : (double)got != want || !signbit(got) != !signbit(want))
            bad16++;
    }
    CHECK(bad16 == 0, "%d F16 values convert wrongly", bad16);
    CHECK(cd_bf16_to_float(0x3f80) == 1.0f && cd_bf16_to_float(0xff80) == -INFINITY &&
          isnan(cd_bf16_to_float(0x7fc0)) && cd_bf16_to_float(0x0001) == ldexpf(1.0f, -133),
          "BF16 conversions");
}

/* the ops against direct formulas */
static void check_ops(void) {
    float x[6] = {-3.0f, -0.5f, 0.0f, 0.25f, 1.0f, 4.0f}, g[6], q[6];
    memcpy(g, x, sizeof x);
    memcpy(q, x, sizeof x);
    gelu_forward(g, 6);
    quick_gelu_forward(q, 6);
    for (int i = 0; i < 6; i++) {
        double wg = 0.5 * x[i] * (1 + erf(x[i] / sqrt(2.0)));
        double wq = x[i] / (1 + exp(-1.702 * x[i]));
        CHECK(fabs(g[i] - wg) < 1e-6 && fabs(q[i] - wq) < 1e-6, "activation at %g", x[i]);
    }
    /* the vectorised polynomials over their whole range, on every instruction-set path */
    enum { NG = 30 * 1024 + 1 };
    static float grid[NG], gg[NG], gq[NG];
    const char *prev_isa = cd_isa_name();
    const char *isas[3] = {"generic", "avx2", "avx512"};
    for (int k = 0; k < 3; k++) {
        if (cd_set_isa(isas[k]) != 0) continue;
        for (int i = 0; i < NG; i++) grid[i] = gg[i] = gq[i] = (float)(-15.0 + i / 1024.0);
        gelu_forward(gg, NG);
        quick_gelu_forward(gq, NG);
        double worst_g = 0, worst_q = 0;
        for (int i = 0; i < NG; i++) {
            const double xf = grid[i];
            const double want = 0.5 * xf * erfc(-xf / sqrt(2.0));
            const double err = fabs(gg[i] - want) / (fabs(want) + 1e-9);
            if (err > worst_g) worst_g = err;
            const double wq = xf / (1 + exp((double)(-1.702f * grid[i])));  /* float argument */
            const double eq = fabs(gq[i] - wq) / (fabs(wq) + 1e-9);
            if (eq > worst_q) worst_q = eq;
        }
        CHECK(worst_g < 5e-6 && worst_q < 1e-6, "%s: gelu rel err %.3g, quick_gelu %.3g", isas[k],
              worst_g, worst_q);
        float row[7] = {0.5f, -80.0f, 3.0f, 1.0f, 2.0f, 7.0f, 9.0f};
        softmax_forward(row, 5, 7);
        const double z = exp(0.5) + exp(-80.0) + exp(3.0) + exp(1.0) + exp(2.0);
        CHECK(fabs(row[2] - exp(3.0) / z) < 3e-7 && row[5] == 0 && row[6] == 0 &&
              fabs(row[1] - exp(-80.0) / z) < 1e-40, "%s: softmax", isas[k]);
        float special[4] = {NAN, INFINITY, 0.0f, -0.0f};
        gelu_forward(special, 4);
        CHECK(isnan(special[0]) && special[1] == INFINITY && special[2] == 0 && special[3] == 0,
              "%s: gelu of nan, inf, 0", isas[k]);
    }
    cd_set_isa(prev_isa);
    double worst_e = 0;
    for (double v = -86.9; v <= 87.9; v += 1.0 / 512) {
        const double err = fabs(cd_expf((float)v) / exp((double)(float)v) - 1);
        if (err > worst_e) worst_e = err;
    }
    CHECK(worst_e < 3e-7 && fabs(cd_gelu(-1.0f) - 0.5 * erfc(1 / sqrt(2.0)) * -1.0) < 1e-7,
          "exp rel err %.3g", worst_e);
    CHECK(cd_expf(-100.0f) == 0 && isnan(cd_expf(NAN)) && cd_expf(0.0f) == 1.0f, "exp specials");
    float row[5] = {1, 2, 3, 100, 100};
    softmax_forward(row, 3, 5);
    double e = exp(-2) + exp(-1) + 1;
    CHECK(fabs(row[2] - 1 / e) < 1e-6 && row[3] == 0 && row[4] == 0, "softmax mask");
    /* causal attention of a 3-token sequence, one head: the first query sees itself only */
    float qkv[3 * 6] = {1, 0, 5, 5, 1, 2, 0, 1, 0, 1, 3, 4, 1, 1, -1, 0, 5, 6};
    float out[6], tiles[9];
    attention_forward(out, NULL, 0, NULL, 0, qkv, 1, 3, 2, 1, 1, tiles, 1);
    CHECK(out[0] == 1 && out[1] == 2, "causal row 0: %g %g", out[0], out[1]);
}

/* The packed weight is the only copy a model keeps: unpacking gives the matrix back exactly,
 * and packing to bf16 in one step gives the panels of packing then converting, bit for bit.
 * Shapes off the panel (OC % 16 != 0) and the slice (K > 512, odd) on purpose. */
static void check_pack_roundtrip(void) {
    const int shapes[3][2] = {{37, 5}, {64, 1031}, {3, 512}};
    for (int s = 0; s < 3; s++) {
        const int OC = shapes[s][0], K = shapes[s][1];
        const size_t n = (size_t)OC * K;
        float *w = (float *)malloc(n * sizeof(float)), *back = (float *)malloc(n * sizeof(float));
        uint32_t seed = 12345u + (uint32_t)s;
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1664525u + 1013904223u;
            w[i] = ((float)(seed >> 8) / 16777216.0f - 0.5f) * 3.0f;
        }
        cd_gemm_weight a, b;
        CHECK(cd_gemm_pack(&a, w, OC, K) == 0, "pack %dx%d", OC, K);
        CHECK(cd_gemm_unpack(&a, back) == 0 && memcmp(back, w, n * sizeof(float)) == 0,
              "unpack %dx%d does not give the weight back", OC, K);
        CHECK(cd_gemm_to_bf16(&a, CD_GEMM_BF16) == 0, "to_bf16 %dx%d", OC, K);
        CHECK(cd_gemm_pack_bf16(&b, w, OC, K) == 0, "pack_bf16 %dx%d", OC, K);
        CHECK(a.packed_bf16_len == b.packed_bf16_len && b.precision == CD_GEMM_BF16 &&
              memcmp(a.packed_bf16, b.packed_bf16, a.packed_bf16_len * sizeof(uint32_t)) == 0,
              "pack_bf16 %dx%d differs from pack + to_bf16", OC, K);
        int same = cd_gemm_unpack(&b, back) == 0;
        for (size_t i = 0; same && i < n; i++) same = back[i] == cd_bf16_round(w[i]);
        CHECK(same, "unpack of bf16 %dx%d is not the bf16-rounded weight", OC, K);
        cd_gemm_weight_free(&a);
        cd_gemm_weight_free(&b);
        free(w);
        free(back);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    fixture fx;
    if (load_fixture(&fx)) {
        free_fixture(&fx);
        return 2;
    }
    check_ops();
    check_pack_roundtrip();
    check_safetensors();
    check_model(&fx, "model_oc_f32.safetensors", CD_LAYOUT_OPEN_CLIP);
    check_model(&fx, "model_oc_f32_odd.safetensors", CD_LAYOUT_OPEN_CLIP);
    check_model(&fx, "model_hf_f16.safetensors", CD_LAYOUT_HF);
    check_model(&fx, "model_oc_bf16.safetensors", CD_LAYOUT_OPEN_CLIP);
    const char *isa = cd_isa_name();
    if (strcmp(isa, "generic") != 0 && cd_set_isa("generic") == 0) {
        printf("  (the generic path)\n");
        check_model(&fx, "model_oc_f32.safetensors", CD_LAYOUT_OPEN_CLIP);
        cd_set_isa(isa);
    }
    check_runtime_errors(&fx);
    check_load_errors(&fx);
    free_fixture(&fx);
    printf("%d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
