/* safetensors.c -- memory-map a .safetensors file and parse its JSON header (see safetensors.h).
 *
 * The JSON reader below accepts exactly the subset the format uses (objects, arrays, strings,
 * non-negative integers) and can skip any other JSON value (inside "__metadata__" or an unknown
 * field of a tensor entry). Every error is a CD_ERR_FORMAT naming the file and the byte of the
 * header where parsing stopped.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE   /* madvise */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define JSON_MAX_DEPTH 64

static const struct { const char *name; size_t size; } DTYPES[CD_DT_COUNT] = {
    [CD_DT_F32] = {"F32", 4},   [CD_DT_F16] = {"F16", 2},   [CD_DT_BF16] = {"BF16", 2},
    [CD_DT_F64] = {"F64", 8},   [CD_DT_I64] = {"I64", 8},   [CD_DT_I32] = {"I32", 4},
    [CD_DT_I16] = {"I16", 2},   [CD_DT_I8] = {"I8", 1},     [CD_DT_U8] = {"U8", 1},
    [CD_DT_U16] = {"U16", 2},   [CD_DT_U32] = {"U32", 4},   [CD_DT_U64] = {"U64", 8},
    [CD_DT_BOOL] = {"BOOL", 1}, [CD_DT_F8_E4M3] = {"F8_E4M3", 1},
    [CD_DT_F8_E5M2] = {"F8_E5M2", 1},
};

const char *cd_st_dtype_name(cd_dtype dt) {
    return (dt >= 0 && dt < CD_DT_COUNT) ? DTYPES[dt].name : "?";
}
size_t cd_st_dtype_size(cd_dtype dt) {
    return (dt >= 0 && dt < CD_DT_COUNT) ? DTYPES[dt].size : 0;
}

