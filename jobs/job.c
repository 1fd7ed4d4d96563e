/* job.c: INI job files: parse (inih), validate against the schema, getters. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>

#include "io.h"
#include "job.h"

struct job_file {
    char *path;       /* job file, or NULL for defaults-only */
    char *dir;        /* its directory, for relative paths */
    int n;            /* schema length */
    char **value;     /* (n) current values as text; NULL = unset */
    int *line;        /* (n) line that set it (0 = default or --set) */
};

static int find_key(const char *section, const char *key, size_t key_len)
{
    int n;
    const job_key *s = job_schema(&n);
    for (int i = 0; i < n; i++)
        if (!strcmp(s[i].section, section) && strlen(s[i].key) == key_len &&
            !strncmp(s[i].key, key, key_len))
            return i;
    return -1;
}

static int section_known(const char *section)
{
    int n;
    const job_key *s = job_schema(&n);
    for (int i = 0; i < n; i++)
        if (!strcmp(s[i].section, section)) return 1;
    return 0;
}

/* Check `v` against key k; on failure write the reason into why. */
static int value_ok(const job_key *k, const char *v, char *why, size_t cap)
{
    char *end = NULL;
    errno = 0;
    switch (k->type) {
    case JOB_STR:
    case JOB_PATH: return 1;
    case JOB_INT: {
        long long x = strtoll(v, &end, 10);
        if (errno || end == v || *end) {
            snprintf(why, cap, "'%s' is not an integer", v);
            return 0;
        }
        if ((double)x < k->min || (double)x > k->max) {
            snprintf(why, cap, "%lld is outside [%.15g, %.15g]", x, k->min, k->max);
            return 0;
        }
        return 1;
    }
    case JOB_FLOAT: {
        double x = strtod(v, &end);
        if (errno || end == v || *end || !isfinite(x)) {
            snprintf(why, cap, "'%s' is not a finite number", v);
            return 0;
        }
        if (x < k->min || x > k->max) {
            snprintf(why, cap, "%g is outside [%g, %g]", x, k->min, k->max);
            return 0;
        }
        return 1;
    }
    case JOB_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "false") || !strcmp(v, "1") || !strcmp(v, "0"))
            return 1;
        snprintf(why, cap, "'%s' is not true or false", v);
        return 0;
    case JOB_ENUM: {
        size_t len = strlen(v);
        for (const char *c = k->choices; *c;) {
            const char *bar = strchr(c, '|');
            size_t cl = bar ? (size_t)(bar - c) : strlen(c);
            if (cl == len && !strncmp(c, v, len)) return 1;
            c += cl + (bar ? 1 : 0);
        }
        snprintf(why, cap, "'%s' is not one of %s", v, k->choices);
        return 0;
    }
    }
    return 0;
}

/* Store value for key index i (resolving relative paths against dir). */
static lv_status store(job_file *j, int i, const char *v, int line)
{
    lv_status st = LV_OK;
    int n;
    const job_key *k = &job_schema(&n)[i];
    char *copy = NULL;
    if (k->type == JOB_PATH && v[0] && v[0] != '/' && j->dir) {
        size_t len = strlen(j->dir) + strlen(v) + 2;
        LV_ALLOC(copy, len);
        snprintf(copy, len, "%s/%s", j->dir, v);
    } else {
        copy = strdup(v);
        if (!copy) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    }
    free(j->value[i]);
    j->value[i] = copy;
    j->line[i] = line;
done:
    return st;
}

lv_status job_init_defaults(job_file **out)
{
    lv_status st = LV_OK;
    job_file *j = NULL;
    *out = NULL;
    LV_ALLOC(j, 1);
    const job_key *s = job_schema(&j->n);
    LV_ALLOC(j->value, j->n);
    LV_ALLOC(j->line, j->n);
    for (int i = 0; i < j->n; i++)
        if (s[i].def) LV_TRY(store(j, i, s[i].def, 0));
    *out = j;
    j = NULL;
done:
    job_free(j);
    return st;
}

