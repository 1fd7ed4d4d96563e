/* test_tokenizer.c: tokenizer.bin parsing, the fast BPE encoder against a plain
 * O(n^2) reimplementation of llama2.c's encode, decode round trips, token files
 * and io_data_tokens, including their error paths. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "io.h"
#include "lv.h"

static char g_dir[256]; /* scratch directory of this run */

/* ------------------------------------------------------------------ paths */

static int data_path(char *buf, size_t cap, const char *env, const char *rel)
{
    const char *base = getenv(env);
    if (!base) return 0;
    snprintf(buf, cap, "%s/%s", base, rel);
    return access(buf, R_OK) == 0;
}

static void tmp_path(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", g_dir, name);
}

static void write_bytes(const char *path, const void *d, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(d, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* The first line of the last error must contain every given fragment. */
static void assert_error_has(const char *a, const char *b)
{
    char line[1024];
    lv_last_error_line(line, sizeof line);
    if (!strstr(line, a) || (b && !strstr(line, b)))
        fail_msg("error \"%s\" lacks \"%s\" / \"%s\"", line, a, b ? b : "");
}

/* ------------------------------------------------- reference encoder (run.c) */

typedef struct {
    int n;
    char **str;  /* NUL-terminated pieces */
    float *score;
    int *sorted; /* ids sorted by strcmp of their piece */
} ref_vocab;

static const ref_vocab *g_sort_vocab;

static int ref_cmp_ids(const void *a, const void *b)
{
    return strcmp(g_sort_vocab->str[*(const int *)a], g_sort_vocab->str[*(const int *)b]);
}

static void ref_vocab_load(ref_vocab *v, const char *path, int n)
{
    char *buf;
    size_t size;
    assert_int_equal(io_read_file(path, &buf, &size), LV_OK);
    v->n = n;
    v->str = calloc((size_t)n, sizeof *v->str);
    v->score = calloc((size_t)n, sizeof *v->score);
    v->sorted = calloc((size_t)n, sizeof *v->sorted);
    size_t off = 4;
    for (int i = 0; i < n; i++) {
        int32_t len;
        memcpy(&v->score[i], buf + off, 4);
        memcpy(&len, buf + off + 4, 4);
        off += 8;
        v->str[i] = calloc((size_t)len + 1, 1);
        memcpy(v->str[i], buf + off, (size_t)len);
        off += (size_t)len;
        v->sorted[i] = i;
    }
    free(buf);
    g_sort_vocab = v;
    qsort(v->sorted, (size_t)n, sizeof *v->sorted, ref_cmp_ids);
}

static void ref_vocab_free(ref_vocab *v)
{
    for (int i = 0; i < v->n; i++) free(v->str[i]);
    free(v->str);
    free(v->score);
    free(v->sorted);
}

static int ref_lookup(const ref_vocab *v, const char *s)
{
    int lo = 0, hi = v->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(s, v->str[v->sorted[mid]]);
        if (c == 0) return v->sorted[mid];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return -1;
}

/* Straight from the algorithm's description: text is NUL-free. */
static int ref_encode(const ref_vocab *v, const char *text, size_t n, int bos, int eos, int32_t *out)
{
    int k = 0;
    if (bos) out[k++] = 1;
    if (n) out[k++] = ref_lookup(v, " ");
    char cp[8];
    int cl = 0;
    for (size_t i = 0; i < n; i++) {
        if (((unsigned char)text[i] & 0xC0) != 0x80) cl = 0;
        cp[cl++] = text[i];
        cp[cl] = '\0';
        if (i + 1 < n && ((unsigned char)text[i + 1] & 0xC0) == 0x80 && cl < 4) continue;
        int id = ref_lookup(v, cp);
        if (id >= 0) out[k++] = id;
        else
            for (int j = 0; j < cl; j++) out[k++] = (unsigned char)cp[j] + 3;
        cl = 0;
    }
    char buf[256];
    for (;;) {
        float best = -1e10f;
        int best_i = -1, best_id = -1;
        for (int i = 0; i + 1 < k; i++) {
            snprintf(buf, sizeof buf, "%s%s", v->str[out[i]], v->str[out[i + 1]]);
            int id = ref_lookup(v, buf);
            if (id >= 0 && v->score[id] > best) {
                best = v->score[id];
                best_i = i;
                best_id = id;
            }
        }
        if (best_i < 0) break;
        out[best_i] = best_id;
        memmove(out + best_i + 1, out + best_i + 2, (size_t)(k - best_i - 2) * sizeof *out);
        k--;
    }
    if (eos) out[k++] = 2;
    return k;
}

/* Encode with both and require identical tokens. */
static void check_same(const io_tokenizer *t, const ref_vocab *v, const char *text, size_t n,
                       int bos, int eos)
{
    int32_t *ref = malloc((n + 3) * sizeof *ref);
    int nr = ref_encode(v, text, n, bos, eos, ref);
    int32_t *got = NULL;
    int64_t ng = 0;
    assert_int_equal(io_tokenizer_encode(t, text, n, bos, eos, &got, &ng), LV_OK);
    if (ng != nr) fail_msg("token count %lld vs reference %d (text of %zu bytes)", (long long)ng, nr, n);
    for (int i = 0; i < nr; i++)
        if (got[i] != ref[i]) fail_msg("token %d: %d vs reference %d", i, got[i], ref[i]);
    free(got);
    free(ref);
}

/* Random text: ASCII words, spaces, newlines, multi-byte UTF-8, stray and
 * invalid bytes (never NUL, which llama2.c's C-string encode cannot see). */
static size_t random_text(lv_rng *r, char *buf, size_t max)
{
    static const char *const parts[] = {
        "the", " the", "Once upon a time", " Lily", "ball", ".", ",", " ", "  ", "   ", "\n",
        "\n\n", "é", "ü", "→", "日本", "😀", "â€œ", "\xe2\x80", "\x80", "\xff", "\xc3",
        "\x80\x80\x80\x80\x80", "abc", "xyz", "Q", "!", "'s", "0123", "\t"};
    size_t n = 0, np = sizeof parts / sizeof *parts;
    size_t target = (size_t)(lv_rng_u64(r) % max);
    while (n < target) {
        const char *p;
        char one[2] = {0};
        if (lv_rng_uniform(r) < 0.4f) {
            one[0] = (char)(' ' + lv_rng_u64(r) % 95);
            p = one;
        } else {
            p = parts[lv_rng_u64(r) % np];
        }
        size_t l = strlen(p);
        if (n + l > max) break;
        memcpy(buf + n, p, l);
        n += l;
    }
    return n;
}

typedef struct {
    const char *env, *rel;
    int vocab;
} tok_src;

static const tok_src k_tok512 = {"LLMVQ_DEMO_DIR", "tok512.bin", 512};
static const tok_src k_llama2 = {"LLMVQ_SHARED_DATA", "tokenizers/llama2/tokenizer.bin", 32000};

static int open_both(const tok_src *s, io_tokenizer **t, ref_vocab *v)
{
    char path[1024];
    if (!data_path(path, sizeof path, s->env, s->rel)) {
        printf("  (skipped: %s/%s not found)\n", s->env, s->rel);
        return 0;
    }
    assert_int_equal(io_tokenizer_open(t, path, s->vocab), LV_OK);
    assert_int_equal(io_tokenizer_vocab_size(*t), s->vocab);
    ref_vocab_load(v, path, s->vocab);
    return 1;
}

static void random_vs_reference(const tok_src *s)
{
    io_tokenizer *t = NULL;
    ref_vocab v;
    if (!open_both(s, &t, &v)) return;
    lv_rng r;
    lv_rng_seed(&r, 20240601);
    char buf[600];
    for (int it = 0; it < 400; it++) {
        size_t n = random_text(&r, buf, sizeof buf);
        check_same(t, &v, buf, n, it & 1, (it >> 1) & 1);
    }
    check_same(t, &v, "", 0, 1, 1);
    check_same(t, &v, "", 0, 0, 0);
    check_same(t, &v, " ", 1, 1, 0);
    io_tokenizer_free(t);
    ref_vocab_free(&v);
}

static void test_random_tok512(void **state) { (void)state; random_vs_reference(&k_tok512); }
static void test_random_llama2(void **state) { (void)state; random_vs_reference(&k_llama2); }

/* The first `prefix` bytes of a real text through both encoders. */
static void text_vs_reference(const tok_src *s, const char *rel, size_t prefix)
{
    char path[1024];
    if (!data_path(path, sizeof path, "LLMVQ_SHARED_DATA", rel)) {
        printf("  (skipped: %s not found)\n", rel);
        return;
    }
    io_tokenizer *t = NULL;
    ref_vocab v;
    if (!open_both(s, &t, &v)) return;
    char *text;
    size_t n;
    assert_int_equal(io_read_file(path, &text, &n), LV_OK);
    if (n > prefix) n = prefix;
    check_same(t, &v, text, n, 1, 0);
    free(text);
    io_tokenizer_free(t);
    ref_vocab_free(&v);
}

static void test_text_vs_reference(void **state)
{
    (void)state;
    text_vs_reference(&k_tok512, "eval/tinystories/tinystories_val_subset.txt", 2500);
    text_vs_reference(&k_llama2, "eval/tinystories/tinystories_val_subset.txt", 2500);
    text_vs_reference(&k_llama2, "eval/wikitext-2-raw/wiki.test.lf.raw", 2000);
}

/* Concatenated decode after BOS gives back the text. */
static void assert_round_trip(const io_tokenizer *t, const char *text, size_t n)
{
    int32_t *tk = NULL;
    int64_t nt = 0;
    assert_int_equal(io_tokenizer_encode(t, text, n, 1, 0, &tk, &nt), LV_OK);
    assert_true(nt >= 1 && tk[0] == 1);
    char *back = malloc(n + 1);
    size_t k = 0;
    for (int64_t i = 1; i < nt; i++) {
        const char *p = io_tokenizer_decode(t, tk[i - 1], tk[i]);
        size_t l = strlen(p);
        assert_true(k + l <= n);
        memcpy(back + k, p, l);
        k += l;
    }
    assert_int_equal(k, n);
    assert_memory_equal(back, text, n);
    free(back);
    free(tk);
}

/* The whole TinyStories text: speed, round trip, decode details. */
static void test_whole_text(void **state)
{
    (void)state;
    char tpath[1024], path[1024];
    if (!data_path(tpath, sizeof tpath, "LLMVQ_DEMO_DIR", "tok512.bin") ||
        !data_path(path, sizeof path, "LLMVQ_SHARED_DATA",
                   "eval/tinystories/tinystories_val_subset.txt")) {
        printf("  (skipped: data not found)\n");
        return;
    }
    io_tokenizer *t = NULL;
    assert_int_equal(io_tokenizer_open(&t, tpath, 512), LV_OK);
    char *text;
    size_t n;
    assert_int_equal(io_read_file(path, &text, &n), LV_OK);
    int32_t *tk = NULL;
    int64_t nt = 0;
    double t0 = lv_now();
    assert_int_equal(io_tokenizer_encode(t, text, n, 1, 0, &tk, &nt), LV_OK);
    double dt = lv_now() - t0;
    printf("  encode %zu bytes -> %lld tokens in %.3f s (%.2f MB/s)\n", n, (long long)nt, dt,
           n / dt / 1e6);
    assert_true(nt > (int64_t)(n / 8) && nt < (int64_t)n);
    assert_true(dt < 5.0);
    assert_round_trip(t, text, n);
    /* "<0x0A>"-style pieces decode to their byte; the space after BOS is stripped. */
    assert_string_equal(io_tokenizer_decode(t, 5, 13), "\n");
    assert_string_equal(io_tokenizer_decode(t, 5, 3 + 0xE2), "\xE2");
    int32_t *one = NULL;
    int64_t n1 = 0;
    assert_int_equal(io_tokenizer_encode(t, "Once", 4, 1, 1, &one, &n1), LV_OK);
    assert_true(n1 >= 3 && one[0] == 1 && one[n1 - 1] == 2);
    assert_int_equal(io_tokenizer_decode(t, 1, one[1])[0], 'O');
    assert_int_equal(io_tokenizer_decode(t, 5, one[1])[0], ' ');
    assert_string_equal(io_tokenizer_decode(t, 0, 99999), "");
    free(one);
    free(tk);
    free(text);
    io_tokenizer_free(t);
}

static void test_round_trip_random_ascii(void **state)
{
    (void)state;
    char tpath[1024];
    if (!data_path(tpath, sizeof tpath, "LLMVQ_DEMO_DIR", "tok512.bin")) return;
    io_tokenizer *t = NULL;
    assert_int_equal(io_tokenizer_open(&t, tpath, 512), LV_OK);
    lv_rng r;
    lv_rng_seed(&r, 99);
    char buf[300];
    for (int it = 0; it < 300; it++) {
        size_t n = (size_t)(lv_rng_u64(&r) % sizeof buf);
        for (size_t i = 0; i < n; i++) buf[i] = (char)(lv_rng_uniform(&r) < 0.1f ? '\n' : ' ' + lv_rng_u64(&r) % 95);
        assert_round_trip(t, buf, n);
    }
    io_tokenizer_free(t);
}

/* ------------------------------------------------------- bad tokenizer files */

static void put_i32(unsigned char *p, int32_t v) { memcpy(p, &v, 4); }

static void test_bad_tokenizer(void **state)
{
    (void)state;
    char src[1024], bad[1024];
    if (!data_path(src, sizeof src, "LLMVQ_DEMO_DIR", "tok512.bin")) return;
    char *d;
    size_t n;
    assert_int_equal(io_read_file(src, &d, &n), LV_OK);
    io_tokenizer *t = NULL;
    tmp_path(bad, sizeof bad, "bad_tok.bin");

    write_bytes(bad, d, n - 3); /* truncated inside the last piece */
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_null(t);
    assert_error_has(bad, "truncated");
    write_bytes(bad, d, 2);
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_error_has(bad, "truncated");
    /* a vocab_size larger than the file holds */
    assert_int_equal(io_tokenizer_open(&t, src, 600), LV_ERR_FORMAT);
    assert_error_has(src, "vocab_size 600");

    unsigned char *m = malloc(n);
    memcpy(m, d, n);
    put_i32(m + 4 + 4, -5); /* token 0: negative length */
    write_bytes(bad, m, n);
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_error_has(bad, "token 0 has length -5");
    memcpy(m, d, n);
    put_i32(m + 4 + 4, 1 << 30); /* token 0: garbage length */
    write_bytes(bad, m, n);
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_error_has(bad, "has length 1073741824");
    memcpy(m, d, n);
    put_i32(m, 0); /* max_token_length */
    write_bytes(bad, m, n);
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_error_has(bad, "max_token_length 0");
    write_bytes(bad, "", 0);
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_FORMAT);
    assert_error_has(bad, "truncated");

    tmp_path(bad, sizeof bad, "no_such_tokenizer.bin");
    assert_int_equal(io_tokenizer_open(&t, bad, 512), LV_ERR_IO);
    assert_error_has(bad, "cannot open");
    assert_int_equal(io_tokenizer_open(&t, src, 100), LV_ERR_INVALID_ARG);

    /* Trailing bytes are allowed: a prefix vocabulary, or extra data. */
    assert_int_equal(io_tokenizer_open(&t, src, 300), LV_OK);
    assert_int_equal(io_tokenizer_vocab_size(t), 300);
    io_tokenizer_free(t);
    io_tokenizer_free(NULL);
    free(m);
    free(d);
}

/* ------------------------------------------------------------- token files */

static void round_trip_tokens(int vocab, uint32_t want_bpt)
{
    char path[1024];
    tmp_path(path, sizeof path, "rt.tok");
    lv_rng r;
    lv_rng_seed(&r, (uint64_t)vocab);
    const int64_t n = 10007;
    int32_t *tk = malloc(n * sizeof *tk);
    for (int64_t i = 0; i < n; i++) tk[i] = (int32_t)(lv_rng_u64(&r) % (uint64_t)vocab);
    tk[0] = vocab - 1;
    tk[1] = 0;
    assert_int_equal(io_tokens_write(path, tk, n, vocab), LV_OK);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_size, 32 + n * (int64_t)want_bpt);
    int32_t *back = NULL;
    int64_t nb = 0;
    int vb = 0;
    assert_int_equal(io_tokens_read(path, &back, &nb, &vb), LV_OK);
    assert_int_equal(nb, n);
    assert_int_equal(vb, vocab);
    assert_memory_equal(back, tk, n * sizeof *tk);
    free(back);
    free(tk);
}

