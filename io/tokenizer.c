/* tokenizer.c: the llama2.c tokenizer.bin vocabulary, BPE encode and decode.
 *
 * File: int32 max_token_length, then vocab_size records of
 * { float32 score, int32 len, len bytes } (little-endian; vocab_size from the model).
 * Bytes after the last record are ignored, so a tokenizer can serve a model whose
 * vocabulary is a prefix of it (docs/eval.md).
 *
 * Encode gives exactly the tokens of llama2.c's encode: BOS, dummy-prefix " ",
 * UTF-8 codepoints looked up whole (else byte fallback id = byte + 3), then while
 * some adjacent pair concatenates to a vocabulary piece, merge the pair whose piece
 * has the highest score, the leftmost one on ties; then EOS. The reference rescans
 * all pairs after every merge (O(n^2)); here the candidate pairs sit in a binary
 * heap ordered by (score desc, position asc) over a doubly linked list of symbols.
 * Merges never reorder symbols, so a symbol's initial index orders positions for
 * the whole run; entries made stale by a merge are skipped when they surface. */
#include <stdlib.h>
#include <string.h>

#include "io.h"

#define TOK_BOS 1
#define TOK_EOS 2
/* llama2.c starts its best-score search at -1e10 with a strict >, so a pair whose
 * piece scores <= -1e10 (or NaN) is never merged. */
#define TOK_MIN_SCORE -1e10f
#define TOK_MAX_PIECE 65536 /* sanity bound on max_token_length */

struct io_tokenizer {
    int vocab_size;
    int max_len;          /* longest piece in bytes */
    char **piece;         /* (vocab_size) NUL-terminated, into arena */
    int32_t *len;         /* (vocab_size) */
    float *score;         /* (vocab_size) */
    char *arena;          /* all pieces, each followed by NUL */
    int32_t *hash;        /* open addressing over ids, -1 = empty */
    uint32_t hash_mask;
    char byte_piece[256][2]; /* decode of <0xXX>: the byte and a NUL */
};

static uint32_t tok_hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

/* Id of the piece equal to s[0..n), or -1. */
static int32_t tok_lookup(const io_tokenizer *t, const char *s, size_t n)
{
    if (n > (size_t)t->max_len) return -1;
    uint32_t i = tok_hash_bytes(s, n) & t->hash_mask;
    for (;;) {
        int32_t id = t->hash[i];
        if (id < 0) return -1;
        if ((size_t)t->len[id] == n && memcmp(t->piece[id], s, n) == 0) return id;
        i = (i + 1) & t->hash_mask;
    }
}

/* Insert all ids; on duplicate pieces the lowest id wins (llama2.c's bsearch
 * would pick an unspecified one; the real vocabularies have no duplicates). */
static lv_status tok_build_hash(io_tokenizer *t)
{
    lv_status st = LV_OK;
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)t->vocab_size) cap <<= 1;
    LV_ALLOC(t->hash, cap);
    memset(t->hash, 0xff, cap * sizeof *t->hash);
    t->hash_mask = cap - 1;
    for (int32_t id = 0; id < t->vocab_size; id++) {
        uint32_t i = tok_hash_bytes(t->piece[id], (size_t)t->len[id]) & t->hash_mask;
        int dup = 0;
        while (t->hash[i] >= 0) {
            int32_t o = t->hash[i];
            if (t->len[o] == t->len[id] && memcmp(t->piece[o], t->piece[id], (size_t)t->len[id]) == 0) {
                dup = 1;
                break;
            }
            i = (i + 1) & t->hash_mask;
        }
        if (!dup) t->hash[i] = id;
    }
done:
    return st;
}

static int32_t tok_rd_i32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    int32_t v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static float tok_rd_f32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Parse the records of a mapped tokenizer file into t (vocab_size already set). */
static lv_status tok_parse(io_tokenizer *t, const unsigned char *d, size_t size, const char *path)
{
    lv_status st = LV_OK;
    if (size < 4) LV_FAIL(LV_ERR_FORMAT, "%s: truncated tokenizer file (%zu bytes, no header)", path, size);
    int32_t mtl = tok_rd_i32(d);
    if (mtl < 1 || mtl > TOK_MAX_PIECE)
        LV_FAIL(LV_ERR_FORMAT, "%s: max_token_length %d out of range [1, %d]", path, (int)mtl,
                TOK_MAX_PIECE);
    /* First pass: validate every record against the file size. */
    size_t off = 4, text_bytes = 0;
    for (int i = 0; i < t->vocab_size; i++) {
        if (size - off < 8)
            LV_FAIL(LV_ERR_FORMAT,
                    "%s: truncated at token %d of %d (offset %zu); is vocab_size %d right for "
                    "this tokenizer?", path, i, t->vocab_size, off, t->vocab_size);
        int32_t n = tok_rd_i32(d + off + 4);
        if (n < 0 || n > mtl)
            LV_FAIL(LV_ERR_FORMAT, "%s: token %d has length %d (max_token_length %d)", path, i,
                    (int)n, (int)mtl);
        off += 8;
        if (size - off < (size_t)n)
            LV_FAIL(LV_ERR_FORMAT, "%s: truncated in token %d of %d (needs %d bytes at offset %zu)",
                    path, i, t->vocab_size, (int)n, off);
        off += (size_t)n;
        text_bytes += (size_t)n + 1;
    }
    LV_ALLOC(t->arena, text_bytes);
    off = 4;
    char *a = t->arena;
    t->max_len = 0;
    for (int i = 0; i < t->vocab_size; i++) {
        t->score[i] = tok_rd_f32(d + off);
        t->len[i] = tok_rd_i32(d + off + 4);
        off += 8;
        memcpy(a, d + off, (size_t)t->len[i]);
        a[t->len[i]] = '\0';
        t->piece[i] = a;
        a += t->len[i] + 1;
        off += (size_t)t->len[i];
        if (t->len[i] > t->max_len) t->max_len = t->len[i];
    }
done:
    return st;
}

