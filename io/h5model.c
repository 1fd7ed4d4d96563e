/* h5model.c: quantized models and block checkpoints in HDF5 (docs/formats-h5.md).
 *
 * Self-describing: every dataset named and typed, the model and quantization
 * config as attributes of the root group, a format_version that readers check.
 * Files are written to a temporary name, flushed, fsync'ed and renamed, so a
 * crash leaves either the old file or the new one, never half of one. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hdf5.h>

#include "io.h"
#include "io_impl.h"
#include "kern.h"

#define H5_FORMAT_NAME "llmvq-qmodel"
#define H5_BLOCK_FORMAT_NAME "llmvq-block"

/* Every HDF5 call is checked; failures name the file and the object. */
#define H5CHK(expr, ...)                                                       \
    do {                                                                       \
        if ((expr) < 0) LV_FAIL(LV_ERR_HDF5, __VA_ARGS__);                     \
    } while (0)

static void h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

/* Creation property lists without modification times: the same content gives
 * byte-identical files, so a resumed run can be compared with cmp. */
static hid_t plist_notime(hid_t cls)
{
    hid_t p = H5Pcreate(cls);
    if (p >= 0) H5Pset_obj_track_times(p, 0);
    return p;
}

static hid_t group_create(hid_t loc, const char *name)
{
    hid_t p = plist_notime(H5P_GROUP_CREATE);
    hid_t g = H5Gcreate2(loc, name, H5P_DEFAULT, p, H5P_DEFAULT);
    if (p >= 0) H5Pclose(p);
    return g;
}

static hid_t file_create(const char *path)
{
    hid_t p = plist_notime(H5P_FILE_CREATE);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, p, H5P_DEFAULT);
    if (p >= 0) H5Pclose(p);
    return f;
}

/* ---------------- attributes ---------------- */

static lv_status attr_write(hid_t loc, const char *name, hid_t type, const void *v,
                            const char *path)
{
    lv_status st = LV_OK;
    hid_t sp = -1, a = -1;
    H5CHK(sp = H5Screate(H5S_SCALAR), "%s: cannot create attribute %s", path, name);
    H5CHK(a = H5Acreate2(loc, name, type, sp, H5P_DEFAULT, H5P_DEFAULT),
          "%s: cannot create attribute %s", path, name);
    H5CHK(H5Awrite(a, type, v), "%s: cannot write attribute %s", path, name);
done:
    if (a >= 0) H5Aclose(a);
    if (sp >= 0) H5Sclose(sp);
    return st;
}

static lv_status attr_i64(hid_t loc, const char *name, int64_t v, const char *path)
{
    return attr_write(loc, name, H5T_NATIVE_INT64, &v, path);
}
static lv_status attr_u64(hid_t loc, const char *name, uint64_t v, const char *path)
{
    return attr_write(loc, name, H5T_NATIVE_UINT64, &v, path);
}
static lv_status attr_f64(hid_t loc, const char *name, double v, const char *path)
{
    return attr_write(loc, name, H5T_NATIVE_DOUBLE, &v, path);
}

static lv_status attr_str(hid_t loc, const char *name, const char *v, const char *path)
{
    lv_status st = LV_OK;
    hid_t t = -1;
    H5CHK(t = H5Tcopy(H5T_C_S1), "%s: attribute %s: type", path, name);
    H5CHK(H5Tset_size(t, strlen(v) + 1), "%s: attribute %s: size", path, name);
    LV_TRY(attr_write(loc, name, t, v, path));
done:
    if (t >= 0) H5Tclose(t);
    return st;
}

static lv_status attr_read(hid_t loc, const char *name, hid_t type, void *v, const char *path)
{
    lv_status st = LV_OK;
    hid_t a = -1;
    if (H5Aexists(loc, name) <= 0) LV_FAIL(LV_ERR_FORMAT, "%s: attribute '%s' missing", path, name);
    H5CHK(a = H5Aopen(loc, name, H5P_DEFAULT), "%s: cannot open attribute %s", path, name);
    H5CHK(H5Aread(a, type, v), "%s: cannot read attribute %s", path, name);
done:
    if (a >= 0) H5Aclose(a);
    return st;
}

static lv_status attr_get_i64(hid_t loc, const char *name, int64_t *v, const char *path)
{
    return attr_read(loc, name, H5T_NATIVE_INT64, v, path);
}

static lv_status attr_get_int(hid_t loc, const char *name, int *v, int64_t lo, int64_t hi,
                              const char *path)
{
    lv_status st = LV_OK;
    int64_t x = 0;
    LV_TRY(attr_get_i64(loc, name, &x, path));
    if (x < lo || x > hi)
        LV_FAIL(LV_ERR_FORMAT, "%s: attribute %s = %lld outside [%lld, %lld]", path, name,
                (long long)x, (long long)lo, (long long)hi);
    *v = (int)x;
done:
    return st;
}

static lv_status attr_get_str(hid_t loc, const char *name, char *buf, size_t cap,
                              const char *path)
{
    lv_status st = LV_OK;
    hid_t a = -1, t = -1, mt = -1;
    if (H5Aexists(loc, name) <= 0) LV_FAIL(LV_ERR_FORMAT, "%s: attribute '%s' missing", path, name);
    H5CHK(a = H5Aopen(loc, name, H5P_DEFAULT), "%s: cannot open attribute %s", path, name);
    H5CHK(t = H5Aget_type(a), "%s: attribute %s: type", path, name);
    if (H5Tget_class(t) != H5T_STRING || H5Tis_variable_str(t) > 0 || H5Tget_size(t) >= cap)
        LV_FAIL(LV_ERR_FORMAT, "%s: attribute %s is not a short fixed-length string", path, name);
    H5CHK(mt = H5Tcopy(H5T_C_S1), "%s: attribute %s", path, name);
    H5CHK(H5Tset_size(mt, cap), "%s: attribute %s", path, name);
    memset(buf, 0, cap);
    H5CHK(H5Aread(a, mt, buf), "%s: cannot read attribute %s", path, name);
    buf[cap - 1] = '\0';
done:
    if (mt >= 0) H5Tclose(mt);
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    return st;
}

/* ---------------- datasets ---------------- */

static lv_status dset_write(hid_t loc, const char *name, hid_t mem_type, hid_t file_type,
                            int rank, const int64_t *dims, const void *data, const char *path)
{
    lv_status st = LV_OK;
    hid_t sp = -1, d = -1, dcpl = -1;
    hsize_t hd[4];
    for (int i = 0; i < rank; i++) hd[i] = (hsize_t)dims[i];
    H5CHK(sp = H5Screate_simple(rank, hd, NULL), "%s: dataspace of %s", path, name);
    H5CHK(dcpl = plist_notime(H5P_DATASET_CREATE), "%s: property list of %s", path, name);
    H5CHK(d = H5Dcreate2(loc, name, file_type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT),
          "%s: cannot create dataset %s", path, name);
    H5CHK(H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
          "%s: cannot write dataset %s", path, name);
done:
    if (dcpl >= 0) H5Pclose(dcpl);
    if (d >= 0) H5Dclose(d);
    if (sp >= 0) H5Sclose(sp);
    return st;
}

