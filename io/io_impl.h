/* io_impl.h: declarations shared inside io/ (models). No public header includes it.
 *
 * Model storage, the tensor table every loader/writer walks, the safetensors
 * header parser and the llama2.c header binder. The parsers work on a byte
 * buffer so that tools/fuzz_*.c can feed them directly. */
#ifndef IO_IMPL_H
#define IO_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "io.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "llmvq model I/O points float32 tensors into little-endian files: big-endian hosts are unsupported"
#endif

/* What a loaded model owns besides its lv_layer array. */
struct lv_model_storage {
    io_map *maps; /* (n_maps) memory maps float32 tensors point into; owned */
    int n_maps;
    float *arena; /* converted (f16/bf16) or realigned tensors: one allocation; owned */
    size_t arena_floats;
};

/* Sanity limits on model shapes; products of them fit easily in int64. */
#define IO_MAX_DIM (1 << 20)    /* dim, hidden_dim */
#define IO_MAX_LAYERS 4096
#define IO_MAX_HEADS 4096
#define IO_MAX_VOCAB (1 << 24)
#define IO_MAX_SEQ (1 << 24)

/* ---------------- model_common.c ---------------- */

/* Checks a config: positive and below the IO_MAX_* limits, dim % n_heads == 0,
 * n_heads % n_kv_heads == 0, even head_dim, finite positive eps/theta.
 * `what` (a path or a preset name) starts the error message. */
lv_status io_config_check(const lv_model_config *c, const char *what);

/* A model shell: *out with cfg copied, layers (n_layers) and an empty storage
 * allocated; all tensor pointers NULL. Caller frees with io_model_free(). */
lv_status io_model_alloc(lv_model **out, const lv_model_config *cfg);

typedef enum {
    IO_T_EMB = 0,
    IO_T_ATTN_NORM,
    IO_T_WQ,
    IO_T_WK,
    IO_T_WV,
    IO_T_WO,
    IO_T_FFN_NORM,
    IO_T_W1, /* gate */
    IO_T_W2, /* down */
    IO_T_W3, /* up */
    IO_T_FINAL_NORM,
    IO_T_WCLS,
} io_tensor_kind;

/* One tensor of a model: name, shape (cols == 0 for 1-D tensors of `rows`). */
typedef struct {
    char name[64];
    io_tensor_kind kind;
    int layer; /* -1 for non-layer tensors */
    int64_t rows, cols;
} io_tensor_ref;

typedef enum { IO_NAMES_HF = 0, IO_NAMES_LLAMA2C = 1 } io_name_style;

/* Number of tensors of a config: 2 + 9 * n_layers, + 1 when the classifier is untied. */
int io_tensor_count(const lv_model_config *c);
/* Fills out[io_tensor_count(c)] in llama2.c file order (embedding, per-layer
 * tensors, final norm, classifier when untied) with names of the given style. */
void io_tensor_list(const lv_model_config *c, io_tensor_ref *out, io_name_style style);
static inline int64_t io_tensor_numel(const io_tensor_ref *r)
{
    return r->cols ? r->rows * r->cols : r->rows;
}
/* Where the model keeps a tensor: the field a loader assigns / a writer reads. */
const float **io_model_slot(lv_model *m, io_tensor_kind kind, int layer);
const float *io_model_tensor(const lv_model *m, io_tensor_kind kind, int layer);

/* Fails with "PATH: tensor NAME has NaN at index I" (or Inf) on the first
 * non-finite weight, walking tensors in io_tensor_list order. */
lv_status io_model_check_finite(const lv_model *m, const char *path, io_name_style style);
lv_status io_tensor_check_finite(const float *x, int64_t n, const char *path, const char *name);

/* Row `r` of the destination layout maps to this source row when converting
 * q/k between RoPE pairings for one projection with `n_heads` heads of `hd` rows.
 * to_half: destination is HF (rotate-half), source interleaved; else the inverse. */
int64_t io_rope_src_row(int64_t r, int hd, int to_half);

