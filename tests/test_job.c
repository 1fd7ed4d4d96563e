/* test_job.c: job files: defaults, typed getters, --set, and every kind of bad
 * input rejected with a message naming the file, line and key. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "job.h"

static char g_dir[64];

static const char *write_job(const char *name, const char *text)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

static const char *good =
    "; a comment\n"
    "[model]\npath = model.bin\n"
    "[calibration]\ndata = /data/calib.txt\nnsamples = 64\n"
    "[quant]\nnum_codebooks = 2\nnbits = 8\ngroup_size = 8\ncodebook_update = lstsq\n"
    "adam_lr = 3e-4\n"
    "[output]\neval_ctx = 256\n";

static void test_good(void **state)
{
    (void)state;
    job_file *j = NULL;
    const char *path = write_job("good.ini", good);
    assert_int_equal(job_load(&j, path), LV_OK);
    assert_int_equal(job_validate(j), LV_OK);
    const char *s = NULL;
    int64_t v = 0;
    double x = 0;
    int b = -1;
    assert_int_equal(job_get_str(j, "model.path", &s), LV_OK);
    char want[256];
    snprintf(want, sizeof want, "%s/model.bin", g_dir); /* relative to the job file */
    assert_string_equal(s, want);
    assert_int_equal(job_get_str(j, "calibration.data", &s), LV_OK);
    assert_string_equal(s, "/data/calib.txt");
    assert_int_equal(job_get_int(j, "calibration.nsamples", &v), LV_OK);
    assert_int_equal(v, 64);
    assert_int_equal(job_get_int(j, "quant.beam_size", &v), LV_OK); /* default */
    assert_int_equal(v, 8);
    assert_int_equal(job_get_str(j, "quant.codebook_update", &s), LV_OK);
    assert_string_equal(s, "lstsq");
    assert_int_equal(job_get_float(j, "quant.adam_lr", &x), LV_OK);
    assert_true(x == 3e-4);
    assert_int_equal(job_get_int(j, "output.eval_ctx", &v), LV_OK);
    assert_int_equal(v, 256);
    /* wrong type / unknown key in code are errors, not crashes */
    assert_int_equal(job_get_int(j, "quant.adam_lr", &v), LV_ERR_INVALID_ARG);
    assert_int_equal(job_get_bool(j, "quant.nbits", &b), LV_ERR_INVALID_ARG);
    assert_int_equal(job_get_int(j, "quant.nope", &v), LV_ERR_INVALID_ARG);

    uint64_t h0 = job_hash(j);
    assert_int_equal(job_set(j, "output.dir=/tmp/x"), LV_OK);
    assert_int_equal(job_get_str(j, "output.dir", &s), LV_OK);
    assert_string_equal(s, "/tmp/x");
    assert_true(job_hash(j) == h0); /* where results go does not change them */
    assert_int_equal(job_set(j, "quant.beam_size=4"), LV_OK);
    assert_true(job_hash(j) != h0);
    /* [pvtune] changes the whole-job hash, not the blocks' (their checkpoints stay valid);
     * checkpoint_every changes neither (the result is bit-identical either way) */
    const uint64_t hb = job_hash_blocks(j), hf = job_hash(j);
    assert_int_equal(job_set(j, "pvtune.lr=2e-3"), LV_OK);
    assert_true(job_hash_blocks(j) == hb);
    assert_true(job_hash(j) != hf);
    const uint64_t hf2 = job_hash(j);
    assert_int_equal(job_set(j, "pvtune.checkpoint_every=7"), LV_OK);
    assert_true(job_hash(j) == hf2 && job_hash_blocks(j) == hb);
    assert_int_equal(job_set(j, "quant.nbits=99"), LV_ERR_INVALID_ARG);
    assert_non_null(strstr(lv_last_error(), "quant.nbits"));
    assert_int_equal(job_set(j, "quant.bogus=1"), LV_ERR_INVALID_ARG);
    assert_non_null(strstr(lv_last_error(), "quant.bogus"));
    assert_int_equal(job_set(j, "nodot"), LV_ERR_INVALID_ARG);
    char *canon = NULL;
    assert_int_equal(job_canonical(j, &canon), LV_OK);
    assert_non_null(strstr(canon, "[quant]\nnum_codebooks = 2\n"));
    free(canon);
    job_free(j);
}

static void expect_bad(const char *name, const char *text, const char *needle)
{
    job_file *j = NULL;
    const char *path = write_job(name, text);
    lv_status st = job_load(&j, path);
    if (st == LV_OK) st = job_validate(j);
    assert_int_not_equal(st, LV_OK);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s -> %s\n", name, line);
    assert_non_null(strstr(line, name));
    assert_non_null(strstr(line, needle));
    job_free(j);
}

static void test_bad(void **state)
{
    (void)state;
    expect_bad("unknown_key.ini", "[model]\npath = a\n[quant]\nnbitz = 4\n", "quant.nbitz");
    expect_bad("unknown_section.ini", "[modle]\npath = a\n", "[modle]");
    expect_bad("bad_int.ini", "[model]\npath=a\n[calibration]\ndata=b\nnsamples = many\n",
               "calibration.nsamples");
    expect_bad("range.ini", "[model]\npath=a\n[quant]\nnbits = 17\n", "quant.nbits");
    expect_bad("enum.ini", "[model]\npath=a\n[quant]\ncodebook_update = sgd\n", "adam|lstsq");
    expect_bad("nan.ini", "[model]\npath=a\n[quant]\nrel_tol = nan\n", "quant.rel_tol");
    expect_bad("dup.ini", "[model]\npath=a\npath=b\n", "line 3");
    expect_bad("syntax.ini", "[model\npath=a\n", "line 1");
    expect_bad("missing.ini", "[model]\npath = a\n", "calibration.data");
    expect_bad("nosection.ini", "path = a\n", "outside any");
    job_file *j = NULL;
    assert_int_equal(job_load(&j, "/nonexistent/job.ini"), LV_ERR_IO);
    assert_null(j);
}

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/llmvq-job.XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_good), cmocka_unit_test(test_bad)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