/* Reads dataset `name` of exactly the given shape and class into data. */
static lv_status dset_read(hid_t loc, const char *name, hid_t mem_type, H5T_class_t cls,
                           int rank, const int64_t *dims, void *data, const char *path,
                           const char *where)
{
    lv_status st = LV_OK;
    hid_t d = -1, sp = -1, t = -1;
    hsize_t hd[4] = {0};
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s/%s missing", path, where, name);
    H5CHK(d = H5Dopen2(loc, name, H5P_DEFAULT), "%s: cannot open %s/%s", path, where, name);
    H5CHK(sp = H5Dget_space(d), "%s: %s/%s: dataspace", path, where, name);
    H5CHK(t = H5Dget_type(d), "%s: %s/%s: type", path, where, name);
    if (H5Tget_class(t) != cls)
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s/%s has the wrong type class", path, where, name);
    if (H5Sget_simple_extent_ndims(sp) != rank)
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s/%s has rank %d, expected %d", path, where, name,
                H5Sget_simple_extent_ndims(sp), rank);
    H5Sget_simple_extent_dims(sp, hd, NULL);
    for (int i = 0; i < rank; i++)
        if (hd[i] != (hsize_t)dims[i])
            LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s/%s dimension %d is %llu, expected %lld", path,
                    where, name, i, (unsigned long long)hd[i], (long long)dims[i]);
    H5CHK(H5Dread(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
          "%s: cannot read %s/%s (truncated or corrupt file?)", path, where, name);
done:
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    return st;
}

static lv_status check_finite(const float *x, int64_t n, const char *path, const char *what)
{
    lv_status st = LV_OK;
    for (int64_t i = 0; i < n; i++)
        if (!(x[i] == x[i]) || x[i] > 3.4e38f || x[i] < -3.4e38f)
            LV_FAIL(LV_ERR_NUMERIC, "%s: %s has a non-finite value at index %lld", path, what,
                    (long long)i);
done:
    return st;
}

/* ---------------- one linear / one block ---------------- */

/* shared: the model's one codebook tensor is stored at the root instead.
 * lora_A (r, d_in) and lora_B (d_out, r): the optional adapter (NULL: none). */
static lv_status write_linear(hid_t blk, lv_lin k, const lv_aq_layer *L, double rel_err,
                              int shared, int r, const float *lora_A, const float *lora_B,
                              const char *path)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    const char *name = lv_lin_name(k);
    int64_t cd[3] = {L->d_out, L->n_groups, L->M};
    int64_t bd[3] = {L->M, (int64_t)1 << L->nbits, L->g};
    if (r < 0 || (r > 0 && (!lora_A != !lora_B)) || r > L->d_out || r > L->d_in)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: %s: LoRA rank %d with %s (linear %lld x %lld)", path,
                name, r, !lora_A != !lora_B ? "only one factor" : "factors",
                (long long)L->d_out, (long long)L->d_in);
    H5CHK(g = group_create(blk, name), "%s: group %s", path, name);
    LV_TRY(attr_i64(g, "d_out", L->d_out, path));
    LV_TRY(attr_i64(g, "d_in", L->d_in, path));
    LV_TRY(attr_i64(g, "num_codebooks", L->M, path));
    LV_TRY(attr_i64(g, "nbits", L->nbits, path));
    LV_TRY(attr_i64(g, "group_size", L->g, path));
    LV_TRY(attr_f64(g, "rel_err", rel_err, path));
    LV_TRY(dset_write(g, "codes", H5T_NATIVE_UINT16, H5T_STD_U16LE, 3, cd, L->codes, path));
    if (!shared)
        LV_TRY(dset_write(g, "codebooks", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 3, bd, L->codebooks,
                          path));
    LV_TRY(dset_write(g, "scales", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 1, &L->d_out, L->scales, path));
    if (L->n_outl > 0) {
        int64_t on = L->n_outl, od[2] = {L->d_out, L->n_outl};
        LV_TRY(dset_write(g, "outlier_idx", H5T_NATIVE_INT32, H5T_STD_I32LE, 1, &on, L->outl_idx,
                          path));
        LV_TRY(dset_write(g, "outlier_w", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 2, od, L->outl_w, path));
    }
    if (r > 0 && lora_A && lora_B) {
        int64_t ad[2] = {r, L->d_in}, bd2[2] = {L->d_out, r};
        LV_TRY(dset_write(g, "lora_A", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 2, ad, lora_A, path));
        LV_TRY(dset_write(g, "lora_B", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 2, bd2, lora_B, path));
    }
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

/* dims (rank entries) of dataset `name`, which must have that rank. */
static lv_status dset_dims(hid_t loc, const char *name, int rank, int64_t *dims, const char *path,
                           const char *where)
{
    lv_status st = LV_OK;
    hid_t d = -1, sp = -1;
    hsize_t hd[4] = {0};
    H5CHK(d = H5Dopen2(loc, name, H5P_DEFAULT), "%s: cannot open %s/%s", path, where, name);
    H5CHK(sp = H5Dget_space(d), "%s: %s/%s: dataspace", path, where, name);
    if (H5Sget_simple_extent_ndims(sp) != rank)
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s/%s has rank %d, expected %d", path, where, name,
                H5Sget_simple_extent_ndims(sp), rank);
    H5Sget_simple_extent_dims(sp, hd, NULL);
    for (int i = 0; i < rank; i++) dims[i] = (int64_t)hd[i];
done:
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    return st;
}

/* The optional adapter of linear group g (`w` names it): *r = 0 and nothing
 * allocated when the group has neither lora_A nor lora_B; else both must be
 * there, lora_A (r, d_in) and lora_B (d_out, r) with 1 <= r <= min(d_out, d_in),
 * finite. *A, *B malloc'd (the caller owns them, also on failure). */
/* Optional outlier columns of a linear: both datasets or neither. */
static lv_status read_outliers(hid_t g, lv_aq_layer *L, const char *path, const char *w)
{
    lv_status st = LV_OK;
    int64_t on = 0, od[2] = {0, 0};
    char what[160];
    int has_i = H5Lexists(g, "outlier_idx", H5P_DEFAULT) > 0;
    int has_w = H5Lexists(g, "outlier_w", H5P_DEFAULT) > 0;
    if (!has_i && !has_w) goto done;
    if (!has_i || !has_w)
        LV_FAIL(LV_ERR_FORMAT, "%s: %s has %s but not %s", path, w,
                has_i ? "outlier_idx" : "outlier_w", has_i ? "outlier_w" : "outlier_idx");
    LV_TRY(dset_dims(g, "outlier_idx", 1, &on, path, w));
    if (on < 1 || on > L->d_in)
        LV_FAIL(LV_ERR_FORMAT, "%s: %s/outlier_idx has %lld entries, expected 1 .. %lld", path, w,
                (long long)on, (long long)L->d_in);
    LV_TRY(lv_aq_outliers_alloc(L, (int)on));
    od[0] = L->d_out;
    od[1] = on;
    LV_TRY(dset_read(g, "outlier_idx", H5T_NATIVE_INT32, H5T_INTEGER, 1, &on, L->outl_idx, path, w));
    LV_TRY(dset_read(g, "outlier_w", H5T_NATIVE_FLOAT, H5T_FLOAT, 2, od, L->outl_w, path, w));
    snprintf(what, sizeof what, "%s: %s", path, w);
    LV_TRY(lv_aq_outliers_check(L, what));
done:
    return st;
}

