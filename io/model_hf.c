/* model_hf.c: Hugging Face LLaMA directories: config.json + model.safetensors,
 * or model.safetensors.index.json + shards.
 *
 * Loading is two passes over the tensor table: the first finds every tensor,
 * checks dtype and shape against config.json and sums what must be converted;
 * the second fills one arena (f16/bf16, misaligned f32) and points aligned f32
 * tensors into the maps. Shards no tensor points into are unmapped at the end. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

typedef struct {
    const char *dir;      /* borrowed */
    char index_path[4096];/* "" when single-file */
    char **files;         /* (n) shard paths, owned */
    int n;
    io_st_header *hdr;    /* (n) */
    cJSON *index;         /* parsed index.json or NULL */
} hf_set;

typedef struct {
    int shard;
    const io_st_tensor *t;
} hf_loc;

static void hf_set_free(hf_set *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->files[i]);
        if (s->hdr) io_st_header_free(&s->hdr[i]);
    }
    free(s->files);
    free(s->hdr);
    cJSON_Delete(s->index);
}

static lv_status hf_add_file(hf_set *s, const char *name, const char *origin)
{
    lv_status st = LV_OK;
    for (int i = 0; i < s->n; i++) {
        const char *base = strrchr(s->files[i], '/') + 1;
        if (strcmp(base, name) == 0) goto done;
    }
    if (!*name || strchr(name, '/') || strcmp(name, "..") == 0 || strcmp(name, ".") == 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: shard name \"%.200s\" must be a plain file name", origin, name);
    char **f = realloc(s->files, (size_t)(s->n + 1) * sizeof *f);
    if (!f) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", origin);
    s->files = f;
    size_t len = strlen(s->dir) + strlen(name) + 2;
    s->files[s->n] = malloc(len);
    if (!s->files[s->n]) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", origin);
    snprintf(s->files[s->n], len, "%s/%s", s->dir, name);
    s->n++;
done:
    return st;
}

/* The shard list: from the index's weight_map, else the single model.safetensors. */
static lv_status hf_find_files(hf_set *s)
{
    lv_status st = LV_OK;
    char *text = NULL;
    size_t n = 0;
    struct stat sb;
    snprintf(s->index_path, sizeof s->index_path, "%s/model.safetensors.index.json", s->dir);
    if (stat(s->index_path, &sb) != 0) {
        s->index_path[0] = '\0';
        char single[4096];
        snprintf(single, sizeof single, "%s/model.safetensors", s->dir);
        if (stat(single, &sb) != 0)
            LV_FAIL(LV_ERR_IO, "%s: no model.safetensors or model.safetensors.index.json", s->dir);
        LV_TRY(hf_add_file(s, "model.safetensors", s->dir));
        goto done;
    }
    LV_TRY(io_read_file(s->index_path, &text, &n));
    s->index = cJSON_ParseWithLength(text, n);
    if (!s->index || !cJSON_IsObject(s->index))
        LV_FAIL(LV_ERR_FORMAT, "%s: not a valid JSON object", s->index_path);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(s->index, "weight_map");
    if (!cJSON_IsObject(wm)) LV_FAIL(LV_ERR_FORMAT, "%s: no \"weight_map\" object", s->index_path);
    const cJSON *e;
    cJSON_ArrayForEach(e, wm)
    {
        if (!cJSON_IsString(e))
            LV_FAIL(LV_ERR_FORMAT, "%s: weight_map entry %.200s is not a file name", s->index_path,
                    e->string);
        LV_TRY(hf_add_file(s, e->valuestring, s->index_path));
    }
    if (s->n == 0) LV_FAIL(LV_ERR_FORMAT, "%s: weight_map is empty", s->index_path);
done:
    free(text);
    return st;
}

/* Maps and parses every shard; the maps go to the model's storage. */
static lv_status hf_map_files(hf_set *s, lv_model_storage *sto)
{
    lv_status st = LV_OK;
    LV_ALLOC(s->hdr, s->n);
    LV_ALLOC(sto->maps, s->n);
    sto->n_maps = s->n;
    for (int i = 0; i < s->n; i++) {
        lv_status ms = io_map_open(&sto->maps[i], s->files[i]);
        if (ms != LV_OK && !s->index_path[0]) LV_TRY(ms);
        if (ms != LV_OK) {
            char why[512];
            lv_last_error_line(why, sizeof why);
            LV_FAIL(LV_ERR_IO, "%s: shard %s listed in weight_map cannot be opened (%s)",
                    s->index_path, s->files[i], why);
        }
        LV_TRY(io_st_parse(&s->hdr[i], sto->maps[i].data, sto->maps[i].size, s->files[i]));
    }
done:
    return st;
}

static lv_status hf_locate(const hf_set *s, const char *name, hf_loc *loc)
{
    lv_status st = LV_OK;
    loc->shard = 0;
    if (s->index) {
        const cJSON *wm = cJSON_GetObjectItemCaseSensitive(s->index, "weight_map");
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(wm, name);
        if (!f) LV_FAIL(LV_ERR_FORMAT, "%s: missing tensor %s (not in weight_map)", s->index_path, name);
        for (int i = 0; i < s->n; i++)
            if (strcmp(strrchr(s->files[i], '/') + 1, f->valuestring) == 0) loc->shard = i;
    }
    loc->t = io_st_find(&s->hdr[loc->shard], name);
    if (!loc->t) LV_FAIL(LV_ERR_FORMAT, "%s: missing tensor %s", s->files[loc->shard], name);
done:
    return st;
}

