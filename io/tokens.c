/* tokens.c: token files (docs/formats-tokens.md) and the tokens of a data file.
 *
 * Header, little-endian, 32 bytes:
 *   0  char[8]  magic "LVQTOK01"
 *   8  uint32   version (1)
 *  12  uint32   bytes_per_token (2 or 4)
 *  16  uint64   n_tokens
 *  24  uint32   vocab_size
 *  28  uint32   reserved (0)
 * then n_tokens unsigned little-endian integers of bytes_per_token bytes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io.h"

#define TOKF_MAGIC "LVQTOK01"
#define TOKF_VERSION 1u
#define TOKF_HEADER 32

static void tokf_put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void tokf_put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t tokf_get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t tokf_get_u64(const unsigned char *p)
{
    return (uint64_t)tokf_get_u32(p) | (uint64_t)tokf_get_u32(p + 4) << 32;
}

static lv_status tokf_check_ids(const int32_t *tokens, int64_t n, int vocab_size,
                                const char *path)
{
    lv_status st = LV_OK;
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab_size)
            LV_FAIL(LV_ERR_FORMAT, "%s: token %lld has id %d, outside the vocabulary [0, %d)", path,
                    (long long)i, (int)tokens[i], vocab_size);
done:
    return st;
}

/* Writes to PATH.tmp.PID and renames it into place, so a reader never sees a
 * half-written file. */