static lv_status read_lora(hid_t g, const lv_aq_layer *L, int *r, float **A, float **B,
                           const char *path, const char *w)
{
    lv_status st = LV_OK;
    int64_t ad[2] = {0, 0};
    char what[128];
    int has_a = H5Lexists(g, "lora_A", H5P_DEFAULT) > 0;
    int has_b = H5Lexists(g, "lora_B", H5P_DEFAULT) > 0;
    *r = 0;
    if (!has_a && !has_b) goto done;
    if (!has_a || !has_b)
        LV_FAIL(LV_ERR_FORMAT, "%s: %s has %s but not %s", path, w, has_a ? "lora_A" : "lora_B",
                has_a ? "lora_B" : "lora_A");
    LV_TRY(dset_dims(g, "lora_A", 2, ad, path, w));
    if (ad[0] < 1 || ad[0] > L->d_out || ad[0] > L->d_in || ad[1] != L->d_in)
        LV_FAIL(LV_ERR_FORMAT, "%s: %s/lora_A is %lld x %lld, expected (r, %lld) with 1 <= r <= "
                "%lld", path, w, (long long)ad[0], (long long)ad[1], (long long)L->d_in,
                (long long)(L->d_out < L->d_in ? L->d_out : L->d_in));
    int64_t bd[2] = {L->d_out, ad[0]};
    LV_ALLOC(*A, (size_t)(ad[0] * ad[1]));
    LV_ALLOC(*B, (size_t)(bd[0] * bd[1]));
    LV_TRY(dset_read(g, "lora_A", H5T_NATIVE_FLOAT, H5T_FLOAT, 2, ad, *A, path, w));
    LV_TRY(dset_read(g, "lora_B", H5T_NATIVE_FLOAT, H5T_FLOAT, 2, bd, *B, path, w));
    snprintf(what, sizeof what, "%s/lora_A", w);
    LV_TRY(check_finite(*A, ad[0] * ad[1], path, what));
    snprintf(what, sizeof what, "%s/lora_B", w);
    LV_TRY(check_finite(*B, bd[0] * bd[1], path, what));
    *r = (int)ad[0];
done:
    return st;
}

/* shared (may be NULL): the model's one codebook tensor, shape (M, 2^nbits, g) of
 * shared_dims, copied into L instead of reading the linear's own. */
static lv_status read_linear(hid_t blk, lv_lin k, const lv_model_config *cfg, lv_aq_layer *L,
                             double *rel_err, const float *shared, const int *shared_dims,
                             int *lora_r, float **lora_A, float **lora_B, const char *path,
                             const char *where)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    const char *name = lv_lin_name(k);
    char w[96];
    int64_t o, i, d_out = 0, d_in = 0;
    int M = 0, nbits = 0, gs = 0;
    snprintf(w, sizeof w, "%s/%s", where, name);
    if (H5Lexists(blk, name, H5P_DEFAULT) <= 0) LV_FAIL(LV_ERR_FORMAT, "%s: group %s missing", path, w);
    H5CHK(g = H5Gopen2(blk, name, H5P_DEFAULT), "%s: cannot open %s", path, w);
    lv_lin_shape(cfg, k, &o, &i);
    LV_TRY(attr_get_i64(g, "d_out", &d_out, path));
    LV_TRY(attr_get_i64(g, "d_in", &d_in, path));
    if (d_out != o || d_in != i)
        LV_FAIL(LV_ERR_FORMAT, "%s: %s is %lld x %lld, the model config says %lld x %lld", path, w,
                (long long)d_out, (long long)d_in, (long long)o, (long long)i);
    LV_TRY(attr_get_int(g, "num_codebooks", &M, 1, 64, path));
    LV_TRY(attr_get_int(g, "nbits", &nbits, 1, 16, path));
    LV_TRY(attr_get_int(g, "group_size", &gs, 1, 1 << 16, path));
    LV_TRY(attr_read(g, "rel_err", H5T_NATIVE_DOUBLE, rel_err, path));
    LV_TRY(lv_aq_layer_init(L, o, i, M, nbits, gs));
    int64_t cd[3] = {L->d_out, L->n_groups, L->M};
    int64_t bd[3] = {L->M, (int64_t)1 << L->nbits, L->g};
    LV_TRY(dset_read(g, "codes", H5T_NATIVE_UINT16, H5T_INTEGER, 3, cd, L->codes, path, w));
    if (shared) {
        if (M != shared_dims[0] || nbits != shared_dims[1] || gs != shared_dims[2])
            LV_FAIL(LV_ERR_FORMAT, "%s: %s is %dx%dg%d but the shared codebooks are %dx%dg%d",
                    path, w, M, nbits, gs, shared_dims[0], shared_dims[1], shared_dims[2]);
        memcpy(L->codebooks, shared, sizeof(float) * (size_t)(bd[0] * bd[1] * bd[2]));
    } else {
        LV_TRY(dset_read(g, "codebooks", H5T_NATIVE_FLOAT, H5T_FLOAT, 3, bd, L->codebooks, path,
                         w));
    }
    LV_TRY(dset_read(g, "scales", H5T_NATIVE_FLOAT, H5T_FLOAT, 1, &L->d_out, L->scales, path, w));
    int64_t nc = cd[0] * cd[1] * cd[2];
    uint32_t K = 1u << nbits;
    for (int64_t c = 0; c < nc; c++)
        if (L->codes[c] >= K)
            LV_FAIL(LV_ERR_FORMAT, "%s: %s/codes[%lld] = %u >= 2^nbits", path, w, (long long)c,
                    L->codes[c]);
    char what[128];
    snprintf(what, sizeof what, "%s/codebooks", w);
    LV_TRY(check_finite(L->codebooks, bd[0] * bd[1] * bd[2], path, what));
    snprintf(what, sizeof what, "%s/scales", w);
    LV_TRY(check_finite(L->scales, L->d_out, path, what));
    LV_TRY(read_outliers(g, L, path, w));
    LV_TRY(read_lora(g, L, lora_r, lora_A, lora_B, path, w));
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

