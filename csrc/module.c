/* module.c -- the CPython extension clipdecomp._core: argument checking and ownership only.
 *
 *   Model(path, config, layout="auto", precision="fp32")
 *       .config -> dict, .layout -> "open_clip" | "hf", .path -> str, .nbytes -> int,
 *       .raw_logit_scale -> float | None (as stored: a log)
 *       .encode_image(pixels [B, 3, S, S], *, heads=False, mlps=False, cls_to_cls=False,
 *                     tokens=False, probe=None [T, D], attn=False, threads=0,
 *                     token_embeddings=False, pool_tokens=False, out=None) -> dict
 *           keys: embedding [B, D], ln_stats [B, 3] and, as requested, heads [B, L, H, D],
 *           mlps [B, L+1, D], cls_to_cls [B, L, D], tokens [B, L, N, H, D],
 *           probe [B, L, N, H, T], attn_cls [B, L, H, N], attn_mean [B, L, N, N], ... (the
 *           list is cd_vision_outputs'). The core writes into out[key] where the caller gives
 *           an array (float32, C order, that shape: e.g. a slice of a larger result), into a
 *           new array otherwise; the dict holds those arrays.
 *       .neuron_coefs(pixels, layer, *, record=None, threads=0, scratch_budget=0) -> dict
 *           (neurons.h)
 *       .encode_text(ids [T, C], *, threads=0, out=None [T, D]) -> [T, D] (out when given)
 *       .set_precision("bf16" | "bf16-emulated"), .precision -> "fp32" | "bf16" | "bf16-emulated"
 *   image_plan(config, images, **options) -> dict: the memory of an encode_image call
 *   isa(), set_isa(name), has_bf16(), _matmul, _sgemm_nt, _sgemm_nn (kernel tests),
 *   _moments_update (HeadStats: per-head second moments), _neuron_fold_apply (neurons.h)
 *
 * The computation runs with the GIL released; between layers the core asks, from the calling
 * thread, whether to stop: the GIL is taken back briefly and pending signals are run (Ctrl-C in
 * Jupyter raises KeyboardInterrupt).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>

#ifndef NPY_NO_DEPRECATED_API
#define NPY_NO_DEPRECATED_API NPY_1_20_API_VERSION
#endif
#include <numpy/arrayobject.h>

#include "clipdecomp.h"
#include "cpu.h"
#include "gemm.h"
#include "moments.h"
#include "neurons.h"
#include "safetensors.h"

typedef struct {
    PyObject_HEAD
    cd_model *m;
    PyObject *path;  /* str */
    double ln_eps;   /* as given (the core keeps a float) */
} ModelObject;

static const char *CONFIG_INTS[] = {"image_size", "patch_size", "width", "layers", "heads",
                                    "mlp_dim", "embed_dim"};
static const char *TEXT_INTS[] = {"context_length", "vocab_size", "text_width", "text_heads",
                                  "text_mlp_dim"};

/* ------------------------------------------------------------------------------------------ */
/* errors                                                                                      */

/* Raise the exception of a failed core call. path (may be NULL) prefixes the message when the
 * message does not name it already. */
static PyObject *raise_status(cd_status st, const cd_error *err, const char *path) {
    const char *msg = err->msg[0] ? err->msg : "clipdecomp core error";
    PyObject *exc;
    switch (st) {
        case CD_ERR_IO:
            exc = strstr(msg, strerror(ENOENT)) ? PyExc_FileNotFoundError : PyExc_OSError;
            break;
        case CD_ERR_NOMEM: exc = PyExc_MemoryError; break;
        case CD_ERR_INTERRUPTED:
            if (PyErr_Occurred()) return NULL;  /* raised by a signal handler */
            exc = PyExc_KeyboardInterrupt;
            break;
        default: exc = PyExc_ValueError; break;  /* FORMAT, MISSING, SHAPE, VALUE */
    }
    /* PyErr_Format decodes %s as UTF-8 with "replace": a message cut inside a character, or
     * quoting bytes of a corrupt file, still gives the exception asked for */
    if (path && !strstr(msg, path) && st != CD_ERR_INTERRUPTED)
        PyErr_Format(exc, "%s: %s", path, msg);
    else
        PyErr_Format(exc, "%s", msg);
    return NULL;
}

/* the cancel callback: run pending signal handlers with the GIL held */
static int py_cancel(void *ctx) {
    (void)ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    int stop = PyErr_CheckSignals() != 0;
    PyGILState_Release(g);
    return stop;
}

static PyObject *shape_str(PyArrayObject *a) {
    PyObject *shape = PyObject_GetAttrString((PyObject *)a, "shape");
    if (!shape) return NULL;
    PyObject *s = PyObject_Str(shape);
    Py_DECREF(shape);
    return s;
}

/* a float32 C-contiguous array of `ndim` dimensions from any array-like (cast if needed) */
static PyArrayObject *as_f32(PyObject *obj, const char *name, int ndim, const char *expect) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(
        obj, NPY_FLOAT32, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != ndim) {
        PyObject *s = shape_str(a);
        if (s) PyErr_Format(PyExc_ValueError, "%s must have shape %s, got %U", name, expect, s);
        Py_XDECREF(s);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static int dim_error(PyArrayObject *a, const char *name, const char *expect) {
    PyObject *s = shape_str(a);
    if (s) PyErr_Format(PyExc_ValueError, "%s must have shape %s, got %U", name, expect, s);
    Py_XDECREF(s);
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Model                                                                                       */

static int cfg_get_int(PyObject *d, const char *key, int *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);  /* borrowed */
    if (!v) {
        if (required) {
            PyErr_Format(PyExc_ValueError, "config lacks '%s'", key);
            return -1;
        }
        return 0;
    }
    PyObject *idx = PyNumber_Index(v);
    if (!idx) {
        PyErr_Format(PyExc_TypeError, "config['%s'] must be an integer", key);
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "config['%s'] = %R is out of range", key, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int cfg_get_act(PyObject *d, const char *key, int *out, int required) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) {
            PyErr_Format(PyExc_ValueError,
                         "config lacks '%s' ('gelu' or 'quick_gelu'): nothing in the weights "
                         "tells which one the model was trained with", key);
            return -1;
        }
        return 0;
    }
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (s && !strcmp(s, "gelu")) { *out = CD_ACT_GELU; return 0; }
    if (s && !strcmp(s, "quick_gelu")) { *out = CD_ACT_QUICK_GELU; return 0; }
    if (s && !strcmp(s, "gelu_tanh")) { *out = CD_ACT_GELU_TANH; return 0; }
    if (PyErr_Occurred()) return -1;
    PyErr_Format(PyExc_ValueError, "config['%s'] must be 'gelu', 'quick_gelu' or 'gelu_tanh', "
                 "got %R", key, v);
    return -1;
}