lv_status io_tokens_write(const char *path, const int32_t *tokens, int64_t n, int vocab_size)
{
    lv_status st = LV_OK;
    FILE *f = NULL;
    char *tmp = NULL;
    unsigned char *buf = NULL;
    if (!path || (!tokens && n) || n < 0 || vocab_size <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "io_tokens_write: bad argument (n %lld, vocab_size %d)",
                (long long)n, vocab_size);
    LV_TRY(tokf_check_ids(tokens, n, vocab_size, path));
    uint32_t bpt = vocab_size <= 65536 ? 2u : 4u;
    unsigned char hdr[TOKF_HEADER] = {0};
    memcpy(hdr, TOKF_MAGIC, 8);
    tokf_put_u32(hdr + 8, TOKF_VERSION);
    tokf_put_u32(hdr + 12, bpt);
    tokf_put_u64(hdr + 16, (uint64_t)n);
    tokf_put_u32(hdr + 24, (uint32_t)vocab_size);
    size_t tl = strlen(path) + 32;
    LV_ALLOC(tmp, tl);
    snprintf(tmp, tl, "%s.tmp.%ld", path, (long)getpid());
    f = fopen(tmp, "wb");
    if (!f) LV_FAIL(LV_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    if (fwrite(hdr, 1, sizeof hdr, f) != sizeof hdr)
        LV_FAIL(LV_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    enum { CHUNK = 1 << 16 };
    LV_ALLOC(buf, (size_t)CHUNK * bpt);
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t m = n - i0 < CHUNK ? n - i0 : CHUNK;
        for (int64_t j = 0; j < m; j++) {
            uint32_t v = (uint32_t)tokens[i0 + j];
            for (uint32_t b = 0; b < bpt; b++) buf[j * bpt + b] = (unsigned char)(v >> (8 * b));
        }
        if (fwrite(buf, bpt, (size_t)m, f) != (size_t)m)
            LV_FAIL(LV_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0)
        LV_FAIL(LV_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    int rc = fclose(f);
    f = NULL;
    if (rc != 0) LV_FAIL(LV_ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot rename %s into place: %s", path, tmp, strerror(errno));
done:
    if (f) fclose(f);
    if (st != LV_OK && tmp) remove(tmp);
    free(buf);
    free(tmp);
    return st;
}

/* Parse a token file held in memory (d, size). */
static lv_status tokf_parse(const unsigned char *d, size_t size, const char *path,
                            int32_t **tokens, int64_t *n_out, int *vocab_out)
{
    lv_status st = LV_OK;
    int32_t *t = NULL;
    if (size < 8 || memcmp(d, TOKF_MAGIC, 8) != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: not a token file (magic \"%s\" expected)", path, TOKF_MAGIC);
    if (size < TOKF_HEADER)
        LV_FAIL(LV_ERR_FORMAT, "%s: truncated token file header (%zu of %d bytes)", path, size,
                TOKF_HEADER);
    uint32_t version = tokf_get_u32(d + 8), bpt = tokf_get_u32(d + 12);
    uint64_t n = tokf_get_u64(d + 16);
    uint32_t vocab = tokf_get_u32(d + 24), reserved = tokf_get_u32(d + 28);
    if (version != TOKF_VERSION)
        LV_FAIL(LV_ERR_FORMAT,
                "%s: token file version %u is not supported (this build reads version %u); "
                "re-create it with this llmvq", path, version, TOKF_VERSION);
    if (bpt != 2 && bpt != 4)
        LV_FAIL(LV_ERR_FORMAT, "%s: bytes_per_token %u (2 or 4 expected)", path, bpt);
    if (vocab == 0 || vocab > (uint32_t)INT32_MAX)
        LV_FAIL(LV_ERR_FORMAT, "%s: vocab_size %u out of range", path, vocab);
    if (reserved != 0) LV_FAIL(LV_ERR_FORMAT, "%s: reserved header field is %u, not 0", path, reserved);
    size_t body = size - TOKF_HEADER;
    if (body % bpt != 0 || n != body / bpt)
        LV_FAIL(LV_ERR_FORMAT,
                "%s: header says %llu tokens of %u bytes but the file holds %zu bytes of tokens "
                "(truncated or corrupt)", path, (unsigned long long)n, bpt, body);
    LV_ALLOC(t, n);
    const unsigned char *p = d + TOKF_HEADER;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t v = bpt == 2 ? (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8
                              : tokf_get_u32(p + 4 * i);
        if (v >= vocab)
            LV_FAIL(LV_ERR_FORMAT, "%s: token %llu has id %u >= vocab_size %u", path,
                    (unsigned long long)i, v, vocab);
        t[i] = (int32_t)v;
    }
    *tokens = t;
    *n_out = (int64_t)n;
    *vocab_out = (int)vocab;
    t = NULL;
done:
    free(t);
    return st;
}

lv_status io_tokens_read(const char *path, int32_t **tokens, int64_t *n, int *vocab_size)
{
    lv_status st = LV_OK;
    io_map map = {0};
    if (!path || !tokens || !n || !vocab_size)
        LV_FAIL(LV_ERR_INVALID_ARG, "io_tokens_read: NULL argument");
    *tokens = NULL;
    *n = 0;
    *vocab_size = 0;
    LV_TRY(io_map_open(&map, path));
    LV_TRY(tokf_parse(map.data, map.size, path, tokens, n, vocab_size));
done:
    io_map_close(&map);
    return st;
}

lv_status io_data_tokens(const char *path, const io_tokenizer *tok, int vocab_size,
                         int32_t **tokens, int64_t *n)
{
    lv_status st = LV_OK;
    io_map map = {0};
    int32_t *t = NULL;
    int64_t nt = 0;
    if (!path || !tokens || !n || vocab_size <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "io_data_tokens: bad argument");
    *tokens = NULL;
    *n = 0;
    LV_TRY(io_map_open(&map, path));
    if (map.size == 0) LV_FAIL(LV_ERR_FORMAT, "%s: empty data file", path);
    if (map.size >= 8 && memcmp(map.data, TOKF_MAGIC, 8) == 0) {
        int file_vocab = 0;
        LV_TRY(tokf_parse(map.data, map.size, path, &t, &nt, &file_vocab));
        if (file_vocab != vocab_size)
            lv_log("warning: %s: token file was written for vocab_size %d, the model has %d",
                   path, file_vocab, vocab_size);
    } else {
        if (!tok)
            LV_FAIL(LV_ERR_INVALID_ARG, "%s: is a text file; a tokenizer is needed to read it",
                    path);
        LV_TRY(io_tokenizer_encode(tok, map.data, map.size, 1, 0, &t, &nt));
    }
    if (nt == 0) LV_FAIL(LV_ERR_FORMAT, "%s: empty data file (no tokens)", path);
    LV_TRY(tokf_check_ids(t, nt, vocab_size, path));
    *tokens = t;
    *n = nt;
    t = NULL;
done:
    free(t);
    io_map_close(&map);
    return st;
}