static lv_status write_block(hid_t loc, const char *name, const lv_qblock *b, int layer,
                             int dim, int shared, const char *path)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    int64_t d = dim;
    H5CHK(g = group_create(loc, name), "%s: group %s", path, name);
    LV_TRY(attr_i64(g, "layer", layer, path));
    LV_TRY(attr_f64(g, "block_mse", b->block_mse, path));
    LV_TRY(dset_write(g, "attn_norm", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 1, &d, b->attn_norm, path));
    LV_TRY(dset_write(g, "ffn_norm", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 1, &d, b->ffn_norm, path));
    for (int k = 0; k < LV_LIN_COUNT; k++)
        LV_TRY(write_linear(g, (lv_lin)k, &b->lin[k], b->rel_err[k], shared, b->lora_rank,
                            b->lora_A[k], b->lora_B[k], path));
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

/* Reads block group `name` into b (b zeroed; freed by the caller on failure). */
/* shared (may be NULL): the model's shared codebook tensors, slot-major (share:
 * the sharing mode, LV_SHARE_*), shape (M, 2^nbits, g) each of shared_dims. */
static lv_status read_block(hid_t loc, const char *name, const lv_model_config *cfg, lv_qblock *b,
                            int *layer, const float *shared, int share, const int *shared_dims,
                            const char *path)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    int64_t d = cfg->dim;
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) LV_FAIL(LV_ERR_FORMAT, "%s: group %s missing", path, name);
    H5CHK(g = H5Gopen2(loc, name, H5P_DEFAULT), "%s: cannot open group %s", path, name);
    LV_TRY(attr_get_int(g, "layer", layer, 0, cfg->n_layers - 1, path));
    LV_TRY(attr_read(g, "block_mse", H5T_NATIVE_DOUBLE, &b->block_mse, path));
    LV_ALLOC(b->attn_norm, (size_t)d);
    LV_ALLOC(b->ffn_norm, (size_t)d);
    LV_TRY(dset_read(g, "attn_norm", H5T_NATIVE_FLOAT, H5T_FLOAT, 1, &d, b->attn_norm, path, name));
    LV_TRY(dset_read(g, "ffn_norm", H5T_NATIVE_FLOAT, H5T_FLOAT, 1, &d, b->ffn_norm, path, name));
    LV_TRY(check_finite(b->attn_norm, d, path, "attn_norm"));
    LV_TRY(check_finite(b->ffn_norm, d, path, "ffn_norm"));
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int r = 0;
        const float *sk = shared ? shared + (int64_t)lv_share_slot(share, k) * shared_dims[0] *
                                               ((int64_t)1 << shared_dims[1]) * shared_dims[2]
                                 : NULL;
        LV_TRY(read_linear(g, (lv_lin)k, cfg, &b->lin[k], &b->rel_err[k], sk, shared_dims,
                           &r, &b->lora_A[k], &b->lora_B[k], path, name));
        if (r && b->lora_rank && r != b->lora_rank)
            LV_FAIL(LV_ERR_FORMAT, "%s: %s/%s has LoRA rank %d, another linear of the block %d",
                    path, name, lv_lin_name((lv_lin)k), r, b->lora_rank);
        if (r) b->lora_rank = r;
    }
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

/* ---------------- config attributes ---------------- */

static lv_status write_config(hid_t f, const lv_model_config *c, const char *path)
{
    lv_status st = LV_OK;
    LV_TRY(attr_i64(f, "dim", c->dim, path));
    LV_TRY(attr_i64(f, "hidden_dim", c->hidden_dim, path));
    LV_TRY(attr_i64(f, "n_layers", c->n_layers, path));
    LV_TRY(attr_i64(f, "n_heads", c->n_heads, path));
    LV_TRY(attr_i64(f, "n_kv_heads", c->n_kv_heads, path));
    LV_TRY(attr_i64(f, "vocab_size", c->vocab_size, path));
    LV_TRY(attr_i64(f, "seq_len", c->seq_len, path));
    LV_TRY(attr_f64(f, "norm_eps", c->norm_eps, path));
    LV_TRY(attr_f64(f, "rope_theta", c->rope_theta, path));
    LV_TRY(attr_str(f, "rope", c->rope == LV_ROPE_HALF ? "half" : "interleaved", path));
    LV_TRY(attr_i64(f, "tied_cls", c->tied_cls, path));
done:
    return st;
}

static lv_status read_config(hid_t f, lv_model_config *c, const char *path)
{
    lv_status st = LV_OK;
    double eps = 0, theta = 0;
    char rope[32];
    memset(c, 0, sizeof *c);
    LV_TRY(attr_get_int(f, "dim", &c->dim, 1, 1 << 20, path));
    LV_TRY(attr_get_int(f, "hidden_dim", &c->hidden_dim, 1, 1 << 20, path));
    LV_TRY(attr_get_int(f, "n_layers", &c->n_layers, 1, 4096, path));
    LV_TRY(attr_get_int(f, "n_heads", &c->n_heads, 1, 4096, path));
    LV_TRY(attr_get_int(f, "n_kv_heads", &c->n_kv_heads, 1, 4096, path));
    LV_TRY(attr_get_int(f, "vocab_size", &c->vocab_size, 1, 1 << 24, path));
    LV_TRY(attr_get_int(f, "seq_len", &c->seq_len, 1, 1 << 24, path));
    LV_TRY(attr_read(f, "norm_eps", H5T_NATIVE_DOUBLE, &eps, path));
    LV_TRY(attr_read(f, "rope_theta", H5T_NATIVE_DOUBLE, &theta, path));
    LV_TRY(attr_get_str(f, "rope", rope, sizeof rope, path));
    LV_TRY(attr_get_int(f, "tied_cls", &c->tied_cls, 0, 1, path));
    c->norm_eps = (float)eps;
    c->rope_theta = (float)theta;
    if (!strcmp(rope, "half"))
        c->rope = LV_ROPE_HALF;
    else if (!strcmp(rope, "interleaved"))
        c->rope = LV_ROPE_INTERLEAVED;
    else
        LV_FAIL(LV_ERR_FORMAT, "%s: unknown rope '%s'", path, rope);
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads || !(eps > 0) || !(theta > 0))
        LV_FAIL(LV_ERR_FORMAT, "%s: inconsistent model config attributes", path);
done:
    return st;
}