lv_status io_tokenizer_open(io_tokenizer **out, const char *path, int vocab_size)
{
    lv_status st = LV_OK;
    io_map map = {0};
    io_tokenizer *t = NULL;
    if (!out || !path) LV_FAIL(LV_ERR_INVALID_ARG, "io_tokenizer_open: NULL argument");
    *out = NULL;
    /* ids 0..258 are <unk>, BOS, EOS and the 256 byte-fallback tokens */
    if (vocab_size < 259 || vocab_size > (1 << 24))
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: vocab_size %d out of range [259, %d]", path, vocab_size,
                1 << 24);
    LV_TRY(io_map_open(&map, path));
    LV_ALLOC(t, 1);
    t->vocab_size = vocab_size;
    LV_ALLOC(t->piece, vocab_size);
    LV_ALLOC(t->len, vocab_size);
    LV_ALLOC(t->score, vocab_size);
    LV_TRY(tok_parse(t, map.data, map.size, path));
    LV_TRY(tok_build_hash(t));
    for (int b = 0; b < 256; b++) {
        t->byte_piece[b][0] = (char)b;
        t->byte_piece[b][1] = '\0';
    }
    *out = t;
    t = NULL;
done:
    io_tokenizer_free(t);
    io_map_close(&map);
    return st;
}

void io_tokenizer_free(io_tokenizer *t)
{
    if (!t) return;
    free(t->hash);
    free(t->arena);
    free(t->score);
    free(t->len);
    free(t->piece);
    free(t);
}

int io_tokenizer_vocab_size(const io_tokenizer *t) { return t ? t->vocab_size : 0; }

static int tok_hex(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

const char *io_tokenizer_decode(const io_tokenizer *t, int32_t prev, int32_t token)
{
    if (!t || token < 0 || token >= t->vocab_size) return "";
    const char *p = t->piece[token];
    int n = t->len[token];
    if (prev == TOK_BOS && n > 0 && p[0] == ' ') {
        p++;
        n--;
    }
    if (n == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>') {
        int hi = tok_hex(p[3]), lo = tok_hex(p[4]);
        if (hi >= 0 && lo >= 0) return t->byte_piece[hi * 16 + lo];
    }
    return p;
}

/* ------------------------------------------------------------------ encode */

typedef struct {
    float score;   /* score of the merged piece */
    int32_t left;  /* symbol index of the left half (orders positions) */
    int32_t right; /* symbol index of the right half */
    int32_t tl, tr;/* token ids of the halves when queued, to detect staleness */
    int32_t id;    /* merged token id */
} tok_cand;

typedef struct {
    tok_cand *a;
    size_t n, cap;
} tok_heap;

/* Does a come out of the heap before b: higher score, then leftmost. */
static int tok_cand_before(const tok_cand *a, const tok_cand *b)
{
    if (a->score != b->score) return a->score > b->score;
    return a->left < b->left;
}

static lv_status tok_heap_push(tok_heap *h, const tok_cand *c)
{
    lv_status st = LV_OK;
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        tok_cand *a = realloc(h->a, cap * sizeof *a);
        if (!a) LV_FAIL(LV_ERR_NOMEM, "out of memory growing the merge queue to %zu entries", cap);
        h->a = a;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!tok_cand_before(c, &h->a[p])) break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = *c;
done:
    return st;
}

static tok_cand tok_heap_pop(tok_heap *h)
{
    tok_cand top = h->a[0];
    tok_cand last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = l;
        if (l >= h->n) break;
        if (r < h->n && tok_cand_before(&h->a[r], &h->a[l])) m = r;
        if (!tok_cand_before(&h->a[m], &last)) break;
        h->a[i] = h->a[m];
        i = m;
    }
    if (h->n) h->a[i] = last;
    return top;
}

typedef struct {
    int32_t *tok;  /* (n) current token of each symbol */
    int32_t *next; /* (n) next live symbol or -1 */
    int32_t *prev; /* (n) previous live symbol or -1 */
    int n;
} tok_syms;