/* ---------------- safetensors.c ---------------- */

typedef enum { IO_DT_F32 = 0, IO_DT_F16, IO_DT_BF16, IO_DT_OTHER } io_dtype;

#define IO_ST_MAX_DIMS 8
#define IO_ST_MAX_HEADER (100u << 20) /* the format's own limit on the JSON header */

typedef struct {
    char *name;          /* owned */
    char dtype_name[16]; /* as in the file ("F32", "I8", ...) */
    io_dtype dtype;      /* IO_DT_OTHER for dtypes that exist but that we do not load */
    int elem_size;       /* bytes */
    int ndim;
    int64_t shape[IO_ST_MAX_DIMS];
    int64_t numel;
    size_t offset; /* absolute offset of the first byte in the file */
    size_t nbytes; /* == numel * elem_size, checked */
} io_st_tensor;

typedef struct {
    io_st_tensor *t; /* (n), owned */
    int n;
    size_t data_start; /* 8 + header length */
} io_st_header;

/* Parses and validates the header of a safetensors file held in buf[size]
 * (borrowed): header length within the file and IO_ST_MAX_HEADER, JSON syntax,
 * each entry's dtype/shape/data_offsets, begin <= end <= data section,
 * end - begin == numel * dtype size. Errors name `path`. */
lv_status io_st_parse(io_st_header *h, const void *buf, size_t size, const char *path);
void io_st_header_free(io_st_header *h);
/* Tensor by name or NULL (borrowed). */
const io_st_tensor *io_st_find(const io_st_header *h, const char *name);
/* Converts a parsed F32/F16/BF16 tensor of file `buf` to float32 dst[numel]. */
lv_status io_st_to_f32(const io_st_tensor *t, const void *buf, float *dst, const char *path);

/* Half-precision conversions (exact; subnormals, Inf and NaN kept). */
float io_f16_to_f32(uint16_t h);
float io_bf16_to_f32(uint16_t h);

/* ---------------- model_llama2c.c ---------------- */

#define IO_LLAMA2C_HEADER_BYTES 28

/* Validates a llama2.c v0 file held in buf[size] (borrowed) and builds *out with
 * tensor pointers into buf and an empty storage: header fields, exact file size,
 * finite weights. Errors name `path`. Caller frees with io_model_free(). */
lv_status io_llama2c_bind(lv_model **out, const void *buf, size_t size, const char *path);

/* model_write.c pieces shared by the writers (export_hf_aqlm.c, export_peft_lora.c). */

/* A file written under a temporary name in its final directory (PATH.tmp.PID.N,
 * created with O_EXCL, mode 0666 & ~umask), then flushed, fsync'ed and renamed
 * over PATH (io_commit_file): a reader, or a crash, never sees half a file, and a
 * file may be rewritten while it is memory-mapped. Start from `io_atomic a = {0}`. */
typedef struct {
    FILE *f;
    const char *path; /* borrowed */
    char tmp[4200];
} io_atomic;
lv_status io_atomic_open(io_atomic *a, const char *path);
/* n bytes; errors name the target path. */
lv_status io_atomic_write(io_atomic *a, const void *p, size_t n);
/* commit 1: flush, fsync, rename over the target; commit 0 (after an error):
 * remove the temporary file. Nothing to do when a is not open. */
lv_status io_atomic_close(io_atomic *a, int commit);
/* path <- text + "\n", atomically. */
lv_status io_atomic_write_text(const char *path, const char *text);
/* A safetensors file's first bytes: the header length (8 bytes, little-endian)
 * and the header itself. */
lv_status io_atomic_st_header(io_atomic *a, const char *hdr, size_t hlen);
#include <cjson/cJSON.h>
/* Shortest decimal that reads back as the same float ("1e-05"), as a raw JSON number. */
cJSON *io_json_float(float v);
/* config.json of a LlamaForCausalLM with this config (NULL when out of memory). */
cJSON *io_hf_config_object(const lv_model_config *c);

#endif