/* Opens path for reading and checks format name and version. */
static lv_status open_checked(hid_t *f, const char *path, const char *format)
{
    lv_status st = LV_OK;
    char name[64];
    int64_t ver = 0;
    *f = -1;
    h5_quiet();
    if (access(path, R_OK) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (H5Fis_hdf5(path) <= 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: not an HDF5 file (truncated or corrupt?)", path);
    H5CHK(*f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT), "%s: cannot open as HDF5 (truncated or corrupt?)", path);
    LV_TRY(attr_get_str(*f, "format", name, sizeof name, path));
    if (strcmp(name, format))
        LV_FAIL(LV_ERR_FORMAT, "%s: is a '%s' file, expected '%s'", path, name, format);
    LV_TRY(attr_get_i64(*f, "format_version", &ver, path));
    if (ver != IO_H5_FORMAT_VERSION)
        LV_FAIL(LV_ERR_FORMAT, "%s: format_version %lld, this llmvq reads version %d: use the "
                "llmvq that wrote it, or re-run the job", path, (long long)ver, IO_H5_FORMAT_VERSION);
done:
    return st;
}

/* ---------------- atomic file creation ---------------- */

static lv_status tmp_name(char *buf, size_t cap, const char *path)
{
    lv_status st = LV_OK;
    if ((size_t)snprintf(buf, cap, "%s.tmp.%ld", path, (long)getpid()) >= cap)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: path too long", path);
done:
    return st;
}

lv_status io_commit_file(const char *tmp, const char *path)
{
    lv_status st = LV_OK;
    int fd = open(tmp, O_RDONLY);
    if (fd < 0 || fsync(fd) != 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot fsync: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    /* make the rename durable */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0'; else snprintf(dir, sizeof dir, ".");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
done:
    if (fd >= 0) close(fd);
    return st;
}

/* ---------------- public: whole model ---------------- */

static uint64_t qmodel_checksum(const lv_qmodel *q);

/* The shared codebook tensors at the root, after checking that every linear
 * holds the same copy as the owner of its slot (a model that claims sharing
 * but does not share would be silently wrong once stored once): "codebooks",
 * (M, 2^B, g) for LV_SHARE_MODEL, (7, M, 2^B, g) in linear order for
 * LV_SHARE_TYPE. */
/* 1 and the first (block, linear) whose scales are off their 8-bit grid, or 0. */
static int scales8_off(const lv_qmodel *q, int *block, int *lin)
{
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            if (!lv_aq_scales8_ok(&q->blocks[l].lin[k])) {
                *block = l, *lin = k;
                return 1;
            }
    return 0;
}

static lv_status write_shared_codebooks(hid_t f, const lv_qmodel *q, const char *path)
{
    lv_status st = LV_OK;
    const int share = q->shared_codebooks, slots = lv_share_slots(share);
    const lv_aq_layer *L0 = &q->blocks[0].lin[0];
    const int64_t N = (int64_t)L0->M * ((int64_t)1 << L0->nbits) * L0->g;
    int64_t bd[4] = {slots, L0->M, (int64_t)1 << L0->nbits, L0->g};
    float *all = NULL;
    if (slots < 1) LV_FAIL(LV_ERR_INVALID_ARG, "%s: shared_codebooks = %d is not a sharing mode",
                           path, share);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            const int own = lv_share_slot(share, k);
            const lv_aq_layer *O = &q->blocks[0].lin[own];
            if (L->M != L0->M || L->nbits != L0->nbits || L->g != L0->g ||
                memcmp(L->codebooks, O->codebooks, sizeof(float) * (size_t)N) != 0)
                LV_FAIL(LV_ERR_INVALID_ARG, "%s: shared codebooks (%s): block %d %s holds other "
                        "codebooks than block 0 %s", path, lv_share_name(share), l,
                        lv_lin_name((lv_lin)k), lv_lin_name((lv_lin)own));
        }
    LV_ALLOC(all, (size_t)(slots * N));
    for (int s = 0; s < slots; s++)
        memcpy(all + s * N, q->blocks[0].lin[s].codebooks, sizeof(float) * (size_t)N);
    if (share == LV_SHARE_MODEL)
        LV_TRY(dset_write(f, "codebooks", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 3, bd + 1, all, path));
    else
        LV_TRY(dset_write(f, "codebooks", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 4, bd, all, path));
done:
    free(all);
    return st;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n);

static size_t arr_elem_bytes(io_arr_type t)
{
    return t == IO_ARR_U16 ? 2 : t == IO_ARR_F32 ? 4 : 8;
}

static void arr_h5_types(io_arr_type t, hid_t *mem, hid_t *file, H5T_class_t *cls)
{
    switch (t) {
    case IO_ARR_F32: *mem = H5T_NATIVE_FLOAT, *file = H5T_IEEE_F32LE, *cls = H5T_FLOAT; break;
    case IO_ARR_F64: *mem = H5T_NATIVE_DOUBLE, *file = H5T_IEEE_F64LE, *cls = H5T_FLOAT; break;
    case IO_ARR_I64: *mem = H5T_NATIVE_INT64, *file = H5T_STD_I64LE, *cls = H5T_INTEGER; break;
    case IO_ARR_U64: *mem = H5T_NATIVE_UINT64, *file = H5T_STD_U64LE, *cls = H5T_INTEGER; break;
    default: *mem = H5T_NATIVE_UINT16, *file = H5T_STD_U16LE, *cls = H5T_INTEGER; break;
    }
}

static uint64_t arr_checksum(const io_array *arr, int n_arr)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < n_arr; i++)
        h = fnv(h, arr[i].data, (size_t)arr[i].n * arr_elem_bytes(arr[i].type));
    return h;
}

static lv_status write_extra(hid_t f, const char *group, const io_array *arr, int n_arr,
                             const char *path)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    H5CHK(g = group_create(f, group), "%s: group %s", path, group);
    for (int i = 0; i < n_arr; i++) {
        hid_t mem, file;
        H5T_class_t cls;
        arr_h5_types(arr[i].type, &mem, &file, &cls);
        LV_TRY(dset_write(g, arr[i].name, mem, file, 1, &arr[i].n, arr[i].data, path));
    }
    LV_TRY(attr_u64(g, "checksum", arr_checksum(arr, n_arr), path));
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