static int parse_config(PyObject *d, cd_config *c, double *ln_eps) {
    memset(c, 0, sizeof *c);
    int *vis[] = {&c->image_size, &c->patch_size, &c->width, &c->layers, &c->heads, &c->mlp_dim,
                  &c->embed_dim};
    for (size_t i = 0; i < sizeof vis / sizeof vis[0]; i++)
        if (cfg_get_int(d, CONFIG_INTS[i], vis[i], 1)) return -1;
    if (cfg_get_act(d, "act", &c->act, 1)) return -1;
    *ln_eps = 1e-5;
    PyObject *eps = PyDict_GetItemString(d, "ln_eps");
    if (eps) {
        double e = PyFloat_AsDouble(eps);
        if (e == -1.0 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "config['ln_eps'] = %R is out of range", eps);
            }
            return -1;
        }
        *ln_eps = e;
    }
    c->ln_eps = (float)*ln_eps;
    if (cfg_get_int(d, "text_layers", &c->text_layers, 0)) return -1;
    int *txt[] = {&c->context_length, &c->vocab_size, &c->text_width, &c->text_heads,
                  &c->text_mlp_dim};
    const int need = c->text_layers > 0;
    for (size_t i = 0; i < sizeof txt / sizeof txt[0]; i++)
        if (cfg_get_int(d, TEXT_INTS[i], txt[i], need)) return -1;
    if (cfg_get_act(d, "text_act", &c->text_act, need)) return -1;
    PyObject *fam = PyDict_GetItemString(d, "family");  /* borrowed; absent: CLIP */
    if (fam) {
        const char *f = PyUnicode_Check(fam) ? PyUnicode_AsUTF8(fam) : NULL;
        if (f && !strcmp(f, "clip")) c->family = CD_FAMILY_CLIP;
        else if (f && !strcmp(f, "siglip")) c->family = CD_FAMILY_SIGLIP;
        else {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "config['family'] must be 'clip' or 'siglip', "
                             "got %R", fam);
            return -1;
        }
    }
    return 0;
}

static const char *PRECISION_NAMES[] = {"fp32", "bf16", "bf16-emulated"};

/* "fp32" | "bf16" | "bf16-emulated" -> cd_precision, or -1 with a ValueError set */
static int precision_from(const char *name, const char *who) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, PRECISION_NAMES[i]) == 0) return i;
    PyErr_Format(PyExc_ValueError, "%s: precision must be 'fp32', 'bf16' or 'bf16-emulated', "
                 "not '%s'", who, name);
    return -1;
}

static PyObject *Model_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"path", "config", "layout", "precision", NULL};
    PyObject *path_bytes = NULL, *cfg_dict;
    const char *layout_s = "auto", *precision_s = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&O!|ss:Model", kwlist, PyUnicode_FSConverter,
                                     &path_bytes, &PyDict_Type, &cfg_dict, &layout_s,
                                     &precision_s))
        return NULL;
    const int precision = precision_from(precision_s, "Model");
    if (precision < 0) {
        Py_DECREF(path_bytes);
        return NULL;
    }
    cd_layout layout;
    if (!strcmp(layout_s, "auto")) layout = CD_LAYOUT_AUTO;
    else if (!strcmp(layout_s, "open_clip")) layout = CD_LAYOUT_OPEN_CLIP;
    else if (!strcmp(layout_s, "hf")) layout = CD_LAYOUT_HF;
    else {
        Py_DECREF(path_bytes);
        PyErr_Format(PyExc_ValueError, "layout must be 'auto', 'open_clip' or 'hf', got '%s'",
                     layout_s);
        return NULL;
    }
    cd_config cfg;
    double ln_eps;
    if (parse_config(cfg_dict, &cfg, &ln_eps)) {
        Py_DECREF(path_bytes);
        return NULL;
    }
    ModelObject *self = (ModelObject *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(path_bytes);
        return NULL;
    }
    self->ln_eps = ln_eps;
    const char *path = PyBytes_AS_STRING(path_bytes);
    self->path = PyUnicode_DecodeFSDefault(path);
    if (!self->path) {
        Py_DECREF(path_bytes);
        Py_DECREF(self);
        return NULL;
    }
    cd_error err;
    cd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = cd_model_load_as(&self->m, path, &cfg, layout, (cd_precision)precision, &err);
    Py_END_ALLOW_THREADS
    if (st != CD_OK) {
        raise_status(st, &err, path);
        Py_DECREF(path_bytes);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(path_bytes);
    return (PyObject *)self;
}

static void Model_dealloc(ModelObject *self) {
    cd_model_free(self->m);
    Py_XDECREF(self->path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static const char *act_name(int act) {
    return act == CD_ACT_QUICK_GELU ? "quick_gelu" : act == CD_ACT_GELU_TANH ? "gelu_tanh" : "gelu";
}

static PyObject *Model_get_config(ModelObject *self, void *closure) {
    (void)closure;
    const cd_config *c = cd_model_config(self->m);
    int vals[] = {c->image_size, c->patch_size, c->width, c->layers, c->heads, c->mlp_dim,
                  c->embed_dim};
    int tvals[] = {c->context_length, c->vocab_size, c->text_width, c->text_heads,
                   c->text_mlp_dim};
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#define SET(k, expr)                                          \
    do {                                                      \
        PyObject *v_ = (expr);                                \
        if (!v_ || PyDict_SetItemString(d, (k), v_) < 0) {    \
            Py_XDECREF(v_);                                   \
            Py_DECREF(d);                                     \
            return NULL;                                      \
        }                                                     \
        Py_DECREF(v_);                                        \
    } while (0)
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
        SET(CONFIG_INTS[i], PyLong_FromLong(vals[i]));
    SET("act", PyUnicode_FromString(act_name(c->act)));
    SET("ln_eps", PyFloat_FromDouble(self->ln_eps));
    for (size_t i = 0; i < sizeof tvals / sizeof tvals[0]; i++)
        SET(TEXT_INTS[i], PyLong_FromLong(tvals[i]));
    SET("text_layers", PyLong_FromLong(c->text_layers));
    SET("text_act", PyUnicode_FromString(act_name(c->text_act)));
    if (c->family == CD_FAMILY_SIGLIP) SET("family", PyUnicode_FromString("siglip"));
#undef SET
    return d;
}

static PyObject *Model_get_layout(ModelObject *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(cd_model_layout(self->m) == CD_LAYOUT_HF ? "hf" : "open_clip");
}

static PyObject *Model_get_path(ModelObject *self, void *closure) {
    (void)closure;
    Py_INCREF(self->path);
    return self->path;
}

static PyObject *Model_get_logit_scale(ModelObject *self, void *closure) {
    (void)closure;
    float v;
    if (!cd_model_logit_scale(self->m, &v)) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)v);
}

static PyObject *Model_get_logit_bias(ModelObject *self, void *closure) {
    (void)closure;
    float v;
    if (!cd_model_logit_bias(self->m, &v)) Py_RETURN_NONE;
    return PyFloat_FromDouble((double)v);
}