void job_free(job_file *j)
{
    if (!j) return;
    for (int i = 0; j->value && i < j->n; i++) free(j->value[i]);
    free(j->value);
    free(j->line);
    free(j->path);
    free(j->dir);
    free(j);
}

typedef struct {
    job_file *j;
    lv_status st;
    char msg[512];
    int msg_line;     /* line of the first problem found by on_entry */
    const char *next; /* reader position in the text */
    int line;         /* lines handed to inih so far = line of the current entry */
} parse_ctx;

/* inih reader: one line per call. Debian's inih is built without line numbers
 * in the handler, so we count the lines we hand out. */
static char *read_line(char *buf, int cap, void *stream)
{
    parse_ctx *p = stream;
    if (!*p->next) return NULL;
    int n = 0;
    while (p->next[n] && p->next[n] != '\n' && n < cap - 2) n++;
    if (p->next[n] == '\n') n++;
    memcpy(buf, p->next, (size_t)n);
    buf[n] = '\0';
    p->next += n;
    p->line++;
    return buf;
}

static int on_entry(void *user, const char *section, const char *name, const char *value)
{
    parse_ctx *p = user;
    const int line = p->line;
    int n;
    const job_key *s = job_schema(&n);
    char why[256];
    if (p->msg[0] || p->st != LV_OK) return 0; /* report the first problem only */
    if (!name) return 1;                        /* section header alone */
    p->msg_line = line;
    if (!section[0]) {
        snprintf(p->msg, sizeof p->msg, "line %d: key '%s' outside any [section]", line, name);
        return 0;
    }
    if (!section_known(section)) {
        snprintf(p->msg, sizeof p->msg, "line %d: unknown section [%s]", line, section);
        return 0;
    }
    int i = find_key(section, name, strlen(name));
    if (i < 0) {
        snprintf(p->msg, sizeof p->msg, "line %d: unknown key '%s.%s'", line, section, name);
        return 0;
    }
    if (p->j->line[i] > 0) {
        snprintf(p->msg, sizeof p->msg, "line %d: key '%s.%s' already set on line %d", line,
                 section, name, p->j->line[i]);
        return 0;
    }
    if (!value_ok(&s[i], value, why, sizeof why)) {
        snprintf(p->msg, sizeof p->msg, "line %d: %s.%s: %s", line, section, name, why);
        return 0;
    }
    if (store(p->j, i, value, line) != LV_OK) {
        p->st = LV_ERR_NOMEM;
        return 0;
    }
    return 1;
}

lv_status job_load(job_file **out, const char *path)
{
    lv_status st = LV_OK;
    job_file *j = NULL;
    char *text = NULL;
    size_t size = 0;
    *out = NULL;
    LV_TRY(job_init_defaults(&j));
    LV_TRY(io_read_file(path, &text, &size));
    if (strlen(text) != size) LV_FAIL(LV_ERR_FORMAT, "%s: not a text file (NUL byte)", path);
    j->path = strdup(path);
    const char *slash = strrchr(path, '/');
    j->dir = slash ? strndup(path, (size_t)(slash - path)) : strdup(".");
    if (!j->path || !j->dir) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    /* Defaults of JOB_PATH keys stay relative to the working directory. */
    parse_ctx p = {.j = j, .st = LV_OK, .msg = "", .next = text, .line = 0};
    int rc = ini_parse_stream(read_line, &p, on_entry, &p);
    if (p.st != LV_OK) LV_FAIL(p.st, "%s: out of memory", path);
    if (rc > 0 && (!p.msg[0] || rc < p.msg_line))
        LV_FAIL(LV_ERR_FORMAT, "%s: line %d: not INI syntax ([section] or key = value)", path, rc);
    if (p.msg[0]) LV_FAIL(LV_ERR_FORMAT, "%s: %s", path, p.msg);
    if (rc < 0) LV_FAIL(LV_ERR_IO, "%s: cannot parse", path);
    *out = j;
    j = NULL;
done:
    free(text);
    job_free(j);
    return st;
}