static lv_status read_extra(hid_t f, const char *group, io_array *arr, int n_arr,
                            const char *path)
{
    lv_status st = LV_OK;
    hid_t g = -1;
    uint64_t sum = 0;
    if (H5Lexists(f, group, H5P_DEFAULT) <= 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: group %s missing", path, group);
    H5CHK(g = H5Gopen2(f, group, H5P_DEFAULT), "%s: cannot open group %s", path, group);
    for (int i = 0; i < n_arr; i++) {
        hid_t mem, file;
        H5T_class_t cls;
        arr_h5_types(arr[i].type, &mem, &file, &cls);
        LV_TRY(dset_read(g, arr[i].name, mem, cls, 1, &arr[i].n, arr[i].data, path, group));
    }
    LV_TRY(attr_read(g, "checksum", H5T_NATIVE_UINT64, &sum, path));
    if (sum != arr_checksum(arr, n_arr))
        LV_FAIL(LV_ERR_FORMAT, "%s: checksum mismatch in group %s: the file is corrupt", path,
                group);
done:
    if (g >= 0) H5Gclose(g);
    return st;
}

lv_status io_qmodel_write(const lv_qmodel *q, const char *path)
{
    return io_qmodel_write_extra(q, path, NULL, NULL, 0);
}

lv_status io_qmodel_write_extra(const lv_qmodel *q, const char *path, const char *group,
                                const io_array *arr, int n_arr)
{
    lv_status st = LV_OK;
    hid_t f = -1, blocks = -1;
    char tmp[4200];
    const lv_model_config *c = &q->cfg;
    int64_t emb[2] = {c->vocab_size, c->dim}, d = c->dim;
    h5_quiet();
    LV_TRY(tmp_name(tmp, sizeof tmp, path));
    H5CHK(f = file_create(tmp), "%s: cannot create", tmp);
    LV_TRY(attr_str(f, "format", H5_FORMAT_NAME, path));
    LV_TRY(attr_i64(f, "format_version", IO_H5_FORMAT_VERSION, path));
    LV_TRY(write_config(f, c, path));
    LV_TRY(attr_i64(f, "num_codebooks", q->M, path));
    LV_TRY(attr_i64(f, "nbits", q->nbits, path));
    LV_TRY(attr_i64(f, "group_size", q->g, path));
    LV_TRY(attr_u64(f, "job_hash", q->job_hash, path));
    LV_TRY(attr_u64(f, "model_hash", q->model_hash, path));
    LV_TRY(attr_f64(f, "bpw_total", lv_qmodel_bits_per_weight(q), path));
    LV_TRY(attr_i64(f, "shared_codebooks", q->shared_codebooks, path));
    if (q->scale_bits == 8) { /* absent: fp16 scales (files before 8-bit scales existed too) */
        int bl, bk;
        if (scales8_off(q, &bl, &bk))
            LV_FAIL(LV_ERR_INVALID_ARG, "%s: scale_bits = 8 but block %d %s has scales off the "
                    "8-bit grid", path, bl, lv_lin_name((lv_lin)bk));
        LV_TRY(attr_i64(f, "scale_bits", 8, path));
    }
    LV_TRY(attr_u64(f, "checksum", qmodel_checksum(q), path));
    if (q->shared_codebooks) LV_TRY(write_shared_codebooks(f, q, path));
    LV_TRY(dset_write(f, "tok_embeddings", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 2, emb, q->tok_emb, path));
    LV_TRY(dset_write(f, "final_norm", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 1, &d, q->final_norm, path));
    if (!c->tied_cls)
        LV_TRY(dset_write(f, "lm_head", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, 2, emb, q->wcls, path));
    H5CHK(blocks = group_create(f, "blocks"), "%s: group blocks", path);
    for (int l = 0; l < c->n_layers; l++) {
        char name[16];
        snprintf(name, sizeof name, "%03d", l);
        LV_TRY(write_block(blocks, name, &q->blocks[l], l, c->dim, q->shared_codebooks, path));
    }
    H5Gclose(blocks);
    blocks = -1;
    if (group) LV_TRY(write_extra(f, group, arr, n_arr, path));
    H5CHK(H5Fflush(f, H5F_SCOPE_GLOBAL), "%s: flush failed", tmp);
    H5CHK(H5Fclose(f), "%s: close failed", tmp);
    f = -1;
    LV_TRY(io_commit_file(tmp, path));
done:
    if (blocks >= 0) H5Gclose(blocks);
    if (f >= 0) H5Fclose(f);
    if (st != LV_OK) unlink(tmp);
    return st;
}

lv_status io_qmodel_extra_length(const char *path, const char *name, int64_t *n)
{
    lv_status st = LV_OK;
    hid_t f = -1, d = -1, sp = -1;
    hsize_t dim = 0;
    *n = 0;
    LV_TRY(open_checked(&f, path, H5_FORMAT_NAME));
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) /* also false when the group is missing */
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s missing", path, name);
    H5CHK(d = H5Dopen2(f, name, H5P_DEFAULT), "%s: cannot open %s", path, name);
    H5CHK(sp = H5Dget_space(d), "%s: %s: dataspace", path, name);
    if (H5Sget_simple_extent_ndims(sp) != 1)
        LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s is not 1-D", path, name);
    H5Sget_simple_extent_dims(sp, &dim, NULL);
    if (dim > (hsize_t)1 << 40) LV_FAIL(LV_ERR_FORMAT, "%s: dataset %s: implausible length", path, name);
    *n = (int64_t)dim;
done:
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    if (f >= 0) H5Fclose(f);
    return st;
}

lv_status io_qmodel_read(lv_qmodel **out, const char *path)
{
    return io_qmodel_read_extra(out, path, NULL, NULL, 0);
}

lv_status io_qmodel_read_extra(lv_qmodel **out, const char *path, const char *group,
                               io_array *arr, int n_arr)
{
    lv_status st = LV_OK;
    hid_t f = -1, blocks = -1;
    lv_qmodel *q = NULL;
    float *shared = NULL;
    int sdims[3] = {0, 0, 0};
    *out = NULL;
    LV_TRY(open_checked(&f, path, H5_FORMAT_NAME));
    LV_ALLOC(q, 1);
    LV_TRY(read_config(f, &q->cfg, path));
    const lv_model_config *c = &q->cfg;
    LV_TRY(attr_get_int(f, "num_codebooks", &q->M, 1, 64, path));
    LV_TRY(attr_get_int(f, "nbits", &q->nbits, 1, 16, path));
    LV_TRY(attr_get_int(f, "group_size", &q->g, 1, 1 << 16, path));
    LV_TRY(attr_read(f, "job_hash", H5T_NATIVE_UINT64, &q->job_hash, path));
    LV_TRY(attr_read(f, "model_hash", H5T_NATIVE_UINT64, &q->model_hash, path));
    /* absent in files written before codebook sharing existed: not shared */
    if (H5Aexists(f, "shared_codebooks") > 0)
        LV_TRY(attr_get_int(f, "shared_codebooks", &q->shared_codebooks, 0, LV_SHARE_TYPE, path));
    if (q->shared_codebooks) {
        const int slots = lv_share_slots(q->shared_codebooks);
        sdims[0] = q->M, sdims[1] = q->nbits, sdims[2] = q->g;
        int64_t bd[4] = {slots, q->M, (int64_t)1 << q->nbits, q->g};
        LV_ALLOC(shared, (size_t)(bd[0] * bd[1] * bd[2] * bd[3]));
        if (q->shared_codebooks == LV_SHARE_MODEL)
            LV_TRY(dset_read(f, "codebooks", H5T_NATIVE_FLOAT, H5T_FLOAT, 3, bd + 1, shared, path, ""));
        else
            LV_TRY(dset_read(f, "codebooks", H5T_NATIVE_FLOAT, H5T_FLOAT, 4, bd, shared, path, ""));
        LV_TRY(check_finite(shared, bd[0] * bd[1] * bd[2] * bd[3], path, "codebooks"));
    }
    int64_t emb[2] = {c->vocab_size, c->dim}, d = c->dim;
    LV_ALLOC(q->tok_emb, (size_t)emb[0] * (size_t)emb[1]);
    LV_ALLOC(q->final_norm, (size_t)d);
    LV_TRY(dset_read(f, "tok_embeddings", H5T_NATIVE_FLOAT, H5T_FLOAT, 2, emb, q->tok_emb, path, ""));
    LV_TRY(dset_read(f, "final_norm", H5T_NATIVE_FLOAT, H5T_FLOAT, 1, &d, q->final_norm, path, ""));
    LV_TRY(check_finite(q->tok_emb, emb[0] * emb[1], path, "tok_embeddings"));
    if (!c->tied_cls) {
        LV_ALLOC(q->wcls, (size_t)emb[0] * (size_t)emb[1]);
        LV_TRY(dset_read(f, "lm_head", H5T_NATIVE_FLOAT, H5T_FLOAT, 2, emb, q->wcls, path, ""));
        LV_TRY(check_finite(q->wcls, emb[0] * emb[1], path, "lm_head"));
    }
    LV_ALLOC(q->blocks, (size_t)c->n_layers);
    if (H5Lexists(f, "blocks", H5P_DEFAULT) <= 0) LV_FAIL(LV_ERR_FORMAT, "%s: group blocks missing", path);
    H5CHK(blocks = H5Gopen2(f, "blocks", H5P_DEFAULT), "%s: cannot open group blocks", path);
    for (int l = 0; l < c->n_layers; l++) {
        char name[16];
        int layer = -1;
        snprintf(name, sizeof name, "%03d", l);
        LV_TRY(read_block(blocks, name, c, &q->blocks[l], &layer, shared, q->shared_codebooks,
                          sdims, path));
        if (layer != l) LV_FAIL(LV_ERR_FORMAT, "%s: blocks/%s holds layer %d", path, name, layer);
    }
    /* absent in files written before it existed */
    if (H5Aexists(f, "checksum") > 0) {
        uint64_t sum = 0;
        LV_TRY(attr_read(f, "checksum", H5T_NATIVE_UINT64, &sum, path));
        if (sum != qmodel_checksum(q))
            LV_FAIL(LV_ERR_FORMAT, "%s: checksum mismatch: the model's data is corrupt", path);
    }
    if (H5Aexists(f, "scale_bits") > 0) {
        LV_TRY(attr_get_int(f, "scale_bits", &q->scale_bits, 8, 16, path));
        if (q->scale_bits != 8 && q->scale_bits != 16)
            LV_FAIL(LV_ERR_FORMAT, "%s: scale_bits = %d (8 or 16)", path, q->scale_bits);
        int bl, bk;
        if (q->scale_bits == 8 && scales8_off(q, &bl, &bk))
            LV_FAIL(LV_ERR_FORMAT, "%s: scale_bits = 8 but block %d %s has scales off the 8-bit "
                    "grid: the file is corrupt", path, bl, lv_lin_name((lv_lin)bk));
    }
    if (group) LV_TRY(read_extra(f, group, arr, n_arr, path));
    *out = q;
    q = NULL;
done:
    if (blocks >= 0) H5Gclose(blocks);
    if (f >= 0) H5Fclose(f);
    lv_qmodel_free(q);
    free(shared);
    return st;
}