/* [lo, hi) of the bytes an array with non-negative strides spans (hi == lo when empty) */
static void array_extent(PyArrayObject *a, char **lo, char **hi) {
    char *p = (char *)PyArray_DATA(a);
    npy_intp last = PyArray_ITEMSIZE(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        if (PyArray_DIM(a, i) == 0) { *lo = *hi = p; return; }
        last += (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
    }
    *lo = p;
    *hi = p + last;
}

static int arrays_overlap(PyArrayObject *a, PyArrayObject *b) {
    char *alo, *ahi, *blo, *bhi;
    array_extent(a, &alo, &ahi);
    array_extent(b, &blo, &bhi);
    return alo < bhi && blo < ahi;
}

static PyObject *dims_tuple(int nd, const npy_intp *dims) {
    PyObject *t = PyTuple_New(nd);
    for (int i = 0; t && i < nd; i++) {
        PyObject *v = PyLong_FromSsize_t((Py_ssize_t)dims[i]);
        if (!v) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* An output array given by the caller as out[name]: float32, C-contiguous, aligned, writeable,
 * of shape dims. Returns a new reference, or NULL with ValueError / TypeError set. */
static PyArrayObject *out_array(PyObject *obj, const char *name, int nd, const npy_intp *dims) {
    PyArrayObject *a = PyArray_Check(obj) ? (PyArrayObject *)obj : NULL;
    int ok = a && PyArray_TYPE(a) == NPY_FLOAT32 && PyArray_IS_C_CONTIGUOUS(a) &&
             PyArray_ISALIGNED(a) && PyArray_ISWRITEABLE(a) && PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; i++) ok = PyArray_DIM(a, i) == dims[i];
    if (ok) {
        Py_INCREF(obj);
        return a;
    }
    PyObject *want = dims_tuple(nd, dims);
    if (!want) return NULL;
    if (!a)
        PyErr_Format(PyExc_TypeError, "out['%s'] must be a numpy array of shape %R, got %s", name,
                     want, Py_TYPE(obj)->tp_name);
    else {
        PyObject *got = PyObject_GetAttrString(obj, "shape");
        if (got)
            PyErr_Format(PyExc_ValueError, "out['%s'] must be a writeable, C-contiguous, aligned "
                         "float32 array of shape %R; got %s %R%s%s", name, want,
                         PyArray_DESCR(a)->typeobj->tp_name, got,
                         PyArray_IS_C_CONTIGUOUS(a) ? "" : ", not C-contiguous",
                         PyArray_ISWRITEABLE(a) ? "" : ", read-only");
        Py_XDECREF(got);
    }
    Py_DECREF(want);
    return NULL;
}

/* Every key of out (a dict or None) names one of the n outputs of the call. */
static int check_out_keys(PyObject *out, const char *const *names, int n) {
    if (out == Py_None) return 0;
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (PyDict_Next(out, &pos, &key, &val)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        int found = 0;
        for (int i = 0; k && i < n; i++) found |= !strcmp(k, names[i]);
        if (!found) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "out[%R]: not an output of this call", key);
            return -1;
        }
    }
    return 0;
}

/* The output arrays of a call: out[name] where given (checked), else new empty arrays (the core
 * writes every element). None of them may overlap another or the inputs `ins`. */
static int output_arrays(PyObject *out, int k, const char *const *names, const int *nds,
                         npy_intp (*dims)[5], PyArrayObject **arrs, PyArrayObject **ins,
                         int n_ins) {
    if (check_out_keys(out, names, k)) return -1;
    for (int i = 0; i < k; i++) {
        PyObject *given = out != Py_None ? PyDict_GetItemString(out, names[i]) : NULL;
        if (given) {
            arrs[i] = out_array(given, names[i], nds[i], dims[i]);
            if (!arrs[i]) return -1;
            for (int j = 0; j < i + n_ins; j++) {
                PyArrayObject *other = j < i ? arrs[j] : ins[j - i];
                if (other && arrays_overlap(arrs[i], other)) {
                    if (j < i)
                        PyErr_Format(PyExc_ValueError, "out['%s'] shares memory with out['%s']",
                                     names[i], names[j]);
                    else
                        PyErr_Format(PyExc_ValueError, "out['%s'] shares memory with an input",
                                     names[i]);
                    return -1;
                }
            }
        } else {
            arrs[i] = (PyArrayObject *)PyArray_SimpleNew(nds[i], dims[i], NPY_FLOAT32);
            if (!arrs[i]) return -1;
        }
    }
    return 0;
}

/* the options of one image call, as the Python keywords give them (no probe, no cancel) */
static cd_vision_opts vision_opts(int heads, int mlps, int cls, int tokens, int attn, int tok_emb,
                                  int pool_tokens, int threads) {
    cd_vision_opts o;
    memset(&o, 0, sizeof o);
    o.heads = heads;
    o.mlps = mlps;
    o.cls_to_cls = cls;
    o.tokens = tokens;
    o.attn = attn;
    o.token_embeddings = tok_emb;
    o.pool_tokens = pool_tokens;
    o.threads = threads > 0 ? threads : 0;
    return o;
}

static PyObject *Model_encode_image(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pixels", "heads", "mlps", "cls_to_cls", "tokens", "probe", "attn",
                             "threads", "token_embeddings", "pool_tokens", "out", NULL};
    PyObject *pix_obj, *probe_obj = Py_None, *out_obj = Py_None;
    int heads = 0, mlps = 0, cls = 0, tokens = 0, attn = 0, threads = 0, tok_emb = 0;
    int pool_tokens = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$ppppOpippO:encode_image", kwlist, &pix_obj,
                                     &heads, &mlps, &cls, &tokens, &probe_obj, &attn, &threads,
                                     &tok_emb, &pool_tokens, &out_obj))
        return NULL;
    if (out_obj != Py_None && !PyDict_Check(out_obj)) {
        PyErr_SetString(PyExc_TypeError, "out must be a dict of output arrays or None");
        return NULL;
    }
    const cd_config *c = cd_model_config(self->m);
    const int S = c->image_size, D = c->embed_dim;
    char expect[96];
    snprintf(expect, sizeof expect, "[B, 3, %d, %d]", S, S);
    PyArrayObject *pix = as_f32(pix_obj, "pixels", 4, expect);
    if (!pix) return NULL;
    npy_intp *pd = PyArray_DIMS(pix);
    if (pd[1] != 3 || pd[2] != S || pd[3] != S || pd[0] > INT32_MAX) {
        dim_error(pix, "pixels", expect);
        Py_DECREF(pix);
        return NULL;
    }
    PyArrayObject *probe = NULL;
    char pexpect[64];
    snprintf(pexpect, sizeof pexpect, "[T, %d]", D);
    if (probe_obj != Py_None) {
        probe = as_f32(probe_obj, "probe", 2, pexpect);
        if (!probe) {
            Py_DECREF(pix);
            return NULL;
        }
        if (PyArray_DIM(probe, 1) != D || PyArray_DIM(probe, 0) < 1 ||
            PyArray_DIM(probe, 0) > INT32_MAX) {
            dim_error(probe, "probe", pexpect);
            Py_DECREF(pix);
            Py_DECREF(probe);
            return NULL;
        }
    }
    cd_vision_opts o = vision_opts(heads, mlps, cls, tokens, attn, tok_emb, pool_tokens, threads);
    if (probe) {
        o.probe = (const float *)PyArray_DATA(probe);
        o.n_probe = (int)PyArray_DIM(probe, 0);
    }
    o.cancel = py_cancel;
    const int B = (int)pd[0];

    /* the outputs: the caller's arrays where given, new ones for the rest */
    cd_vision_result r;
    memset(&r, 0, sizeof r);
    cd_vision_output outs[CD_VISION_MAX_OUTPUTS];
    const int k = cd_vision_outputs(c, &o, B, &r, outs);
    const char *names[CD_VISION_MAX_OUTPUTS];
    int nds[CD_VISION_MAX_OUTPUTS];
    npy_intp dims[CD_VISION_MAX_OUTPUTS][5];
    PyArrayObject *arrs[CD_VISION_MAX_OUTPUTS] = {NULL};
    PyArrayObject *ins[2] = {pix, probe};
    PyObject *d = NULL;
    for (int i = 0; i < k; i++) {
        names[i] = outs[i].name;
        nds[i] = outs[i].ndim;
        for (int j = 0; j < outs[i].ndim; j++) dims[i][j] = (npy_intp)outs[i].dims[j];
    }
    if (output_arrays(out_obj, k, names, nds, dims, arrs, ins, 2)) goto done;
    for (int i = 0; i < k; i++) *outs[i].slot = (float *)PyArray_DATA(arrs[i]);
    {
        const float *images = (const float *)PyArray_DATA(pix);
        cd_error err;
        cd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = cd_encode_image_into(self->m, images, B, &o, &r, &err);
        Py_END_ALLOW_THREADS
        if (st != CD_OK) {
            raise_status(st, &err, NULL);
            goto done;
        }
    }
    d = PyDict_New();
    for (int i = 0; d && i < k; i++)
        if (PyDict_SetItemString(d, names[i], (PyObject *)arrs[i]) < 0) Py_CLEAR(d);
