/* safetensors.h -- read-only access to a .safetensors file.
 *
 * Layout of the format: 8 bytes little-endian u64 n, then n bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value"}}
 * then the data section; offsets are relative to the data section.
 *
 * The file is memory-mapped (read-only, private); a loader releases each tensor's pages once it
 * has its own copy (cd_st_release), so the mapping never holds the whole file resident. The header is parsed by a small hand-written JSON reader and checked
 * strictly: header length inside the file and at most CD_ST_MAX_HEADER bytes, every tensor's
 * [begin, end) inside the data section and equal to itemsize * prod(shape) (overflow-checked),
 * no duplicate names, known dtype names only. Floating tensors in F32, F16 and BF16 can be read
 * as float32; other dtypes are listed but refused (with the tensor's name) when read.
 */
#ifndef CLIPDECOMP_SAFETENSORS_H
#define CLIPDECOMP_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "clipdecomp.h"

#define CD_ST_MAX_HEADER ((uint64_t)100 * 1024 * 1024)  /* bytes of JSON header accepted */
#define CD_ST_MAX_DIMS 8

typedef enum {
    CD_DT_F32 = 0, CD_DT_F16, CD_DT_BF16,        /* readable as float32 */
    CD_DT_F64, CD_DT_I64, CD_DT_I32, CD_DT_I16, CD_DT_I8, CD_DT_U8, CD_DT_U16, CD_DT_U32,
    CD_DT_U64, CD_DT_BOOL, CD_DT_F8_E4M3, CD_DT_F8_E5M2,  /* listed, not readable */
    CD_DT_COUNT
} cd_dtype;

typedef struct {
    char *name;                      /* owned, NUL-terminated */
    cd_dtype dtype;
    int ndim;                        /* 0 for a scalar */
    int64_t shape[CD_ST_MAX_DIMS];
    size_t numel;                    /* prod(shape) */
    size_t begin, end;               /* byte offsets inside the data section */
    const unsigned char *data;       /* = data section + begin */
} cd_st_tensor;

typedef struct {
    char *path;                      /* owned copy, for messages */
    void *map; size_t map_len;       /* the mapping (NULL when opened over a caller's buffer) */
    const unsigned char *data;       /* data section */
    size_t data_len;
    cd_st_tensor *tensors;           /* sorted by name */
    int n_tensors;
} cd_st_file;

/* Map and parse `path`. On failure *f is left empty (cd_st_close is still safe). */
cd_status cd_st_open(cd_st_file *f, const char *path, cd_error *err);
/* Parse a file image already in memory (buf stays owned by the caller and must outlive f);
 * `name` is used in messages. */
cd_status cd_st_open_buffer(cd_st_file *f, const void *buf, size_t len, const char *name,
                            cd_error *err);
void cd_st_close(cd_st_file *f);

/* Drop the resident pages of t's bytes from the mapping (no-op over a caller's buffer): a
 * loader that has copied or packed a tensor releases its source as it goes, so that the file
 * and the model's copy of the same tensor are never resident together. Reading t again after
 * this is still valid (the pages are read from the file again). */
void cd_st_release(const cd_st_file *f, const cd_st_tensor *t);

/* The tensor called `name`, or NULL. */
const cd_st_tensor *cd_st_find(const cd_st_file *f, const char *name);

const char *cd_st_dtype_name(cd_dtype dt);
size_t cd_st_dtype_size(cd_dtype dt);

/* The tensor's values as float32 (t->numel of them). F32 data suitably aligned is returned in
 * place (*owned = NULL); otherwise a converted copy is malloc'ed and returned in *owned too
 * (the caller frees it). Non-float dtypes give CD_ERR_SHAPE naming the tensor. */
cd_status cd_st_read_f32(const cd_st_file *f, const cd_st_tensor *t, const float **values,
                         float **owned, cd_error *err);

/* Exact conversions of one value (inf, nan and subnormals included). */
float cd_half_to_float(uint16_t h);
float cd_bf16_to_float(uint16_t h);

#endif