/* ---------------- public: block checkpoints ---------------- */

lv_status io_qblock_write(const char *path, const lv_qblock *b, int layer,
                          const lv_model_config *cfg, uint64_t job_hash, uint64_t model_hash)
{
    lv_status st = LV_OK;
    hid_t f = -1;
    char tmp[4200];
    h5_quiet();
    LV_TRY(tmp_name(tmp, sizeof tmp, path));
    H5CHK(f = file_create(tmp), "%s: cannot create", tmp);
    LV_TRY(attr_str(f, "format", H5_BLOCK_FORMAT_NAME, path));
    LV_TRY(attr_i64(f, "format_version", IO_H5_FORMAT_VERSION, path));
    LV_TRY(write_config(f, cfg, path));
    LV_TRY(attr_u64(f, "job_hash", job_hash, path));
    LV_TRY(attr_u64(f, "model_hash", model_hash, path));
    LV_TRY(attr_u64(f, "checksum", io_qblock_checksum(b), path));
    LV_TRY(write_block(f, "block", b, layer, cfg->dim, 0, path));
    H5CHK(H5Fflush(f, H5F_SCOPE_GLOBAL), "%s: flush failed", tmp);
    H5CHK(H5Fclose(f), "%s: close failed", tmp);
    f = -1;
    LV_TRY(io_commit_file(tmp, path));
done:
    if (f >= 0) H5Fclose(f);
    if (st != LV_OK) unlink(tmp);
    return st;
}

/* Opens a block checkpoint, reads its tags into info and its block into b, and
 * verifies the checksum. cfg (optional) must match the file's config. */
static lv_status qblock_load(const char *path, const lv_model_config *cfg, lv_qblock *b,
                             io_qblock_info *info)
{
    lv_status st = LV_OK;
    hid_t f = -1;
    memset(b, 0, sizeof *b);
    memset(info, 0, sizeof *info);
    info->layer = -1;
    LV_TRY(open_checked(&f, path, H5_BLOCK_FORMAT_NAME));
    LV_TRY(read_config(f, &info->cfg, path));
    if (cfg && memcmp(&info->cfg, cfg, sizeof *cfg) != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: checkpoint of a model with another config", path);
    LV_TRY(attr_read(f, "job_hash", H5T_NATIVE_UINT64, &info->job_hash, path));
    LV_TRY(attr_read(f, "model_hash", H5T_NATIVE_UINT64, &info->model_hash, path));
    LV_TRY(attr_read(f, "checksum", H5T_NATIVE_UINT64, &info->checksum, path));
    LV_TRY(read_block(f, "block", &info->cfg, b, &info->layer, NULL, 0, NULL, path));
    if (io_qblock_checksum(b) != info->checksum)
        LV_FAIL(LV_ERR_FORMAT, "%s: checksum mismatch: the block's data is corrupt", path);
    info->block_mse = b->block_mse;
    memcpy(info->rel_err, b->rel_err, sizeof info->rel_err);
done:
    if (f >= 0) H5Fclose(f);
    if (st != LV_OK) lv_qblock_free(b);
    return st;
}

lv_status io_qblock_read(const char *path, const lv_model_config *cfg, uint64_t job_hash,
                         uint64_t model_hash, lv_qblock *b, int *layer)
{
    lv_status st = LV_OK;
    io_qblock_info info;
    LV_TRY(qblock_load(path, cfg, b, &info));
    if (info.model_hash != model_hash)
        LV_FAIL(LV_ERR_FORMAT, "%s: checkpoint of another model (hash %016" PRIx64 ", this model %016"
                PRIx64 ")", path, info.model_hash, model_hash);
    if (info.job_hash != job_hash)
        LV_FAIL(LV_ERR_FORMAT, "%s: checkpoint of another job (hash %016" PRIx64 ", this job %016"
                PRIx64 ")", path, info.job_hash, job_hash);
    *layer = info.layer;
done:
    if (st != LV_OK) lv_qblock_free(b);
    return st;
}

lv_status io_qblock_inspect(const char *path, io_qblock_info *info)
{
    lv_status st = LV_OK;
    lv_qblock b;
    LV_TRY(qblock_load(path, NULL, &b, info));
    lv_qblock_free(&b);
done:
    return st;
}

/* FNV-1a over the bytes of every array of the block, in file order. */
static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

uint64_t io_qblock_checksum(const lv_qblock *b)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    /* dim is not stored in the block: both norms have the length of wq's d_in */
    size_t dim = (size_t)b->lin[LV_LIN_WQ].d_in;
    h = fnv(h, b->attn_norm, dim * sizeof(float));
    h = fnv(h, b->ffn_norm, dim * sizeof(float));
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        h = fnv(h, L->codes, (size_t)(L->d_out * L->n_groups * L->M) * sizeof(uint16_t));
        h = fnv(h, L->codebooks, ((size_t)L->M << L->nbits) * (size_t)L->g * sizeof(float));
        h = fnv(h, L->scales, (size_t)L->d_out * sizeof(float));
        h = fnv(h, &b->rel_err[k], sizeof(double));
    }
    h = fnv(h, &b->block_mse, sizeof(double));
    /* Outlier columns only when present: blocks without them keep their old checksums. */
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        if (L->n_outl <= 0) continue;
        const int64_t tag[2] = {1000 + k, L->n_outl};
        h = fnv(h, tag, sizeof tag);
        h = fnv(h, L->outl_idx, (size_t)L->n_outl * sizeof(int32_t));
        h = fnv(h, L->outl_w, (size_t)(L->d_out * L->n_outl) * sizeof(float));
    }
    /* Adapters only when present: blocks without them keep their old checksums. */
    if (b->lora_rank > 0) {
        const int64_t r = b->lora_rank;
        h = fnv(h, &r, sizeof r);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &b->lin[k];
            if (!b->lora_A[k] || !b->lora_B[k]) continue;
            const unsigned char tag = (unsigned char)k;
            h = fnv(h, &tag, 1);
            h = fnv(h, b->lora_A[k], (size_t)(r * L->d_in) * sizeof(float));
            h = fnv(h, b->lora_B[k], (size_t)(L->d_out * r) * sizeof(float));
        }
    }
    return h;
}