static void set_err(cd_error *err, const char *fmt, ...) {
    if (!err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------------ */
/* value conversions                                                                           */

float cd_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {                      /* inf / nan: keep the payload */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {                  /* normal */
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {                  /* signed zero */
        bits = sign;
    } else {                                /* subnormal: man * 2^-24, normal as a float */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float cd_bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ------------------------------------------------------------------------------------------ */
/* a small JSON reader over [p, end)                                                           */

typedef struct {
    const char *start, *p, *end;
    const char *file;
    cd_error *err;
    int failed;
    size_t data_len;   /* bytes of the data section, for the offsets of the entries */
} jcur;

static int jfail(jcur *j, const char *what) {
    if (!j->failed)
        set_err(j->err, "%s: invalid safetensors header: %s at byte %zu of the header",
                j->file, what, (size_t)(j->p - j->start));
    j->failed = 1;
    return -1;
}

static void jws(jcur *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int jexpect(jcur *j, char c) {
    jws(j);
    if (j->p >= j->end || *j->p != c) {
        char msg[32];
        snprintf(msg, sizeof msg, "expected '%c'", c);
        return jfail(j, msg);
    }
    j->p++;
    return 0;
}

static int jhex4(jcur *j, uint32_t *out) {
    if (j->end - j->p < 4) return jfail(j, "truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = j->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return jfail(j, "bad \\u escape");
    }
    j->p += 4;
    *out = v;
    return 0;
}

/* Parse a string; if out != NULL store a malloc'ed NUL-terminated copy (escapes decoded).
 * Strings holding a NUL character are refused (names are C strings). */
static int jstring(jcur *j, char **out) {
    if (jexpect(j, '"')) return -1;
    /* the decoded string is never longer than the raw one */
    const char *s = j->p;
    while (s < j->end && *s != '"') s += (*s == '\\' && s + 1 < j->end) ? 2 : 1;
    if (s >= j->end) return jfail(j, "unterminated string");
    size_t cap = (size_t)(s - j->p) + 1;
    char *buf = NULL;
    if (out) {
        buf = (char *)malloc(cap);
        if (!buf) return jfail(j, "out of memory");
    }
    size_t n = 0;
    while (j->p < j->end && *j->p != '"') {
        unsigned char c = (unsigned char)*j->p;
        if (c < 0x20) { free(buf); return jfail(j, "control character in string"); }
        if (c != '\\') {
            if (buf) buf[n++] = (char)c;
            j->p++;
            continue;
        }
        j->p++;
        if (j->p >= j->end) { free(buf); return jfail(j, "truncated escape"); }
        char e = *j->p++;
        char lit = 0;
        switch (e) {
            case '"': lit = '"'; break;
            case '\\': lit = '\\'; break;
            case '/': lit = '/'; break;
            case 'b': lit = '\b'; break;
            case 'f': lit = '\f'; break;
            case 'n': lit = '\n'; break;
            case 'r': lit = '\r'; break;
            case 't': lit = '\t'; break;
            case 'u': break;
            default: free(buf); return jfail(j, "bad escape");
        }
        if (e != 'u') {
            if (buf) buf[n++] = lit;
            continue;
        }
        uint32_t cp;
        if (jhex4(j, &cp)) { free(buf); return -1; }
        if (cp >= 0xd800 && cp <= 0xdbff) {          /* high surrogate: needs its low half */
            uint32_t lo;
            if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u') {
                free(buf);
                return jfail(j, "unpaired surrogate");
            }
            j->p += 2;
            if (jhex4(j, &lo)) { free(buf); return -1; }
            if (lo < 0xdc00 || lo > 0xdfff) { free(buf); return jfail(j, "unpaired surrogate"); }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            free(buf);
            return jfail(j, "unpaired surrogate");
        }
        if (cp == 0) { free(buf); return jfail(j, "NUL character in string"); }
        /* a \uXXXX escape (6 raw bytes, 12 for a pair) never decodes to more bytes than it took */
        if (buf) {
            if (cp < 0x80) {
                buf[n++] = (char)cp;
            } else if (cp < 0x800) {
                buf[n++] = (char)(0xc0 | (cp >> 6));
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            } else if (cp < 0x10000) {
                buf[n++] = (char)(0xe0 | (cp >> 12));
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            } else {
                buf[n++] = (char)(0xf0 | (cp >> 18));
                buf[n++] = (char)(0x80 | ((cp >> 12) & 0x3f));
                buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
                buf[n++] = (char)(0x80 | (cp & 0x3f));
            }
        }
    }
    j->p++;  /* closing quote */
    if (buf) {
        buf[n] = '\0';
        if (memchr(buf, '\0', n)) { free(buf); return jfail(j, "NUL character in string"); }
        *out = buf;
    }
    return 0;
}

/* A non-negative integer without sign, fraction or exponent, at most 2^64 - 1. */
static int juint(jcur *j, uint64_t *out) {
    jws(j);
    if (j->p >= j->end || *j->p < '0' || *j->p > '9') return jfail(j, "expected an integer");
    if (*j->p == '0' && j->p + 1 < j->end && j->p[1] >= '0' && j->p[1] <= '9')
        return jfail(j, "integer with a leading zero");
    uint64_t v = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        uint64_t dgt = (uint64_t)(*j->p - '0');
        if (v > (UINT64_MAX - dgt) / 10) return jfail(j, "integer too large");
        v = v * 10 + dgt;
        j->p++;
    }
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
        return jfail(j, "expected an integer");
    *out = v;
    return 0;
}

static int jskip(jcur *j, int depth);

/* digits [0-9]+ at j->p; returns how many */
static size_t jdigits(jcur *j) {
    const char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return (size_t)(j->p - s);
}

/* Skip a number of JSON's grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int jskip_number(jcur *j) {
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p >= j->end || *j->p < '0' || *j->p > '9') return jfail(j, "unexpected character");
    if (*j->p == '0') {
        j->p++;
        if (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            return jfail(j, "number with a leading zero");
    } else {
        jdigits(j);
    }
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jdigits(j)) return jfail(j, "malformed number");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (!jdigits(j)) return jfail(j, "malformed number");
    }
    return 0;
}

static int jliteral(jcur *j, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return jfail(j, "unexpected character");
    j->p += n;
    return 0;
}

/* Skip any JSON value. */
static int jskip(jcur *j, int depth) {
    if (depth > JSON_MAX_DEPTH) return jfail(j, "nesting too deep");
    jws(j);
    if (j->p >= j->end) return jfail(j, "unexpected end");
    char c = *j->p;
    if (c == '"') return jstring(j, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        jws(j);
        if (j->p < j->end && *j->p == close) { j->p++; return 0; }
        for (;;) {
            if (c == '{') {
                if (jstring(j, NULL) || jexpect(j, ':')) return -1;
            }
            if (jskip(j, depth + 1)) return -1;
            jws(j);
            if (j->p < j->end && *j->p == ',') { j->p++; continue; }
            return jexpect(j, close);
        }
    }
    if (c == 't') return jliteral(j, "true");
    if (c == 'f') return jliteral(j, "false");
    if (c == 'n') return jliteral(j, "null");
    return jskip_number(j);
}

/* ------------------------------------------------------------------------------------------ */
/* the header                                                                                  */

static int cmp_tensor(const void *a, const void *b) {
    return strcmp(((const cd_st_tensor *)a)->name, ((const cd_st_tensor *)b)->name);
}

/* Parse one tensor entry {"dtype": .., "shape": [..], "data_offsets": [b, e]} into *t. */
static int parse_entry(jcur *j, cd_st_tensor *t) {
    int have_dtype = 0, have_shape = 0, have_off = 0;
    uint64_t off[2] = {0, 0};
    if (jexpect(j, '{')) return -1;
    jws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; goto check; }
    for (;;) {
        char *key = NULL;
        if (jstring(j, &key)) return -1;
        if (jexpect(j, ':')) { free(key); return -1; }
        if (strcmp(key, "dtype") == 0) {
            char *dt = NULL;
            free(key);
            if (have_dtype) return jfail(j, "duplicate \"dtype\"");
            jws(j);
            if (jstring(j, &dt)) return -1;
            int found = -1;
            for (int k = 0; k < CD_DT_COUNT; k++)
                if (strcmp(dt, DTYPES[k].name) == 0) found = k;
            if (found < 0) {
                if (!j->failed)
                    set_err(j->err, "%s: tensor '%s' has unknown dtype '%s' (expected one of F32, "
                            "F16, BF16, F64, I64, I32, I16, I8, U8, U16, U32, U64, BOOL, F8_E4M3, "
                            "F8_E5M2)", j->file, t->name, dt);
                j->failed = 1;
                free(dt);
                return -1;
            }
            free(dt);
            t->dtype = (cd_dtype)found;
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            free(key);
            if (have_shape) return jfail(j, "duplicate \"shape\"");
            if (jexpect(j, '[')) return -1;
            jws(j);
            t->ndim = 0;
            if (j->p < j->end && *j->p == ']') {
                j->p++;
            } else {
                for (;;) {
                    uint64_t v;
                    if (t->ndim >= CD_ST_MAX_DIMS) return jfail(j, "too many dimensions");
                    if (juint(j, &v)) return -1;
                    if (v > (uint64_t)INT64_MAX) return jfail(j, "dimension too large");
                    t->shape[t->ndim++] = (int64_t)v;
                    jws(j);
                    if (j->p < j->end && *j->p == ',') { j->p++; continue; }
                    if (jexpect(j, ']')) return -1;
                    break;
                }
            }
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            free(key);
            if (have_off) return jfail(j, "duplicate \"data_offsets\"");
            if (jexpect(j, '[') || juint(j, &off[0]) || jexpect(j, ',') || juint(j, &off[1]) ||
                jexpect(j, ']'))
                return -1;
            have_off = 1;
        } else {
            free(key);
            if (jskip(j, 1)) return -1;
        }
        jws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (jexpect(j, '}')) return -1;
        break;
    }
check:
    if (!have_dtype || !have_shape || !have_off) {
        if (!j->failed)
            set_err(j->err, "%s: invalid safetensors header: tensor '%s' lacks %s", j->file,
                    t->name, !have_dtype ? "\"dtype\"" : !have_shape ? "\"shape\""
                                                                     : "\"data_offsets\"");
        j->failed = 1;
        return -1;
    }
    /* numel and byte size, overflow-checked */
    uint64_t numel = 1;
    for (int k = 0; k < t->ndim; k++) {
        uint64_t d = (uint64_t)t->shape[k];
        if (d != 0 && numel > UINT64_MAX / d) return jfail(j, "tensor size overflows");
        numel *= d;
    }
    uint64_t isz = DTYPES[t->dtype].size;
    if (numel > UINT64_MAX / isz || numel > (uint64_t)SIZE_MAX)
        return jfail(j, "tensor size overflows");
    if (off[1] > (uint64_t)j->data_len) {   /* first: a file cut short says so */
        if (!j->failed)
            set_err(j->err, "%s: invalid safetensors file: tensor '%s' has data_offsets "
                    "[%llu, %llu] outside the data section of %zu bytes (file truncated?)",
                    j->file, t->name, (unsigned long long)off[0], (unsigned long long)off[1],
                    j->data_len);
        j->failed = 1;
        return -1;
    }
    if (off[1] < off[0] || off[1] - off[0] != numel * isz) {
        if (!j->failed)
            set_err(j->err, "%s: invalid safetensors header: tensor '%s' has data_offsets "
                    "[%llu, %llu] (%llu bytes) but dtype %s and its shape need %llu bytes",
                    j->file, t->name, (unsigned long long)off[0], (unsigned long long)off[1],
                    (unsigned long long)(off[1] >= off[0] ? off[1] - off[0] : 0),
                    DTYPES[t->dtype].name, (unsigned long long)(numel * isz));
        j->failed = 1;
        return -1;
    }
    t->numel = (size_t)numel;
    t->begin = (size_t)off[0];
    t->end = (size_t)off[1];
    return 0;
}

/* Offset of the first byte of [s, s + n) that is not well-formed UTF-8 (no overlong forms,
 * no surrogates, at most U+10FFFF), or n when all of it is. */
static size_t utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t len;
        unsigned char lo = 0x80, hi = 0xbf;  /* range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) len = 2;
        else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return i;
        }
        if (n - i < len || s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80) return i;
        i += len;
    }
    return n;
}

static cd_status parse_header(cd_st_file *f, const char *hdr, size_t n, cd_error *err) {
    jcur j = {hdr, hdr, hdr + n, f->path, err, 0, f->data_len};
    int cap = 0;
    size_t bad = utf8_invalid_at((const unsigned char *)hdr, n);
    if (bad < n) {
        set_err(err, "%s: invalid safetensors header: not UTF-8 at byte %zu of the header",
                f->path, bad);
        return CD_ERR_FORMAT;
    }
    if (jexpect(&j, '{')) return CD_ERR_FORMAT;
    jws(&j);
    if (j.p < j.end && *j.p == '}') {
        j.p++;
    } else {
        for (;;) {
            char *name = NULL;
            if (jstring(&j, &name)) return CD_ERR_FORMAT;
            if (jexpect(&j, ':')) { free(name); return CD_ERR_FORMAT; }
            if (strcmp(name, "__metadata__") == 0) {
                free(name);
                if (jskip(&j, 1)) return CD_ERR_FORMAT;
            } else {
                if (f->n_tensors == cap) {
                    int ncap = cap ? cap * 2 : 64;
                    if (ncap <= cap || (size_t)ncap > SIZE_MAX / sizeof(cd_st_tensor)) {
                        free(name);
                        set_err(err, "%s: too many tensors", f->path);
                        return CD_ERR_NOMEM;
                    }
                    cd_st_tensor *nt = (cd_st_tensor *)realloc(
                        f->tensors, (size_t)ncap * sizeof(cd_st_tensor));
                    if (!nt) {
                        free(name);
                        set_err(err, "%s: out of memory reading the header", f->path);
                        return CD_ERR_NOMEM;
                    }
                    f->tensors = nt;
                    cap = ncap;
                }
                cd_st_tensor *t = &f->tensors[f->n_tensors++];
                memset(t, 0, sizeof *t);
                t->name = name;
                if (parse_entry(&j, t)) return CD_ERR_FORMAT;
                if (t->end > f->data_len) {
                    set_err(err, "%s: invalid safetensors file: tensor '%s' has data_offsets "
                            "[%zu, %zu] outside the data section of %zu bytes (file truncated?)",
                            f->path, t->name, t->begin, t->end, f->data_len);
                    return CD_ERR_FORMAT;
                }
                t->data = f->data + t->begin;
            }
            jws(&j);
            if (j.p < j.end && *j.p == ',') { j.p++; continue; }
            if (jexpect(&j, '}')) return CD_ERR_FORMAT;
            break;
        }
    }
    jws(&j);  /* writers pad the header with spaces */
    if (j.p != j.end) {
        jfail(&j, "trailing characters after the header object");
        return CD_ERR_FORMAT;
    }
    if (f->n_tensors > 1) {
        qsort(f->tensors, (size_t)f->n_tensors, sizeof(cd_st_tensor), cmp_tensor);
        for (int i = 1; i < f->n_tensors; i++)
            if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0) {
                set_err(err, "%s: invalid safetensors header: tensor '%s' appears twice",
                        f->path, f->tensors[i].name);
                return CD_ERR_FORMAT;
            }
    }
    return CD_OK;
}

static int host_is_little_endian(void) {
    uint16_t one = 1;
    unsigned char c;
    memcpy(&c, &one, 1);
    return c == 1;
}

/* Check the 8-byte length and parse the header of the file image [buf, buf + len);
 * f->path is already set. */
static cd_status open_image(cd_st_file *f, const void *buf, size_t len, cd_error *err) {
    if (!host_is_little_endian()) {
        set_err(err, "%s: safetensors files are little-endian; this machine is not", f->path);
        return CD_ERR_FORMAT;
    }
    const unsigned char *b = (const unsigned char *)buf;
    if (len < 8) {
        set_err(err, "%s: not a safetensors file: %zu bytes, shorter than the 8-byte header "
                "length", f->path, len);
        return CD_ERR_FORMAT;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    if (n > CD_ST_MAX_HEADER) {
        set_err(err, "%s: not a safetensors file: header length %llu exceeds the %llu-byte limit",
                f->path, (unsigned long long)n, (unsigned long long)CD_ST_MAX_HEADER);
        return CD_ERR_FORMAT;
    }
    if (n > len - 8) {
        set_err(err, "%s: not a safetensors file: header length %llu but only %zu bytes follow",
                f->path, (unsigned long long)n, len - 8);
        return CD_ERR_FORMAT;
    }
    if (n < 2) {
        set_err(err, "%s: not a safetensors file: header of %llu bytes", f->path,
                (unsigned long long)n);
        return CD_ERR_FORMAT;
    }
    f->data = b + 8 + n;
    f->data_len = len - 8 - (size_t)n;
    return parse_header(f, (const char *)b + 8, (size_t)n, err);
}

cd_status cd_st_open_buffer(cd_st_file *f, const void *buf, size_t len, const char *name,
                            cd_error *err) {
    memset(f, 0, sizeof *f);
    f->path = strdup(name ? name : "<buffer>");
    if (!f->path) { set_err(err, "out of memory"); return CD_ERR_NOMEM; }
    return open_image(f, buf, len, err);
}

cd_status cd_st_open(cd_st_file *f, const char *path, cd_error *err) {
    memset(f, 0, sizeof *f);
    f->path = strdup(path ? path : "");
    if (!f->path) { set_err(err, "out of memory"); return CD_ERR_NOMEM; }
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        set_err(err, "%s: cannot open: %s", path, strerror(errno));
        return CD_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        set_err(err, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return CD_ERR_IO;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, "%s: not a regular file", path);
        close(fd);
        return CD_ERR_IO;
    }
    if (st.st_size < 8) {
        close(fd);
        set_err(err, "%s: not a safetensors file: %lld bytes, shorter than the 8-byte header "
                "length (truncated or empty)", path, (long long)st.st_size);
        return CD_ERR_FORMAT;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        set_err(err, "%s: file too large to map", path);
        return CD_ERR_NOMEM;
    }
    size_t len = (size_t)st.st_size;
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        set_err(err, "%s: cannot map: %s", path, strerror(map_errno));
        return CD_ERR_IO;
    }
    f->map = map;
    f->map_len = len;
    return open_image(f, map, len, err);
}