lv_status job_set(job_file *j, const char *assignment)
{
    lv_status st = LV_OK;
    int n;
    const job_key *s = job_schema(&n);
    char why[256];
    const char *dot = strchr(assignment, '.'), *eq = strchr(assignment, '=');
    if (!dot || !eq || dot > eq)
        LV_FAIL(LV_ERR_INVALID_ARG, "--set '%s': expected section.key=value", assignment);
    char section[64];
    size_t sl = (size_t)(dot - assignment);
    if (sl >= sizeof section) LV_FAIL(LV_ERR_INVALID_ARG, "--set '%s': section too long", assignment);
    memcpy(section, assignment, sl);
    section[sl] = '\0';
    int i = find_key(section, dot + 1, (size_t)(eq - dot - 1));
    if (i < 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "--set '%s': unknown key '%.*s'", assignment,
                (int)(eq - assignment), assignment);
    if (!value_ok(&s[i], eq + 1, why, sizeof why))
        LV_FAIL(LV_ERR_INVALID_ARG, "--set %s.%s: %s", s[i].section, s[i].key, why);
    /* --set paths are relative to the working directory, not the job file. */
    char *saved = j->dir;
    j->dir = NULL;
    st = store(j, i, eq + 1, 0);
    j->dir = saved;
    LV_TRY(st);
done:
    return st;
}

lv_status job_validate(const job_file *j)
{
    lv_status st = LV_OK;
    int n;
    const job_key *s = job_schema(&n);
    for (int i = 0; i < n; i++)
        if (!j->value[i] || (!s[i].def && !j->value[i][0]))
            LV_FAIL(LV_ERR_FORMAT, "%s: required key '%s.%s' is not set (%s)",
                    j->path ? j->path : "job", s[i].section, s[i].key, s[i].help);
done:
    return st;
}

static lv_status lookup(const job_file *j, const char *name, job_type want, const char **v)
{
    lv_status st = LV_OK;
    int n;
    const job_key *s = job_schema(&n);
    const char *dot = strchr(name, '.');
    char section[64];
    if (!dot || (size_t)(dot - name) >= sizeof section)
        LV_FAIL(LV_ERR_INVALID_ARG, "job key '%s' is not section.key", name);
    memcpy(section, name, (size_t)(dot - name));
    section[dot - name] = '\0';
    int i = find_key(section, dot + 1, strlen(dot + 1));
    if (i < 0) LV_FAIL(LV_ERR_INVALID_ARG, "job key '%s' is not in the schema", name);
    int compatible = s[i].type == want || (want == JOB_STR && (s[i].type == JOB_PATH ||
                                                               s[i].type == JOB_ENUM));
    if (!compatible) LV_FAIL(LV_ERR_INVALID_ARG, "job key '%s' read with the wrong type", name);
    if (!j->value[i])
        LV_FAIL(LV_ERR_FORMAT, "%s: required key '%s' is not set", j->path ? j->path : "job",
                name);
    *v = j->value[i];
done:
    return st;
}

lv_status job_get_str(const job_file *j, const char *name, const char **v)
{
    return lookup(j, name, JOB_STR, v);
}

lv_status job_get_int(const job_file *j, const char *name, int64_t *v)
{
    const char *s = NULL;
    lv_status st = lookup(j, name, JOB_INT, &s);
    if (st == LV_OK) *v = strtoll(s, NULL, 10);
    return st;
}

lv_status job_get_float(const job_file *j, const char *name, double *v)
{
    const char *s = NULL;
    lv_status st = lookup(j, name, JOB_FLOAT, &s);
    if (st == LV_OK) *v = strtod(s, NULL);
    return st;
}

