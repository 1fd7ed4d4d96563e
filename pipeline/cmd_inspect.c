/* cmd_inspect.c: `llmvq inspect PATH [--json]`: what a run has finished, what
 * is left, and whether every checkpoint verifies (format, shapes, values,
 * checksum), PV-tuning's state and result included. PATH is an output directory, a checkpoint directory, a model.h5 or
 * one block file. Exit 0 when everything present verifies, 1 otherwise. */
#include <dirent.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "pipe.h"

#define MAX_BLOCK_FILES 65536

static int is_dir(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int is_file(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted names of block_*.h5 in dir (malloc'd array of malloc'd strings). */
static lv_status list_blocks(const char *dir, char ***names, int *n)
{
    lv_status st = LV_OK;
    DIR *d = opendir(dir);
    char **v = NULL;
    int k = 0;
    *names = NULL;
    *n = 0;
    if (!d) LV_FAIL(LV_ERR_IO, "%s: cannot open directory", dir);
    LV_ALLOC(v, MAX_BLOCK_FILES);
    struct dirent *e;
    while ((e = readdir(d)) && k < MAX_BLOCK_FILES) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "block_", 6) || len < 10 || strcmp(e->d_name + len - 3, ".h5"))
            continue;
        v[k] = strdup(e->d_name);
        if (!v[k]) LV_FAIL(LV_ERR_NOMEM, "out of memory");
        k++;
    }
    qsort(v, (size_t)k, sizeof *v, cmp_str);
    *names = v;
    *n = k;
    v = NULL;
done:
    if (v)
        for (int i = 0; i < k; i++) free(v[i]);
    free(v);
    if (d) closedir(d);
    return st;
}

typedef struct {
    int n_ok, n_bad, n_layers;
    uint64_t job_hash;
    int mixed_jobs;
    unsigned char *have; /* (n_layers) */
} tally;

static void report_block(const char *path, const char *name, int json, cJSON *arr, tally *t)
{
    io_qblock_info info;
    char line[1024] = "";
    lv_status st = io_qblock_inspect(path, &info);
    if (st != LV_OK) lv_last_error_line(line, sizeof line);
    if (st == LV_OK) {
        t->n_ok++;
        if (t->n_ok == 1) t->job_hash = info.job_hash;
        if (info.job_hash != t->job_hash) t->mixed_jobs = 1;
        if (t->n_layers == 0) t->n_layers = info.cfg.n_layers;
        if (t->have && info.layer < t->n_layers) t->have[info.layer] = 1;
    } else {
        t->n_bad++;
    }
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "file", name);
        cJSON_AddBoolToObject(o, "ok", st == LV_OK);
        if (st == LV_OK) {
            char hex[32];
            cJSON_AddNumberToObject(o, "layer", info.layer);
            cJSON_AddNumberToObject(o, "block_mse", info.block_mse);
            snprintf(hex, sizeof hex, "%016" PRIx64, info.job_hash);
            cJSON_AddStringToObject(o, "job_hash", hex);
            snprintf(hex, sizeof hex, "%016" PRIx64, info.checksum);
            cJSON_AddStringToObject(o, "checksum", hex);
        } else {
            cJSON_AddStringToObject(o, "error", line);
        }
        cJSON_AddItemToArray(arr, o);
    } else if (st == LV_OK) {
        printf("  %s  ok       layer %3d  block rel MSE %.4g  job %016" PRIx64 "  checksum %016" PRIx64 "\n",
               name, info.layer, info.block_mse, info.job_hash, info.checksum);
    } else {
        printf("  %s  CORRUPT  %s\n", name, line);
    }
}