done:
    for (int i = 0; i < k; i++) Py_XDECREF(arrs[i]);
    Py_DECREF(pix);
    Py_XDECREF(probe);
    return d;
}

/* token ids as int32 (T, C): int32 input is used as is, other integer types are range-checked */
static PyArrayObject *as_ids(PyObject *obj, int C) {
    char expect[64];
    snprintf(expect, sizeof expect, "[T, %d]", C);
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, NPY_INT64, 0, 0,
                                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 1) != C || PyArray_DIM(a, 0) > INT32_MAX) {
        dim_error(a, "ids", expect);
        Py_DECREF(a);
        return NULL;
    }
    npy_intp dims[2] = {PyArray_DIM(a, 0), C};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT32);
    if (!out) {
        Py_DECREF(a);
        return NULL;
    }
    const int64_t *src = (const int64_t *)PyArray_DATA(a);
    int32_t *dst = (int32_t *)PyArray_DATA(out);
    const npy_intp n = dims[0] * dims[1];
    for (npy_intp i = 0; i < n; i++) {
        if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "ids[%zd, %zd] = %lld is outside the vocabulary",
                         (Py_ssize_t)(i / C), (Py_ssize_t)(i % C), (long long)src[i]);
            Py_DECREF(a);
            Py_DECREF(out);
            return NULL;
        }
        dst[i] = (int32_t)src[i];
    }
    Py_DECREF(a);
    return out;
}

static PyObject *Model_encode_text(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ids", "threads", "out", NULL};
    PyObject *ids_obj, *out_obj = Py_None;
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$iO:encode_text", kwlist, &ids_obj, &threads,
                                     &out_obj))
        return NULL;
    const cd_config *c = cd_model_config(self->m);
    if (c->text_layers <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "this model has no text tower (loaded with text_layers = 0)");
        return NULL;
    }
    PyArrayObject *ids = as_ids(ids_obj, c->context_length);
    if (!ids) return NULL;
    npy_intp dims[2] = {PyArray_DIM(ids, 0), c->embed_dim};
    PyArrayObject *out = out_obj == Py_None
        ? (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32)
        : out_array(out_obj, "features", 2, dims);
    if (!out) {
        Py_DECREF(ids);
        return NULL;
    }
    const int T = (int)dims[0];
    const int32_t *tok = (const int32_t *)PyArray_DATA(ids);
    float *dst = (float *)PyArray_DATA(out);
    cd_error err;
    cd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = cd_encode_text(self->m, tok, T, dst, threads > 0 ? threads : 0, py_cancel, NULL, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(ids);
    if (st != CD_OK) {
        Py_DECREF(out);
        return raise_status(st, &err, NULL);
    }
    return (PyObject *)out;
}

/* neuron_coefs(pixels, layer, *, record=None, threads=0): the per-image coefficients of the
 * second-order neuron effects (neurons.h) */
static PyObject *Model_neuron_coefs(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pixels", "layer", "record", "threads", "scratch_budget", NULL};
    PyObject *pix_obj, *rec_obj = Py_None;
    int layer, threads = 0;
    Py_ssize_t budget = 0;   /* bytes of scratch per forward chunk; 0: the core's default */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi|$Oin:neuron_coefs", kwlist, &pix_obj,
                                     &layer, &rec_obj, &threads, &budget))
        return NULL;
    if (budget < 0) {
        PyErr_SetString(PyExc_ValueError, "scratch_budget must be >= 0");
        return NULL;
    }
    const cd_config *c = cd_model_config(self->m);
    const int S = c->image_size, L = c->layers, H = c->heads, F = c->mlp_dim, D = c->embed_dim;
    const int G = S / c->patch_size, N = 1 + G * G;
    if (layer < 0 || layer >= L) {
        PyErr_Format(PyExc_ValueError, "layer must be in [0, %d), got %d", L, layer);
        return NULL;
    }
    char expect[96];
    snprintf(expect, sizeof expect, "[B, 3, %d, %d]", S, S);
    PyArrayObject *pix = as_f32(pix_obj, "pixels", 4, expect), *rec = NULL;
    if (!pix) return NULL;
    npy_intp *pd = PyArray_DIMS(pix);
    if (pd[1] != 3 || pd[2] != S || pd[3] != S || pd[0] > INT32_MAX) {
        dim_error(pix, "pixels", expect);
        Py_DECREF(pix);
        return NULL;
    }
    npy_intp R = 0;
    if (rec_obj != Py_None) {
        rec = (PyArrayObject *)PyArray_FROMANY(rec_obj, NPY_INT32, 1, 1,
                                               NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!rec) {
            Py_DECREF(pix);
            return NULL;
        }
        R = PyArray_DIM(rec, 0);
        if (R > INT32_MAX) R = -1;
    }
    const npy_intp B = pd[0], J = L - 1 - layer;
    npy_intp dims[][4] = {{B, J, H, F}, {B, J, H, 2}, {B, F}, {B, N, R}, {B, D}, {B, 3}};
    const int nds[] = {4, 4, 2, 3, 2, 2};
    const char *keys[] = {"coef", "aux", "act_cls", "acts", "embedding", "ln_stats"};
    PyObject *arr[6] = {NULL, NULL, NULL, NULL, NULL, NULL};
    PyObject *d = NULL;
    for (int i = 0; i < 6; i++) {
        if (i == 3 && R <= 0) continue;
        arr[i] = PyArray_ZEROS(nds[i], dims[i], NPY_FLOAT32, 0);
        if (!arr[i]) goto fail;
    }
    {
        cd_error err;
        cd_status st;
        float *p[6];
        for (int i = 0; i < 6; i++)
            p[i] = arr[i] ? (float *)PyArray_DATA((PyArrayObject *)arr[i]) : NULL;
        const int32_t *rp = rec ? (const int32_t *)PyArray_DATA(rec) : NULL;
        const float *images = (const float *)PyArray_DATA(pix);
        Py_BEGIN_ALLOW_THREADS
        st = cd_neuron_coefs_budget(self->m, images, (int)B, layer, rp, (int)R,
                                    threads > 0 ? threads : 0, py_cancel, NULL, p[0], p[1], p[2],
                                    p[3], p[4], p[5], &err, (size_t)budget);
        Py_END_ALLOW_THREADS
        if (st != CD_OK) {
            raise_status(st, &err, NULL);
            goto fail;
        }
    }
    d = PyDict_New();
    if (!d) goto fail;
    for (int i = 0; i < 6; i++)
        if (arr[i] && PyDict_SetItemString(d, keys[i], arr[i]) < 0) {
            Py_CLEAR(d);
            goto fail;
        }