/* The model file's checksum: FNV-1a over the embeddings, final norm and
 * classifier, then every block's checksum in order. */
static uint64_t qmodel_checksum(const lv_qmodel *q)
{
    const lv_model_config *c = &q->cfg;
    const size_t emb = (size_t)c->vocab_size * (size_t)c->dim * sizeof(float);
    uint64_t h = fnv(0xcbf29ce484222325ULL, q->tok_emb, emb);
    h = fnv(h, q->final_norm, (size_t)c->dim * sizeof(float));
    if (!c->tied_cls) h = fnv(h, q->wcls, emb);
    for (int l = 0; l < c->n_layers; l++) {
        uint64_t b = io_qblock_checksum(&q->blocks[l]);
        h = fnv(h, &b, sizeof b);
    }
    return h;
}

/* ---------------- dequantized FP view ---------------- */

lv_status io_qmodel_dequant_linear(const lv_aq_layer *L, float *W)
{
    lv_status st = LV_OK;
    if (!L->codes || !W) LV_FAIL(LV_ERR_INVALID_ARG, "dequant: empty layer");
    kern_aq_dequant_ref(W, L->codes, L->codebooks, L->scales, L->d_out, L->d_in, L->n_groups,
                        L->M, 1 << L->nbits, L->g);
    lv_aq_outliers_add_w(L, W);
done:
    return st;
}

/* W (d_out, d_in) += B (d_out, r) A (r, d_in): each element summed over t in
 * order in float, the same for any number of threads. */
static void add_lora(float *W, const float *A, const float *B, int64_t d_out, int64_t d_in,
                     int64_t r)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < d_out; i++)
        for (int64_t j = 0; j < d_in; j++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < r; t++) acc += B[i * r + t] * A[t * d_in + j];
            W[i * d_in + j] += acc;
        }
}

/* W = dequantized linear k of b, plus its adapter when apply_lora and present. */
static lv_status block_linear_fp(const lv_qblock *b, int k, int apply_lora, float *W)
{
    lv_status st = LV_OK;
    const lv_aq_layer *L = &b->lin[k];
    LV_TRY(io_qmodel_dequant_linear(L, W));
    if (apply_lora && b->lora_rank > 0 && b->lora_A[k] && b->lora_B[k])
        add_lora(W, b->lora_A[k], b->lora_B[k], L->d_out, L->d_in, b->lora_rank);
done:
    return st;
}

lv_status io_qmodel_to_fp(const lv_qmodel *q, lv_model **out)
{
    return io_qmodel_to_fp_opts(q, 1, out);
}

lv_status io_qmodel_to_fp_opts(const lv_qmodel *q, int apply_lora, lv_model **out)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    const lv_model_config *c = &q->cfg;
    const size_t emb = (size_t)c->vocab_size * (size_t)c->dim, dim = (size_t)c->dim;
    *out = NULL;
    LV_TRY(io_model_alloc(&m, c));
    size_t per_layer = 2 * dim, total;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        per_layer += (size_t)(o * i);
    }
    total = emb * (c->tied_cls ? 1 : 2) + dim + per_layer * (size_t)c->n_layers;
    float *a = NULL;
    LV_ALLOC(a, total);
    m->storage->arena = a;
    m->storage->arena_floats = total;
    memcpy(a, q->tok_emb, emb * sizeof(float));
    m->tok_emb = a;
    a += emb;
    memcpy(a, q->final_norm, dim * sizeof(float));
    m->final_norm = a;
    a += dim;
    if (c->tied_cls) {
        m->wcls = m->tok_emb;
    } else {
        memcpy(a, q->wcls, emb * sizeof(float));
        m->wcls = a;
        a += emb;
    }
    for (int l = 0; l < c->n_layers; l++) {
        const lv_qblock *b = &q->blocks[l];
        lv_layer *ly = &m->layers[l];
        memcpy(a, b->attn_norm, dim * sizeof(float));
        ly->attn_norm = a;
        a += dim;
        memcpy(a, b->ffn_norm, dim * sizeof(float));
        ly->ffn_norm = a;
        a += dim;
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &b->lin[k];
            LV_TRY(block_linear_fp(b, k, apply_lora, a));
            *lv_layer_slot(ly, (lv_lin)k) = a;
            a += (size_t)(L->d_out * L->d_in);
        }
    }
    *out = m;
    m = NULL;
done:
    io_model_free(m);
    return st;
}

lv_status io_model_open_qh5(lv_model **out, const char *path)
{
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    *out = NULL;
    LV_TRY(io_qmodel_read(&q, path));
    LV_TRY(io_qmodel_to_fp(q, out));
done:
    lv_qmodel_free(q);
    return st;
}

lv_status io_qblock_fp_view(const lv_model *fp, int layer, const lv_qblock *b, float *w,
                            lv_layer *layers, lv_model *view)
{
    lv_status st = LV_OK;
    *view = *fp;
    memcpy(layers, fp->layers, sizeof(lv_layer) * (size_t)fp->cfg.n_layers);
    view->layers = layers;
    view->storage = NULL;
    lv_layer *L = &layers[layer];
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        LV_TRY(block_linear_fp(b, k, 1, w));
        *lv_layer_slot(L, (lv_lin)k) = w;
        w += b->lin[k].d_out * b->lin[k].d_in;
    }
    L->attn_norm = b->attn_norm;
    L->ffn_norm = b->ffn_norm;
done:
    return st;
}