void cd_st_close(cd_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->map) munmap(f->map, f->map_len);
    free(f->path);
    memset(f, 0, sizeof *f);
}

void cd_st_release(const cd_st_file *f, const cd_st_tensor *t) {
    if (!f->map || !t || t->end <= t->begin) return;
    static long page = 0;
    if (page <= 0) page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return;
    /* the pages that hold any byte of the tensor: a neighbour sharing the first or last page
     * loses nothing, as the mapping is never written and a later read faults the page back in */
    const uintptr_t base = (uintptr_t)f->map, lo = (uintptr_t)t->data;
    const uintptr_t hi = lo + (t->end - t->begin);
    const uintptr_t a = lo - (lo - base) % (uintptr_t)page;
    const uintptr_t limit = base + f->map_len;
    uintptr_t b = hi + ((uintptr_t)page - (hi - base) % (uintptr_t)page) % (uintptr_t)page;
    if (b > limit) b = limit;
    if (b > a) (void)madvise((void *)a, (size_t)(b - a), MADV_DONTNEED);
}

const cd_st_tensor *cd_st_find(const cd_st_file *f, const char *name) {
    if (!f->n_tensors) return NULL;
    cd_st_tensor key;
    memset(&key, 0, sizeof key);
    key.name = (char *)name;
    return (const cd_st_tensor *)bsearch(&key, f->tensors, (size_t)f->n_tensors,
                                         sizeof(cd_st_tensor), cmp_tensor);
}