/* Inspect a checkpoint directory; fills t. */
static lv_status inspect_ckpt(const char *dir, int json, cJSON *root, tally *t)
{
    lv_status st = LV_OK;
    char **names = NULL;
    int n = 0;
    char path[4400];
    cJSON *arr = json ? cJSON_AddArrayToObject(root, "blocks") : NULL;
    LV_TRY(list_blocks(dir, &names, &n));
    /* the first verifying block tells how many layers the model has */
    for (int i = 0; i < n && t->n_layers == 0; i++) {
        io_qblock_info info;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (io_qblock_inspect(path, &info) == LV_OK) t->n_layers = info.cfg.n_layers;
    }
    if (t->n_layers > 0) LV_ALLOC(t->have, (size_t)t->n_layers);
    if (!json) printf("checkpoint %s: %d block file%s\n", dir, n, n == 1 ? "" : "s");
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        report_block(path, names[i], json, arr, t);
    }
done:
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return st;
}

static void print_missing(const tally *t, int json, cJSON *root)
{
    cJSON *miss = json ? cJSON_AddArrayToObject(root, "missing") : NULL;
    int n_miss = 0;
    for (int l = 0; l < t->n_layers; l++)
        if (!t->have[l]) {
            n_miss++;
            if (json) cJSON_AddItemToArray(miss, cJSON_CreateNumber(l));
        }
    if (json) {
        cJSON_AddNumberToObject(root, "n_layers", t->n_layers);
        cJSON_AddNumberToObject(root, "verified", t->n_ok);
        cJSON_AddNumberToObject(root, "corrupt", t->n_bad);
        cJSON_AddBoolToObject(root, "mixed_jobs", t->mixed_jobs);
        return;
    }
    printf("%d of %d blocks done and verified, %d corrupt, %d left", t->n_ok, t->n_layers, t->n_bad,
           n_miss);
    if (n_miss) {
        printf(" (");
        for (int l = 0, k = 0; l < t->n_layers; l++)
            if (!t->have[l]) printf("%s%d", k++ ? ", " : "", l);
        printf(")");
    }
    printf("\n");
    if (t->mixed_jobs) printf("warning: the blocks come from more than one job\n");
}