lv_status job_get_bool(const job_file *j, const char *name, int *v)
{
    const char *s = NULL;
    lv_status st = lookup(j, name, JOB_BOOL, &s);
    if (st == LV_OK) *v = !strcmp(s, "true") || !strcmp(s, "1");
    return st;
}

lv_status job_canonical(const job_file *j, char **text)
{
    lv_status st = LV_OK;
    int n;
    const job_key *s = job_schema(&n);
    size_t cap = 64;
    char *buf = NULL;
    *text = NULL;
    for (int i = 0; i < n; i++)
        cap += strlen(s[i].section) + strlen(s[i].key) + (j->value[i] ? strlen(j->value[i]) : 0) + 8;
    LV_ALLOC(buf, cap);
    size_t len = 0;
    const char *cur = "";
    for (int i = 0; i < n; i++) {
        if (strcmp(cur, s[i].section)) {
            len += (size_t)snprintf(buf + len, cap - len, "%s[%s]\n", len ? "\n" : "", s[i].section);
            cur = s[i].section;
        }
        len += (size_t)snprintf(buf + len, cap - len, "%s = %s\n", s[i].key,
                                j->value[i] ? j->value[i] : "");
    }
    *text = buf;
done:
    return st;
}

/* Keys that do not change the quantized result: where things are written or
 * evaluated, and the model's path (the model is identified by its own hash). */
static int key_hashed(const job_key *k)
{
    return strcmp(k->section, "output") && strcmp(k->key, "checkpoint_dir") &&
           strcmp(k->key, "checkpoint_every") &&
           strcmp(k->key, "scratch_dir") && strcmp(k->key, "comm_timeout_s") &&
           !(!strcmp(k->section, "model") && !strcmp(k->key, "path"));
}

static uint64_t hash_keys(const job_file *j, int with_pv)
{
    int n;
    const job_key *s = job_schema(&n);
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < n; i++) {
        if (!key_hashed(&s[i])) continue;
        if (!with_pv && !strcmp(s[i].section, "pvtune")) continue;
        const char *parts[4] = {s[i].section, s[i].key, j->value[i] ? j->value[i] : "", "\n"};
        for (int p = 0; p < 4; p++)
            for (const unsigned char *c = (const unsigned char *)parts[p]; *c; c++) {
                h ^= *c;
                h *= 0x100000001b3ULL;
            }
        h ^= 0xff; /* separator between fields */
        h *= 0x100000001b3ULL;
    }
    return h;
}

uint64_t job_hash(const job_file *j) { return hash_keys(j, 1); }

uint64_t job_hash_blocks(const job_file *j) { return hash_keys(j, 0); }

void job_schema_markdown(FILE *f)
{
    int n;
    const job_key *s = job_schema(&n);
    static const char *tn[] = {"string", "integer", "number", "bool", "choice", "path"};
    fprintf(f, "| key | type | default | allowed | meaning |\n| --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < n; i++) {
        char allowed[128] = "";
        if (s[i].type == JOB_ENUM) {
            size_t k = 0;
            for (const char *c = s[i].choices; *c && k + 3 < sizeof allowed; c++) {
                if (*c == '|') {
                    allowed[k++] = ',';
                    allowed[k++] = ' ';
                } else {
                    allowed[k++] = *c;
                }
            }
            allowed[k] = '\0';
        }
        else if (s[i].type == JOB_INT || s[i].type == JOB_FLOAT)
            snprintf(allowed, sizeof allowed, "%.15g .. %.15g", s[i].min, s[i].max);
        else if (s[i].type == JOB_BOOL)
            snprintf(allowed, sizeof allowed, "true, false");
        fprintf(f, "| `%s.%s` | %s | %s | %s | %s |\n", s[i].section, s[i].key, tn[s[i].type],
                s[i].def ? (s[i].def[0] ? s[i].def : "(empty)") : "**required**", allowed,
                s[i].help);
    }
}