static void test_tokens_round_trip(void **state)
{
    (void)state;
    round_trip_tokens(512, 2);
    round_trip_tokens(65536, 2);
    round_trip_tokens(100000, 4);
    char path[1024];
    tmp_path(path, sizeof path, "empty.tok");
    assert_int_equal(io_tokens_write(path, NULL, 0, 512), LV_OK);
    int32_t *back = NULL;
    int64_t nb = -1;
    int vb = 0;
    assert_int_equal(io_tokens_read(path, &back, &nb, &vb), LV_OK);
    assert_int_equal(nb, 0);
    free(back);
    int32_t bad_ids[2] = {3, 512};
    assert_int_equal(io_tokens_write(path, bad_ids, 2, 512), LV_ERR_FORMAT);
    assert_error_has(path, "id 512");
}

static void make_header(unsigned char *h, uint32_t version, uint32_t bpt, uint64_t n, uint32_t vocab)
{
    memset(h, 0, 32);
    memcpy(h, "LVQTOK01", 8);
    memcpy(h + 8, &version, 4);
    memcpy(h + 12, &bpt, 4);
    memcpy(h + 16, &n, 8);
    memcpy(h + 24, &vocab, 4);
}

static void expect_bad_tokens(const char *path, const void *d, size_t n, const char *what)
{
    write_bytes(path, d, n);
    int32_t *tk = NULL;
    int64_t nt = 0;
    int v = 0;
    assert_int_equal(io_tokens_read(path, &tk, &nt, &v), LV_ERR_FORMAT);
    assert_null(tk);
    assert_error_has(path, what);
}