static lv_status hf_check_tensor(const hf_set *s, const hf_loc *loc, const io_tensor_ref *r)
{
    lv_status st = LV_OK;
    const io_st_tensor *t = loc->t;
    const char *path = s->files[loc->shard];
    if (t->dtype == IO_DT_OTHER)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: tensor %s has dtype %s; supported: F32, F16, BF16", path,
                r->name, t->dtype_name);
    int want_nd = r->cols ? 2 : 1;
    if (t->ndim != want_nd || t->shape[0] != r->rows || (r->cols && t->shape[1] != r->cols)) {
        char got[160] = "", *p = got;
        for (int i = 0; i < t->ndim; i++)
            p += snprintf(p, (size_t)(got + sizeof got - p), "%s%lld", i ? ", " : "",
                          (long long)t->shape[i]);
        if (r->cols)
            LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has shape (%s), config.json implies (%lld, %lld)",
                    path, r->name, got, (long long)r->rows, (long long)r->cols);
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has shape (%s), config.json implies (%lld)", path,
                r->name, got, (long long)r->rows);
    }
done:
    return st;
}

static int hf_in_place(const io_st_tensor *t, const io_map *map)
{
    return t->dtype == IO_DT_F32 && ((uintptr_t)map->data + t->offset) % sizeof(float) == 0;
}

/* Pass 2: point or convert every tensor, then unmap shards nothing points into. */
static lv_status hf_bind(lv_model *m, const hf_set *s, const io_tensor_ref *refs,
                         const hf_loc *locs, int n)
{
    lv_status st = LV_OK;
    lv_model_storage *sto = m->storage;
    int *used = NULL;
    LV_ALLOC(used, s->n);
    size_t need = 0;
    for (int i = 0; i < n; i++)
        if (!hf_in_place(locs[i].t, &sto->maps[locs[i].shard])) need += (size_t)locs[i].t->numel;
    if (need) {
        sto->arena = malloc(need * sizeof(float));
        if (!sto->arena)
            LV_FAIL(LV_ERR_NOMEM, "%s: out of memory converting %zu weights to float32", s->dir,
                    need);
        sto->arena_floats = need;
    }
    float *a = sto->arena;
    for (int i = 0; i < n; i++) {
        const io_map *map = &sto->maps[locs[i].shard];
        const float **slot = io_model_slot(m, refs[i].kind, refs[i].layer);
        if (hf_in_place(locs[i].t, map)) {
            *slot = (const float *)((const unsigned char *)map->data + locs[i].t->offset);
            used[locs[i].shard] = 1;
        } else {
            LV_TRY(io_st_to_f32(locs[i].t, map->data, a, s->files[locs[i].shard]));
            *slot = a;
            a += locs[i].t->numel;
        }
        LV_TRY(io_tensor_check_finite(*slot, locs[i].t->numel, s->files[locs[i].shard],
                                      refs[i].name));
    }
    for (int i = 0; i < s->n; i++)
        if (!used[i]) io_map_close(&sto->maps[i]);
done:
    free(used);
    return st;
}

static lv_status hf_load_tensors(lv_model *m, const hf_set *s)
{
    lv_status st = LV_OK;
    io_tensor_ref *refs = NULL;
    hf_loc *locs = NULL;
    int n = io_tensor_count(&m->cfg);
    LV_ALLOC(refs, n);
    LV_ALLOC(locs, n);
    io_tensor_list(&m->cfg, refs, IO_NAMES_HF);
    for (int i = 0; i < n; i++) {
        LV_TRY(hf_locate(s, refs[i].name, &locs[i]));
        LV_TRY(hf_check_tensor(s, &locs[i], &refs[i]));
    }
    LV_TRY(hf_bind(m, s, refs, locs, n));
    if (m->cfg.tied_cls) m->wcls = m->tok_emb;
done:
    free(locs);
    free(refs);
    return st;
}

lv_status io_model_open_hf(lv_model **out, const char *dir)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    hf_set s = {.dir = dir};
    if (!out || !dir) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_open_hf: NULL argument");
    *out = NULL;
    struct stat sb;
    if (stat(dir, &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) LV_FAIL(LV_ERR_IO, "%s: not a directory (HF models are directories)", dir);
    if (strlen(dir) > 3000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    lv_model_config cfg;
    LV_TRY(io_config_read_hf(&cfg, cfg_path));
    LV_TRY(io_model_alloc(&m, &cfg));
    LV_TRY(hf_find_files(&s));
    LV_TRY(hf_map_files(&s, m->storage));
    LV_TRY(hf_load_tensors(m, &s));
    *out = m;
    m = NULL;
done:
    hf_set_free(&s);
    io_model_free(m);
    return st;
}