int pipe_cmd_inspect(int argc, char **argv)
{
    int json = 0, n_pos = 0;
    const char *pos[1] = {NULL};
    const pipe_opt opts[] = {{"json", PIPE_OPT_FLAG, &json, "print one JSON object"}};
    int rc = pipe_opts_parse("inspect", "PATH [--json]", opts, 1, argc, argv, pos, 1, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (n_pos != 1) {
        fprintf(stderr, "llmvq inspect: need one PATH (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    lv_status st = LV_OK;
    const char *p = pos[0];
    char ckpt[4200], model[4200];
    tally t;
    memset(&t, 0, sizeof t);
    cJSON *root = json ? cJSON_CreateObject() : NULL;
    int bad_model = 0;
    ckpt[0] = model[0] = '\0';
    if (is_dir(p)) {
        snprintf(ckpt, sizeof ckpt, "%s/checkpoint", p);
        if (!is_dir(ckpt)) snprintf(ckpt, sizeof ckpt, "%s", p);
        snprintf(model, sizeof model, "%s/model.h5", p);
        if (!is_file(model)) model[0] = '\0';
    } else if (is_file(p) && strstr(p, "block_")) {
        cJSON *arr = json ? cJSON_AddArrayToObject(root, "blocks") : NULL;
        report_block(p, p, json, arr, &t);
    } else if (is_file(p)) {
        snprintf(model, sizeof model, "%s", p);
    } else {
        LV_FAIL(LV_ERR_IO, "%s: no such file or directory", p);
    }
    if (ckpt[0]) LV_TRY(inspect_ckpt(ckpt, json, root, &t));
    if (ckpt[0] && t.have) print_missing(&t, json, root);
    if (ckpt[0]) { /* PV-tuning: the state of an interrupted run, the result */
        char sp[4400], rp[4400], line[1024] = "";
        snprintf(sp, sizeof sp, "%s/pv_state.h5", ckpt);
        snprintf(rp, sizeof rp, "%s/pvtuned.h5", ckpt);
        cJSON *o = NULL;
        if (json && (is_file(sp) || is_file(rp))) o = cJSON_AddObjectToObject(root, "pvtune");
        if (is_file(sp)) {
            pipe_pv_progress pp;
            lv_status ps = pipe_pv_state_inspect(sp, &pp);
            if (ps != LV_OK) lv_last_error_line(line, sizeof line);
            bad_model |= ps != LV_OK;
            if (json) {
                cJSON *x = cJSON_AddObjectToObject(o, "state");
                cJSON_AddBoolToObject(x, "ok", ps == LV_OK);
                if (ps == LV_OK) {
                    cJSON_AddNumberToObject(x, "epoch", (double)pp.epoch);
                    cJSON_AddNumberToObject(x, "v_steps", (double)pp.v_steps);
                    cJSON_AddNumberToObject(x, "p_steps", (double)pp.p_steps);
                    cJSON_AddNumberToObject(x, "best_heldout_loss", pp.best);
                    cJSON_AddNumberToObject(x, "heldout_loss_before", pp.loss_before);
                } else {
                    cJSON_AddStringToObject(x, "error", line);
                }
            } else if (ps == LV_OK) {
                printf("PV-tuning state pv_state.h5: ok, epoch %lld, %lld V / %lld P steps done, "
                       "held-out loss %.6g -> best %.6g (a rerun continues from here)\n",
                       (long long)pp.epoch, (long long)pp.v_steps, (long long)pp.p_steps,
                       pp.loss_before, pp.best);
            } else {
                printf("PV-tuning state pv_state.h5: CORRUPT  %s (a rerun starts PV-tuning over)\n",
                       line);
            }
        }
        if (is_file(rp)) {
            lv_qmodel *q = NULL;
            lv_status rs = io_qmodel_read(&q, rp);
            if (rs != LV_OK) lv_last_error_line(line, sizeof line);
            bad_model |= rs != LV_OK;
            if (json) {
                cJSON *x = cJSON_AddObjectToObject(o, "result");
                cJSON_AddBoolToObject(x, "ok", rs == LV_OK);
                if (rs != LV_OK) cJSON_AddStringToObject(x, "error", line);
            } else if (rs == LV_OK) {
                printf("PV-tuning result pvtuned.h5: ok\n");
            } else {
                printf("PV-tuning result pvtuned.h5: CORRUPT  %s\n", line);
            }
            lv_qmodel_free(q);
        }
    }
    if (model[0]) {
        lv_qmodel *q = NULL;
        char line[1024] = "";
        lv_status ms = io_qmodel_read(&q, model);
        if (ms != LV_OK) lv_last_error_line(line, sizeof line);
        bad_model = ms != LV_OK;
        if (json) {
            cJSON *o = cJSON_AddObjectToObject(root, "model");
            cJSON_AddStringToObject(o, "file", model);
            cJSON_AddBoolToObject(o, "ok", ms == LV_OK);
            if (ms == LV_OK) {
                cJSON_AddNumberToObject(o, "bpw_total", lv_qmodel_bits_per_weight(q));
                cJSON_AddStringToObject(o, "shared_codebooks", lv_share_name(q->shared_codebooks));
                cJSON_AddNumberToObject(o, "scale_bits", q->scale_bits == 8 ? 8 : 16);
            }
            else cJSON_AddStringToObject(o, "error", line);
        } else if (ms == LV_OK) {
            printf("model %s: ok, %d blocks, %dx%dg%d, %.3f bits per weight%s%s\n", model,
                   q->cfg.n_layers, q->M, q->nbits, q->g, lv_qmodel_bits_per_weight(q),
                   q->shared_codebooks == LV_SHARE_MODEL  ? ", one codebook shared by all linears"
                   : q->shared_codebooks == LV_SHARE_TYPE ? ", one codebook per linear type"
                                                          : "",
                   q->scale_bits == 8 ? ", 8-bit scales" : "");
        } else {
            printf("model %s: CORRUPT  %s\n", model, line);
        }
        lv_qmodel_free(q);
    }
    if (json) {
        char *s = cJSON_PrintUnformatted(root);
        if (s) printf("%s\n", s);
        free(s);
    }
done:
    cJSON_Delete(root);
    free(t.have);
    if (st != LV_OK) return pipe_report_error("inspect");
    return (t.n_bad || bad_model) ? PIPE_EXIT_ERROR : PIPE_EXIT_OK;
}