static void test_tokens_bad(void **state)
{
    (void)state;
    char path[1024];
    tmp_path(path, sizeof path, "bad.tok");
    unsigned char f[32 + 8];
    uint16_t ids[4] = {1, 5, 9, 3};
    make_header(f, 1, 2, 4, 10);
    memcpy(f + 32, ids, sizeof ids);
    write_bytes(path, f, sizeof f);
    int32_t *tk = NULL;
    int64_t nt = 0;
    int v = 0;
    assert_int_equal(io_tokens_read(path, &tk, &nt, &v), LV_OK); /* the good one */
    assert_int_equal(nt, 4);
    assert_int_equal(tk[2], 9);
    free(tk);

    expect_bad_tokens(path, f, sizeof f - 2, "header says 4 tokens");
    expect_bad_tokens(path, f, 20, "truncated token file header");
    make_header(f, 1, 2, 5, 10);
    expect_bad_tokens(path, f, sizeof f, "header says 5 tokens");
    make_header(f, 1, 2, 4, 9); /* id 9 >= vocab 9 */
    expect_bad_tokens(path, f, sizeof f, "id 9 >= vocab_size 9");
    make_header(f, 2, 2, 4, 10);
    expect_bad_tokens(path, f, sizeof f, "version 2 is not supported");
    make_header(f, 1, 3, 4, 10);
    expect_bad_tokens(path, f, sizeof f, "bytes_per_token 3");
    make_header(f, 1, 2, 4, 10);
    f[0] = 'X';
    expect_bad_tokens(path, f, sizeof f, "not a token file");
}