fail:
    for (int i = 0; i < 6; i++) Py_XDECREF(arr[i]);
    Py_DECREF(pix);
    Py_XDECREF(rec);
    return d;
}

static PyObject *Model_set_precision(ModelObject *self, PyObject *arg) {
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "set_precision() takes a str");
        return NULL;
    }
    int p = precision_from(name, "set_precision");
    if (p < 0) return NULL;
    cd_error err;
    err.msg[0] = 0;
    cd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = cd_model_set_precision(self->m, (cd_precision)p, &err);
    Py_END_ALLOW_THREADS
    if (st != CD_OK) return raise_status(st, &err, NULL);
    Py_RETURN_NONE;
}

static PyObject *Model_get_nbytes(ModelObject *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(cd_model_nbytes(self->m));
}

static PyObject *Model_get_precision(ModelObject *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(PRECISION_NAMES[cd_model_precision(self->m)]);
}

static PyMethodDef Model_methods[] = {
    {"set_precision", (PyCFunction)Model_set_precision, METH_O,
     "set_precision(name): convert the blocks' weights to 'bf16' (AVX512_BF16 CPUs) or "
     "'bf16-emulated' (any CPU), once, right after loading; not while the model is in use."},
    {"encode_image", (PyCFunction)(void (*)(void))Model_encode_image, METH_VARARGS | METH_KEYWORDS,
     "encode_image(pixels, *, heads=False, mlps=False, cls_to_cls=False, tokens=False, "
     "probe=None, attn=False, threads=0, token_embeddings=False, pool_tokens=False, out=None) "
     "-> dict\n\n"
     "pixels: float32 [B, 3, S, S], already normalised. Returns embedding [B, D] (not "
     "normalised), ln_stats [B, 3] (mu, sigma, ||embedding||) and the requested terms: heads "
     "[B, L, H, D], mlps [B, L+1, D], cls_to_cls [B, L, D], tokens [B, L, N, H, D], probe "
     "[B, L, N, H, T] (= tokens @ probe.T), attn_cls [B, L, H, N], attn_mean [B, L, N, N], "
     "token_embeddings [B, N, D]; SigLIP: pool_heads [B, H, D], pool_tokens [B, N, H, D], "
     "pool_mlp [B, D], pool_attn [B, H, N]. out: a dict of arrays to write into (float32, "
     "C-contiguous, writeable, each of its key's shape); the others are allocated."},
    {"neuron_coefs", (PyCFunction)(void (*)(void))Model_neuron_coefs,
     METH_VARARGS | METH_KEYWORDS,
     "neuron_coefs(pixels, layer, *, record=None, threads=0, scratch_budget=0) -> dict\n\n"
     "Per-image coefficients of the second-order effects of the MLP neurons of `layer` "
     "(csrc/neurons.h): coef [B, J, H, F], aux [B, J, H, 2], act_cls [B, F], embedding [B, D], "
     "ln_stats [B, 3] and, given record (R neuron indices), acts [B, N, R]."},
    {"encode_text", (PyCFunction)(void (*)(void))Model_encode_text, METH_VARARGS | METH_KEYWORDS,
     "encode_text(ids, *, threads=0, out=None) -> ndarray\n\n"
     "ids: integer [T, C] token ids. Returns float32 [T, D] features (not normalised) at the "
     "position of each row's largest id (the end-of-text token; SigLIP: the last position). "
     "out: a float32 [T, D] array to write into (C-contiguous, writeable); returned."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"config", (getter)Model_get_config, NULL, "the model's configuration (a new dict)", NULL},
    {"layout", (getter)Model_get_layout, NULL, "'open_clip' or 'hf': the key layout found", NULL},
    {"path", (getter)Model_get_path, NULL, "the checkpoint's path", NULL},
    {"nbytes", (getter)Model_get_nbytes, NULL,
     "bytes the model holds: its weights as stored, plus the per-token fold once built", NULL},
    {"precision", (getter)Model_get_precision, NULL,
     "'fp32', 'bf16' or 'bf16-emulated': the precision of the blocks' matrix products", NULL},
    {"raw_logit_scale", (getter)Model_get_logit_scale, NULL,
     "the checkpoint's logit_scale as stored (a log; exp() of it is CLIP's scale), or None",
     NULL},
    {"raw_logit_bias", (getter)Model_get_logit_bias, NULL,
     "the checkpoint's logit_bias as stored (SigLIP), or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "clipdecomp._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(path, config, layout='auto', precision='fp32')\n\n"
              "A CLIP checkpoint (.safetensors, open_clip or HF transformers layout, F32/F16/BF16) "
              "loaded by the C core, its blocks' weights in `precision` ('fp32', 'bf16', "
              "'bf16-emulated'), converted one by one as they are packed. config: dict of image_size, patch_size, width, layers, "
              "heads, mlp_dim, embed_dim, act ('gelu' | 'quick_gelu'), ln_eps (default 1e-5) "
              "and, for the text tower, text_layers (0 or absent: none), context_length, "
              "vocab_size, text_width, text_heads, text_mlp_dim, text_act.",
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
    .tp_new = Model_new,
};

/* ------------------------------------------------------------------------------------------ */
/* module functions                                                                            */

static PyObject *mod_isa(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    return PyUnicode_FromString(cd_isa_name());
}

static PyObject *mod_has_bf16(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    return PyBool_FromLong(cd_has_bf16());
}

static PyObject *mod_bf16_kernel(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    return PyUnicode_FromString(cd_bf16_kernel_name());
}

static PyObject *mod_set_isa(PyObject *mod, PyObject *arg) {
    (void)mod;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "set_isa() takes a str");
        return NULL;
    }
    if (cd_set_isa(name) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "instruction set '%s' is unknown or not available on this CPU "
                     "(names: avx512, avx2, generic)", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *mod_matmul(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"inp", "weight", "bias", "naive", "repeat", "precision", NULL};
    PyObject *io, *wo, *bo = Py_None;
    int naive = 0;
    int repeat = 1;   /* pack once, multiply `repeat` times (for benchmarks) */
    const char *pname = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|Opis:_matmul", kwlist, &io, &wo, &bo, &naive,
                                     &repeat, &pname))
        return NULL;
    const int prec = precision_from(pname, "_matmul");
    if (prec < 0) return NULL;
    if (prec == CD_PRECISION_BF16 && !naive && !cd_has_bf16()) {
        PyErr_SetString(PyExc_ValueError, "_matmul: precision 'bf16' needs AVX512_BF16 (see "
                        "has_bf16()); 'bf16-emulated' gives its numbers on any CPU");
        return NULL;
    }
    if (repeat < 1) {
        PyErr_SetString(PyExc_ValueError, "_matmul: repeat must be >= 1");
        return NULL;
    }
    PyArrayObject *inp = as_f32(io, "inp", 2, "[M, K]"), *w = NULL, *b = NULL, *out = NULL;
    if (!inp) return NULL;
    const npy_intp M = PyArray_DIM(inp, 0), K = PyArray_DIM(inp, 1);
    if (!(w = as_f32(wo, "weight", 2, "[OC, K]"))) goto fail;
    const npy_intp OC = PyArray_DIM(w, 0);
    if (PyArray_DIM(w, 1) != K || K < 1 || OC < 1 || M > INT32_MAX || K > INT32_MAX ||
        OC > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "_matmul: inp [M, K] and weight [OC, K] with K, OC >= 1");
        goto fail;
    }
    if (bo != Py_None) {
        if (!(b = as_f32(bo, "bias", 1, "[OC]"))) goto fail;
        if (PyArray_DIM(b, 0) != OC) {
            dim_error(b, "bias", "[OC]");
            goto fail;
        }
    }
    npy_intp dims[2] = {M, OC};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto fail;
    {
        const float *pi = (const float *)PyArray_DATA(inp), *pw = (const float *)PyArray_DATA(w);
        const float *pb = b ? (const float *)PyArray_DATA(b) : NULL;
        float *po = (float *)PyArray_DATA(out);
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        if (M > 0) {
            if (naive && prec != CD_PRECISION_FP32) {
                cd_matmul_bf16_naive(po, pi, pw, pb, (int)M, (int)K, (int)OC, 0);
            } else if (naive) {
                cd_matmul_naive(po, pi, pw, pb, (int)M, (int)K, (int)OC, 0);
            } else {
                cd_gemm_weight packed;
                memset(&packed, 0, sizeof packed);
                rc = cd_gemm_pack(&packed, pw, (int)OC, (int)K);
                if (!rc && prec != CD_PRECISION_FP32)
                    rc = cd_gemm_to_bf16(&packed, prec == CD_PRECISION_BF16
                                                      ? CD_GEMM_BF16 : CD_GEMM_BF16_EMULATED);
                if (!rc) for (int r = 0; r < repeat; r++) cd_matmul(po, pi, &packed, pb, (int)M, 0);
                cd_gemm_weight_free(&packed);
            }
        }
        Py_END_ALLOW_THREADS
        if (rc) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    Py_DECREF(inp);
    Py_DECREF(w);
    Py_XDECREF(b);
    return (PyObject *)out;
fail:
    Py_XDECREF(inp);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(out);
    return NULL;
}

