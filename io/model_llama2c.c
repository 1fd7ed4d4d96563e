/* model_llama2c.c: llama2.c legacy v0 checkpoints (.bin), read by memory map.
 *
 * Layout (docs/formats-models.md): 7 x int32 header, then float32 arrays in the
 * io_tensor_list order, with the legacy freq_cis_real/imag arrays
 * (seq_len, head_dim/2) each between the final norm and the optional classifier.
 * Tensors point into the map: nothing is copied. */
#include <stdlib.h>
#include <string.h>

#include "io_impl.h"

static int32_t rd_i32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    int32_t v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Header -> config; the sign of vocab_size says whether the classifier is shared. */
static lv_status l2c_header(lv_model_config *c, const unsigned char *p, size_t size,
                            const char *path)
{
    lv_status st = LV_OK;
    if (size < IO_LLAMA2C_HEADER_BYTES)
        LV_FAIL(LV_ERR_FORMAT, "%s: file is %zu bytes, too small for the 28-byte llama2.c header",
                path, size);
    int32_t h[7];
    for (int i = 0; i < 7; i++) h[i] = rd_i32(p + 4 * i);
    if (h[5] == INT32_MIN)
        LV_FAIL(LV_ERR_FORMAT, "%s: vocab_size %d is out of range", path, (int)h[5]);
    *c = (lv_model_config){.dim = h[0],
                           .hidden_dim = h[1],
                           .n_layers = h[2],
                           .n_heads = h[3],
                           .n_kv_heads = h[4],
                           .vocab_size = h[5] < 0 ? -h[5] : h[5],
                           .seq_len = h[6],
                           .norm_eps = 1e-5f,
                           .rope_theta = 10000.0f,
                           .rope = LV_ROPE_INTERLEAVED,
                           .tied_cls = h[5] > 0};
    LV_TRY(io_config_check(c, path));
done:
    return st;
}

/* Floats in the legacy freq_cis_real + freq_cis_imag arrays together. */
static int64_t l2c_freq_floats(const lv_model_config *c)
{
    return 2 * (int64_t)c->seq_len * (lv_cfg_head_dim(c) / 2);
}

lv_status io_llama2c_bind(lv_model **out, const void *buf, size_t size, const char *path)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    io_tensor_ref *refs = NULL;
    lv_model_config c;
    *out = NULL;
    LV_TRY(l2c_header(&c, buf, size, path));
    int n = io_tensor_count(&c);
    LV_ALLOC(refs, n);
    io_tensor_list(&c, refs, IO_NAMES_LLAMA2C);
    /* The IO_MAX_* limits keep every sum below 2^60: no overflow in int64. */
    int64_t floats = l2c_freq_floats(&c);
    for (int i = 0; i < n; i++) floats += io_tensor_numel(&refs[i]);
    /* Stacked per-layer arrays: the table lists layer by layer, the file kind by kind. */
    int64_t expected = IO_LLAMA2C_HEADER_BYTES + 4 * floats;
    if ((uint64_t)expected != (uint64_t)size)
        LV_FAIL(LV_ERR_FORMAT,
                "%s: file is %zu bytes but its header (dim=%d hidden_dim=%d n_layers=%d "
                "n_heads=%d n_kv_heads=%d vocab_size=%d seq_len=%d) implies %lld bytes",
                path, size, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                c.tied_cls ? c.vocab_size : -c.vocab_size, c.seq_len, (long long)expected);
    LV_TRY(io_model_alloc(&m, &c));
    const float *p = (const float *)((const unsigned char *)buf + IO_LLAMA2C_HEADER_BYTES);
    m->tok_emb = p;
    p += (int64_t)c.vocab_size * c.dim;
    /* refs[1..9] are layer 0's tensors in file order; each kind is stacked over layers. */
    for (int k = 1; k <= 9; k++) {
        int64_t per_layer = io_tensor_numel(&refs[k]);
        for (int l = 0; l < c.n_layers; l++)
            *io_model_slot(m, refs[k].kind, l) = p + (int64_t)l * per_layer;
        p += per_layer * c.n_layers;
    }
    m->final_norm = p;
    p += c.dim + l2c_freq_floats(&c);
    m->wcls = c.tied_cls ? m->tok_emb : p;
    LV_TRY(io_model_check_finite(m, path, IO_NAMES_LLAMA2C));
    *out = m;
    m = NULL;
done:
    free(refs);
    io_model_free(m);
    return st;
}

lv_status io_model_open_llama2c(lv_model **out, const char *path)
{
    lv_status st = LV_OK;
    io_map map = {0};
    lv_model *m = NULL;
    if (!out || !path) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_open_llama2c: NULL argument");
    *out = NULL;
    LV_TRY(io_map_open(&map, path));
    LV_TRY(io_llama2c_bind(&m, map.data, map.size, path));
    LV_ALLOC(m->storage->maps, 1);
    m->storage->maps[0] = map;
    m->storage->n_maps = 1;
    map = (io_map){0};
    *out = m;
    m = NULL;
done:
    io_model_free(m);
    io_map_close(&map);
    return st;
}