static void test_data_tokens(void **state)
{
    (void)state;
    char tpath[1024], path[1024];
    if (!data_path(tpath, sizeof tpath, "LLMVQ_DEMO_DIR", "tok512.bin")) return;
    io_tokenizer *t = NULL;
    assert_int_equal(io_tokenizer_open(&t, tpath, 512), LV_OK);
    int32_t *a = NULL, *b = NULL;
    int64_t na = 0, nb = 0;
    const char *text = "Once upon a time, there was a cat.\n";
    tmp_path(path, sizeof path, "data.txt");
    write_bytes(path, text, strlen(text));
    assert_int_equal(io_data_tokens(path, t, 512, &a, &na), LV_OK);
    assert_true(na > 3 && a[0] == 1 && a[na - 1] != 2);
    tmp_path(path, sizeof path, "data.tok");
    assert_int_equal(io_tokens_write(path, a, na, 512), LV_OK);
    assert_int_equal(io_data_tokens(path, NULL, 512, &b, &nb), LV_OK); /* by magic */
    assert_int_equal(nb, na);
    assert_memory_equal(a, b, na * sizeof *a);
    free(b);
    b = NULL;
    /* ids beyond a smaller model vocabulary */
    assert_int_equal(io_data_tokens(path, NULL, 10, &b, &nb), LV_ERR_FORMAT);
    assert_null(b);
    assert_error_has(path, "outside the vocabulary");

    tmp_path(path, sizeof path, "empty.txt");
    write_bytes(path, "", 0);
    assert_int_equal(io_data_tokens(path, t, 512, &b, &nb), LV_ERR_FORMAT);
    char want[1100];
    snprintf(want, sizeof want, "%s: empty data file", path);
    assert_error_has(want, NULL);
    tmp_path(path, sizeof path, "missing.txt");
    assert_int_equal(io_data_tokens(path, t, 512, &b, &nb), LV_ERR_IO);
    assert_error_has(path, "cannot open");
    assert_int_equal(io_data_tokens(g_dir, t, 512, &b, &nb), LV_ERR_IO);
    assert_error_has(g_dir, "not a regular file");
    tmp_path(path, sizeof path, "data.txt");
    assert_int_equal(io_data_tokens(path, NULL, 512, &b, &nb), LV_ERR_INVALID_ARG);
    assert_error_has(path, "tokenizer is needed");
    free(a);
    io_tokenizer_free(t);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/llmvq_test_tok.XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    static const char *const names[] = {"bad_tok.bin", "rt.tok", "empty.tok", "bad.tok",
                                        "data.txt", "data.tok", "empty.txt"};
    char p[1024];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        tmp_path(p, sizeof p, names[i]);
        remove(p);
    }
    return rmdir(g_dir);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_tok512),
        cmocka_unit_test(test_random_llama2),
        cmocka_unit_test(test_text_vs_reference),
        cmocka_unit_test(test_whole_text),
        cmocka_unit_test(test_round_trip_random_ascii),
        cmocka_unit_test(test_bad_tokenizer),
        cmocka_unit_test(test_tokens_round_trip),
        cmocka_unit_test(test_tokens_bad),
        cmocka_unit_test(test_data_tokens),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