/* C = A @ B^T (nt) or A @ B (nn) */
static PyObject *sgemm_common(PyObject *args, PyObject *kwds, int nt) {
    static char *kwlist[] = {"A", "B", "naive", NULL};
    PyObject *ao, *bo;
    int naive = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, nt ? "OO|p:_sgemm_nt" : "OO|p:_sgemm_nn", kwlist,
                                     &ao, &bo, &naive))
        return NULL;
    PyArrayObject *A = as_f32(ao, "A", 2, "[M, K]"), *B = NULL, *C = NULL;
    if (!A) return NULL;
    if (!(B = as_f32(bo, "B", 2, nt ? "[N, K]" : "[K, N]"))) goto fail;
    const npy_intp M = PyArray_DIM(A, 0), K = PyArray_DIM(A, 1);
    const npy_intp N = nt ? PyArray_DIM(B, 0) : PyArray_DIM(B, 1);
    const npy_intp KB = nt ? PyArray_DIM(B, 1) : PyArray_DIM(B, 0);
    if (KB != K || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) {
        dim_error(B, "B", nt ? "[N, K] with K = A.shape[1]" : "[K, N] with K = A.shape[1]");
        goto fail;
    }
    npy_intp dims[2] = {M, N};
    if (!(C = (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_FLOAT32, 0))) goto fail;
    {
        const float *pa = (const float *)PyArray_DATA(A), *pb = (const float *)PyArray_DATA(B);
        float *pc = (float *)PyArray_DATA(C);
        const int m = (int)M, n = (int)N, k = (int)K;
        Py_BEGIN_ALLOW_THREADS
        if (m > 0 && n > 0) {
            if (nt) {
                if (naive) cd_sgemm_nt_naive(m, n, k, 1.0f, pa, k, pb, k, pc, n, 0);
                else cd_sgemm_nt(m, n, k, 1.0f, pa, k, pb, k, pc, n, 0);
            } else {
                if (naive) cd_sgemm_nn_naive(m, n, k, 1.0f, pa, k, pb, n, pc, n, 0);
                else cd_sgemm_nn(m, n, k, 1.0f, pa, k, pb, n, pc, n, 0);
            }
        }
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(A);
    Py_DECREF(B);
    return (PyObject *)C;
fail:
    Py_XDECREF(A);
    Py_XDECREF(B);
    Py_XDECREF(C);
    return NULL;
}

static PyObject *mod_sgemm_nt(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    return sgemm_common(args, kwds, 1);
}

static PyObject *mod_sgemm_nn(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    return sgemm_common(args, kwds, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* _moments_update(outer, sums, x): the per-head second moments of HeadStats (moments.h)      */

/* obj as an ndarray of `type` (native byte order, aligned) with `ndim` dimensions, borrowed;
 * NULL with TypeError / ValueError naming `name` and `expect` */
static PyArrayObject *moments_arg(PyObject *obj, const char *name, int type, const char *tname,
                                  int ndim, const char *expect) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "_moments_update: %s must be a numpy.ndarray of %s %s, "
                     "got %s", name, tname, expect, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "_moments_update: %s must be %s %s (native byte order), "
                     "got dtype %S", name, tname, expect, (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyObject *s = shape_str(a);
        if (s) PyErr_Format(PyExc_ValueError, "_moments_update: %s must have shape %s, got %U",
                            name, expect, s);
        Py_XDECREF(s);
        return NULL;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "_moments_update: %s must be aligned", name);
        return NULL;
    }
    return a;
}

/* an accumulator: also C-contiguous and writeable */
static int moments_acc_ok(PyArrayObject *a, const char *name, const char *expect) {
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "_moments_update: %s %s must be C-contiguous (it is "
                     "updated in place)", name, expect);
        return 0;
    }
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "_moments_update: %s %s is read-only", name, expect);
        return 0;
    }
    return 1;
}

