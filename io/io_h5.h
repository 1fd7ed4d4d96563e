/* io_h5.h: HDF5 quantized models and block checkpoints (docs/formats-h5.md).
 * Part of io/'s public interface (to be folded into io.h). */
#ifndef IO_H5_H
#define IO_H5_H

#include <stdint.h>

#include "lv.h"
#include "lv_model.h"
#include "lv_quant.h"

/* Readers reject any other version with a message saying what to do. */
#define IO_H5_FORMAT_VERSION 1

/* Write a whole quantized model (atomically: temp file, fsync, rename). */
lv_status io_qmodel_write(const lv_qmodel *q, const char *path);
/* Read and validate (shapes against the config attributes, codes < 2^nbits,
 * finite floats). Caller frees with lv_qmodel_free. */
lv_status io_qmodel_read(lv_qmodel **out, const char *path);

/* An FP model whose linears are the dequantized ones (owned arena), so that
 * every FP path (eval, generate, convert) runs a quantized model. Caller frees
 * with io_model_free. */
lv_status io_qmodel_to_fp(const lv_qmodel *q, lv_model **out);

/* One finished block as its own checkpoint file (atomically), tagged with the
 * job and model hashes and a checksum of its data. */
lv_status io_qblock_write(const char *path, const lv_qblock *b, int layer,
                          const lv_model_config *cfg, uint64_t job_hash, uint64_t model_hash);
/* Read a block checkpoint; refuses another config, job or model, and a block
 * whose checksum does not match (LV_ERR_FORMAT, message names the file).
 * b is zeroed first; on success the caller frees it with lv_qblock_free. */
lv_status io_qblock_read(const char *path, const lv_model_config *cfg, uint64_t job_hash,
                         uint64_t model_hash, lv_qblock *b, int *layer);
uint64_t io_qblock_checksum(const lv_qblock *b);

/* W (d_out, d_in) = dequantized L. */
lv_status io_qmodel_dequant_linear(const lv_aq_layer *L, float *W);

/* fsync tmp, rename it to path, fsync the directory. */
lv_status io_commit_file(const char *tmp, const char *path);

#endif