/* Queue the pair (l, next[l]) if its concatenation is a mergeable piece. */
static lv_status tok_try_pair(const io_tokenizer *t, const tok_syms *s, tok_heap *h, int32_t l,
                              char *buf)
{
    lv_status st = LV_OK;
    if (l < 0) goto done;
    int32_t r = s->next[l];
    if (r < 0) goto done;
    int32_t a = s->tok[l], b = s->tok[r];
    size_t la = (size_t)t->len[a], lb = (size_t)t->len[b];
    if (la + lb > (size_t)t->max_len) goto done;
    memcpy(buf, t->piece[a], la);
    memcpy(buf + la, t->piece[b], lb);
    int32_t id = tok_lookup(t, buf, la + lb);
    if (id < 0 || !(t->score[id] > TOK_MIN_SCORE)) goto done;
    tok_cand c = {.score = t->score[id], .left = l, .right = r, .tl = a, .tr = b, .id = id};
    LV_TRY(tok_heap_push(h, &c));
done:
    return st;
}

/* Initial symbols: optional BOS, dummy prefix, codepoints or their bytes.
 * Continuation bytes (10xxxxxx) join the current codepoint up to 4 bytes;
 * stray ones start groups of their own, as in llama2.c. */
static int tok_initial(const io_tokenizer *t, const char *text, size_t n, int bos, int32_t *out)
{
    int k = 0;
    if (bos) out[k++] = TOK_BOS;
    if (n > 0) {
        int32_t sp = tok_lookup(t, " ", 1);
        out[k++] = sp >= 0 ? sp : ' ' + 3;
    }
    size_t start = 0, glen = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        if ((c & 0xC0) != 0x80) glen = 0;
        if (glen == 0) start = i;
        glen++;
        unsigned char nx = i + 1 < n ? (unsigned char)text[i + 1] : 0;
        if ((nx & 0xC0) == 0x80 && glen < 4) continue;
        int32_t id = tok_lookup(t, text + start, glen);
        if (id >= 0) {
            out[k++] = id;
        } else {
            for (size_t j = 0; j < glen; j++) out[k++] = (unsigned char)text[start + j] + 3;
        }
        glen = 0;
    }
    return k;
}

/* Apply merges in (score desc, position asc) order until none is left. */
static lv_status tok_merge_all(const io_tokenizer *t, tok_syms *s)
{
    lv_status st = LV_OK;
    tok_heap h = {0};
    char *buf = NULL;
    LV_ALLOC(buf, 2 * (size_t)t->max_len + 1);
    for (int32_t i = 0; i + 1 < s->n; i++) LV_TRY(tok_try_pair(t, s, &h, i, buf));
    while (h.n) {
        tok_cand c = tok_heap_pop(&h);
        if (s->tok[c.left] != c.tl || s->next[c.left] != c.right || s->tok[c.right] != c.tr)
            continue; /* stale: one half has merged since (pieces only grow) */
        s->tok[c.left] = c.id;
        s->tok[c.right] = -1;
        int32_t nr = s->next[c.right];
        s->next[c.left] = nr;
        if (nr >= 0) s->prev[nr] = c.left;
        LV_TRY(tok_try_pair(t, s, &h, s->prev[c.left], buf));
        LV_TRY(tok_try_pair(t, s, &h, c.left, buf));
    }
done:
    free(buf);
    free(h.a);
    return st;
}

lv_status io_tokenizer_encode(const io_tokenizer *t, const char *text, size_t n, int bos,
                              int eos, int32_t **tokens, int64_t *n_tokens)
{
    lv_status st = LV_OK;
    tok_syms s = {0};
    int32_t *out = NULL;
    if (!t || (!text && n) || !tokens || !n_tokens)
        LV_FAIL(LV_ERR_INVALID_ARG, "io_tokenizer_encode: NULL argument");
    *tokens = NULL;
    *n_tokens = 0;
    if (n > (size_t)INT32_MAX / 2 - 4)
        LV_FAIL(LV_ERR_INVALID_ARG, "io_tokenizer_encode: text of %zu bytes is too long (max %d)",
                n, INT32_MAX / 2 - 4);
    size_t cap = n + 3; /* each byte gives at most one symbol, plus BOS, prefix, EOS */
    LV_ALLOC(s.tok, cap);
    LV_ALLOC(s.next, cap);
    LV_ALLOC(s.prev, cap);
    s.n = tok_initial(t, text, n, bos, s.tok);
    for (int32_t i = 0; i < s.n; i++) {
        s.prev[i] = i - 1;
        s.next[i] = i + 1 < s.n ? i + 1 : -1;
    }
    LV_TRY(tok_merge_all(t, &s));
    LV_ALLOC(out, cap);
    int64_t k = 0;
    for (int32_t i = s.n ? 0 : -1; i >= 0; i = s.next[i]) out[k++] = s.tok[i];
    if (eos) out[k++] = TOK_EOS;
    *tokens = out;
    *n_tokens = k;
    out = NULL;
done:
    free(out);
    free(s.prev);
    free(s.next);
    free(s.tok);
    return st;
}