static PyObject *mod_moments_update(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"outer", "sums", "x", NULL};
    PyObject *oo, *so, *xo;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:_moments_update", kwlist, &oo, &so, &xo))
        return NULL;
    PyArrayObject *outer = moments_arg(oo, "outer", NPY_FLOAT64, "float64", 3, "[K, D, D]");
    if (!outer || !moments_acc_ok(outer, "outer", "[K, D, D]")) return NULL;
    const npy_intp K = PyArray_DIM(outer, 0), D = PyArray_DIM(outer, 1);
    if (PyArray_DIM(outer, 2) != D) {
        PyObject *s = shape_str(outer);
        if (s) PyErr_Format(PyExc_ValueError, "_moments_update: outer must have shape [K, D, D] "
                            "(square in the last two axes), got %U", s);
        Py_XDECREF(s);
        return NULL;
    }
    if (K > INT_MAX || D > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "_moments_update: K and D must be below 2^31");
        return NULL;
    }
    PyArrayObject *sums = NULL;
    if (so != Py_None) {
        sums = moments_arg(so, "sums", NPY_FLOAT64, "float64", 2, "[K, D] or None");
        if (!sums || !moments_acc_ok(sums, "sums", "[K, D]")) return NULL;
        if (PyArray_DIM(sums, 0) != K || PyArray_DIM(sums, 1) != D) {
            PyObject *s = shape_str(sums);
            if (s) PyErr_Format(PyExc_ValueError, "_moments_update: sums must have shape "
                                "[K, D] = [%zd, %zd] (as outer), got %U", (Py_ssize_t)K,
                                (Py_ssize_t)D, s);
            Py_XDECREF(s);
            return NULL;
        }
    }
    PyArrayObject *x = moments_arg(xo, "x", NPY_FLOAT32, "float32", 3, "[n, K, D]");
    if (!x) return NULL;
    const npy_intp n = PyArray_DIM(x, 0);
    if (PyArray_DIM(x, 1) != K || PyArray_DIM(x, 2) != D) {
        PyObject *s = shape_str(x);
        if (s) PyErr_Format(PyExc_ValueError, "_moments_update: x must have shape [n, K, D] with "
                            "K = %zd, D = %zd (as outer), got %U", (Py_ssize_t)K, (Py_ssize_t)D,
                            s);
        Py_XDECREF(s);
        return NULL;
    }
    if (n == 0 || K == 0 || D == 0) Py_RETURN_NONE;   /* nothing to add (any strides) */
    /* strides in floats; those of axes of length 1 are never used */
    const npy_intp fs = (npy_intp)sizeof(float);
    const npy_intp s0 = n > 1 ? PyArray_STRIDE(x, 0) : 0, s1 = K > 1 ? PyArray_STRIDE(x, 1) : 0;
    const npy_intp s2 = D > 1 ? PyArray_STRIDE(x, 2) : fs;
    if (s2 != fs || s0 < 0 || s1 < 0 || s0 % fs || s1 % fs) {
        PyObject *st = PyObject_GetAttrString((PyObject *)x, "strides");
        PyObject *s = st ? PyObject_Str(st) : NULL;
        if (s) PyErr_Format(PyExc_ValueError, "_moments_update: x [n, K, D] must have contiguous "
                            "rows (last stride 4 bytes) and non-negative strides, got strides %U "
                            "(np.ascontiguousarray(x) has them)", s);
        Py_XDECREF(s);
        Py_XDECREF(st);
        return NULL;
    }
    if (arrays_overlap(x, outer) || (sums && (arrays_overlap(x, sums) ||
                                               arrays_overlap(outer, sums)))) {
        PyErr_SetString(PyExc_ValueError,
                        "_moments_update: outer, sums and x must not share memory");
        return NULL;
    }
    int rc;
    double *po = (double *)PyArray_DATA(outer);
    double *ps = sums ? (double *)PyArray_DATA(sums) : NULL;
    const float *px = (const float *)PyArray_DATA(x);
    Py_BEGIN_ALLOW_THREADS
    rc = cd_moments_update(po, ps, px, (long long)n, (int)K, (int)D, (ptrdiff_t)(s0 / fs),
                           (ptrdiff_t)(s1 / fs));
    Py_END_ALLOW_THREADS
    if (rc == -2) return PyErr_NoMemory();
    if (rc) {
        PyErr_SetString(PyExc_ValueError, "_moments_update: sizes out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* _neuron_fold_apply(coef [B, K, F], fold [F, K, D], scale [B], shift [B, D], naive=False) */
static PyObject *mod_neuron_fold_apply(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"coef", "fold", "scale", "shift", "naive", NULL};
    PyObject *co, *fo, *so, *ho;
    int naive = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|p:_neuron_fold_apply", kwlist, &co, &fo,
                                     &so, &ho, &naive))
        return NULL;
    PyArrayObject *c = NULL, *f = NULL, *s = NULL, *h = NULL, *out = NULL;
    if (!(c = as_f32(co, "coef", 3, "[B, K, F]"))) goto fail;
    if (!(f = as_f32(fo, "fold", 3, "[F, K, D]"))) goto fail;
    if (!(s = as_f32(so, "scale", 1, "[B]"))) goto fail;
    if (!(h = as_f32(ho, "shift", 2, "[B, D]"))) goto fail;
    {
        const npy_intp B = PyArray_DIM(c, 0), K = PyArray_DIM(c, 1), F = PyArray_DIM(c, 2);
        const npy_intp D = PyArray_DIM(f, 2);
        if (PyArray_DIM(f, 0) != F || PyArray_DIM(f, 1) != K || PyArray_DIM(s, 0) != B ||
            PyArray_DIM(h, 0) != B || PyArray_DIM(h, 1) != D) {
            PyErr_SetString(PyExc_ValueError, "_neuron_fold_apply: coef [B, K, F], fold [F, K, D], "
                            "scale [B] and shift [B, D] must agree");
            goto fail;
        }
        if (B > INT32_MAX || K > INT32_MAX || F > INT32_MAX || D > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "_neuron_fold_apply: sizes must be below 2^31");
            goto fail;
        }
        npy_intp dims[3] = {B, F, D};
        if (!(out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32))) goto fail;
        float *po = (float *)PyArray_DATA(out);
        const float *pc = (const float *)PyArray_DATA(c), *pf = (const float *)PyArray_DATA(f);
        const float *ps = (const float *)PyArray_DATA(s), *ph = (const float *)PyArray_DATA(h);
        Py_BEGIN_ALLOW_THREADS
        if (naive) cd_neuron_fold_apply_naive(po, pc, pf, ps, ph, (int)B, (int)K, (int)F, (int)D);
        else cd_neuron_fold_apply(po, pc, pf, ps, ph, (int)B, (int)K, (int)F, (int)D);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(c); Py_DECREF(f); Py_DECREF(s); Py_DECREF(h);
    return (PyObject *)out;
fail:
    Py_XDECREF(c); Py_XDECREF(f); Py_XDECREF(s); Py_XDECREF(h); Py_XDECREF(out);
    return NULL;
}