cd_status cd_st_read_f32(const cd_st_file *f, const cd_st_tensor *t, const float **values,
                         float **owned, cd_error *err) {
    *values = NULL;
    *owned = NULL;
    if (t->dtype != CD_DT_F32 && t->dtype != CD_DT_F16 && t->dtype != CD_DT_BF16) {
        set_err(err, "%s: tensor '%s' has dtype %s; only F32, F16 and BF16 are supported",
                f->path, t->name, cd_st_dtype_name(t->dtype));
        return CD_ERR_SHAPE;
    }
    if (t->dtype == CD_DT_F32 && ((uintptr_t)t->data % _Alignof(float)) == 0) {
        *values = (const float *)(const void *)t->data;
        return CD_OK;
    }
    size_t n = t->numel ? t->numel : 1;
    if (n > SIZE_MAX / sizeof(float)) {
        set_err(err, "%s: tensor '%s' is too large", f->path, t->name);
        return CD_ERR_NOMEM;
    }
    float *buf = (float *)malloc(n * sizeof(float));
    if (!buf) {
        set_err(err, "%s: out of memory converting tensor '%s' to float32", f->path, t->name);
        return CD_ERR_NOMEM;
    }
    const unsigned char *s = t->data;
    if (t->dtype == CD_DT_F32) {
        memcpy(buf, s, t->numel * sizeof(float));
    } else {
        int half = t->dtype == CD_DT_F16;
        for (size_t i = 0; i < t->numel; i++) {
            uint16_t h = (uint16_t)(s[2 * i] | (s[2 * i + 1] << 8));
            buf[i] = half ? cd_half_to_float(h) : cd_bf16_to_float(h);
        }
    }
    *values = buf;
    *owned = buf;
    return CD_OK;
}