/* image_plan(config, images, *, heads=False, ..., probe=0, threads=0, budget=0) -> dict */
static PyObject *mod_image_plan(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"config", "images", "heads", "mlps", "cls_to_cls", "tokens", "probe",
                             "attn", "token_embeddings", "pool_tokens", "threads", "budget",
                             NULL};
    PyObject *cfg_dict;
    int images, heads = 0, mlps = 0, cls = 0, tokens = 0, probe = 0, attn = 0, tok_emb = 0;
    int pool_tokens = 0, threads = 0;
    Py_ssize_t budget = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i|$ppppipppin:image_plan", kwlist,
                                     &PyDict_Type, &cfg_dict, &images, &heads, &mlps, &cls,
                                     &tokens, &probe, &attn, &tok_emb, &pool_tokens, &threads,
                                     &budget))
        return NULL;
    if (images < 0 || probe < 0 || budget < 0) {
        PyErr_SetString(PyExc_ValueError, "image_plan: images, probe and budget must be >= 0");
        return NULL;
    }
    cd_config cfg;
    double ln_eps;
    if (parse_config(cfg_dict, &cfg, &ln_eps)) return NULL;
    static const float no_data = 0.0f;  /* the plan reads the probe's size only */
    cd_vision_opts o = vision_opts(heads, mlps, cls, tokens, attn, tok_emb, pool_tokens, threads);
    o.probe = probe ? &no_data : NULL;
    o.n_probe = probe;
    cd_vision_plan p;
    cd_error err;
    cd_status st = cd_encode_image_plan(&cfg, &o, images, (size_t)budget, &p, &err);
    if (st != CD_OK) return raise_status(st, &err, NULL);
    return Py_BuildValue("{s:i,s:i,s:n,s:n,s:n,s:n}", "chunk", p.chunk, "threads", p.threads,
                         "scratch_per_image", (Py_ssize_t)p.scratch_per_image,
                         "scratch_fixed", (Py_ssize_t)p.scratch_fixed,
                         "model_bytes", (Py_ssize_t)p.model_bytes,
                         "result_per_image", (Py_ssize_t)p.result_per_image);
}

/* the tensor table of a safetensors file, from the core's parser (the package's only one) */
static PyObject *mod_safetensors_header(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyObject *path_bytes = NULL;
    if (!PyUnicode_FSConverter(arg, &path_bytes)) return NULL;
    const char *path = PyBytes_AS_STRING(path_bytes);
    cd_st_file f;
    cd_error err;
    err.msg[0] = '\0';
    cd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = cd_st_open(&f, path, &err);
    Py_END_ALLOW_THREADS
    if (st != CD_OK) {
        cd_st_close(&f);
        raise_status(st, &err, path);
        Py_DECREF(path_bytes);
        return NULL;
    }
    Py_DECREF(path_bytes);
    PyObject *list = PyList_New(f.n_tensors), *out = NULL;
    for (int i = 0; list && i < f.n_tensors; i++) {
        const cd_st_tensor *t = &f.tensors[i];
        PyObject *shape = PyTuple_New(t->ndim);
        for (int k = 0; shape && k < t->ndim; k++) {
            PyObject *v = PyLong_FromLongLong((long long)t->shape[k]);
            if (!v) { Py_CLEAR(shape); break; }
            PyTuple_SET_ITEM(shape, k, v);
        }
        PyObject *item = shape ? Py_BuildValue("(ssNnn)", t->name, cd_st_dtype_name(t->dtype),
                                               shape, (Py_ssize_t)t->begin, (Py_ssize_t)t->end)
                               : NULL;
        if (!item) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, i, item);
    }
    if (list)
        out = Py_BuildValue("(nnN)", (Py_ssize_t)(f.data - (const unsigned char *)f.map),
                            (Py_ssize_t)f.data_len, list);
    cd_st_close(&f);
    return out;
}

static PyObject *mod_check_config(PyObject *mod, PyObject *arg) {
    (void)mod;
    if (!PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "_check_config() takes a dict");
        return NULL;
    }
    cd_config cfg;
    double ln_eps;
    if (parse_config(arg, &cfg, &ln_eps)) return NULL;
    cd_error err;
    cd_status st = cd_config_check(&cfg, &err);
    if (st != CD_OK) return raise_status(st, &err, NULL);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"isa", mod_isa, METH_NOARGS, "isa() -> str: the instruction-set path in use."},
    {"image_plan", (PyCFunction)(void (*)(void))mod_image_plan, METH_VARARGS | METH_KEYWORDS,
     "image_plan(config, images, *, heads=False, mlps=False, cls_to_cls=False, tokens=False, "
     "probe=0, attn=False, token_embeddings=False, pool_tokens=False, threads=0, budget=0) -> "
     "dict\n\nThe memory of Model.encode_image over `images` images with these options (probe: "
     "the number of directions; budget: the core's scratch limit in bytes, 0 = its default): "
     "chunk (images computed at once), threads, scratch_per_image, scratch_fixed, model_bytes "
     "(kept by the model from the first such call on) and result_per_image, in bytes."},
    {"_safetensors_header", mod_safetensors_header, METH_O,
     "_safetensors_header(path) -> (data_start, data_size, [(name, dtype, shape, begin, end)]):"
     " the tensor table of a .safetensors file, parsed and checked by the core (sorted by "
     "name; offsets relative to data_start). ValueError for a malformed file."},
    {"_check_config", mod_check_config, METH_O,
     "_check_config(config: dict): ValueError when the core cannot run a model of this config "
     "(cd_config_check: ranges, divisibility, size limits)."},
    {"has_bf16", mod_has_bf16, METH_NOARGS,
     "has_bf16() -> bool: whether precision 'bf16' runs here (AVX512_BF16 on the avx512 path)."},
    {"bf16_kernel", mod_bf16_kernel, METH_NOARGS,
     "bf16_kernel() -> str: the kernel of native bf16 products: 'amx' (AMX tiles), "
     "'avx512bf16' (vdpbf16ps) or 'none'."},
    {"set_isa", mod_set_isa, METH_O,
     "set_isa(name): force 'avx512', 'avx2' or 'generic' (ValueError if unavailable)."},
    {"_matmul", (PyCFunction)(void (*)(void))mod_matmul, METH_VARARGS | METH_KEYWORDS,
     "_matmul(inp [M, K], weight [OC, K], bias=None, naive=False) -> [M, OC]"},
    {"_sgemm_nt", (PyCFunction)(void (*)(void))mod_sgemm_nt, METH_VARARGS | METH_KEYWORDS,
     "_sgemm_nt(A [M, K], B [N, K], naive=False) -> A @ B.T [M, N]"},
    {"_sgemm_nn", (PyCFunction)(void (*)(void))mod_sgemm_nn, METH_VARARGS | METH_KEYWORDS,
     "_sgemm_nn(A [M, K], B [K, N], naive=False) -> A @ B [M, N]"},
    {"_neuron_fold_apply", (PyCFunction)(void (*)(void))mod_neuron_fold_apply,
     METH_VARARGS | METH_KEYWORDS,
     "_neuron_fold_apply(coef [B, K, F], fold [F, K, D], scale [B], shift [B, D], naive=False) "
     "-> out [B, F, D] = scale[b] * sum_k coef[b, k, n] fold[n, k] + shift[b] (neurons.h)"},
    {"_moments_update", (PyCFunction)(void (*)(void))mod_moments_update,
     METH_VARARGS | METH_KEYWORDS,
     "_moments_update(outer [K, D, D] float64, sums [K, D] float64 or None, x [n, K, D] float32)"
     ": outer[k] += x[:, k].T @ x[:, k], sums[k] += x[:, k].sum(0), in place (moments.h)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "clipdecomp._core",
    "The C core of clipdecomp: CLIP towers with the decomposition of the image embedding.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();  /* returns NULL with an ImportError set on failure */
    cd_fork_guard(); /* a forked child runs the core on one thread instead of hanging */
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
