/* cli.c: long-option parsing shared by the subcommands, and error reporting. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pipe.h"

void pipe_opts_help(FILE *f, const char *cmd, const char *synopsis, const pipe_opt *opts,
                    int n_opts)
{
    fprintf(f, "usage: llmvq %s %s\n\noptions:\n", cmd, synopsis);
    for (int i = 0; i < n_opts; i++) {
        const char *arg = "";
        switch (opts[i].kind) {
        case PIPE_OPT_FLAG: arg = ""; break;
        case PIPE_OPT_STR: arg = " VALUE"; break;
        case PIPE_OPT_INT:
        case PIPE_OPT_I64: arg = " N"; break;
        case PIPE_OPT_FLOAT: arg = " X"; break;
        }
        char left[64];
        snprintf(left, sizeof left, "--%s%s", opts[i].name, arg);
        fprintf(f, "  %-24s %s\n", left, opts[i].help);
    }
    fprintf(f, "  %-24s %s\n", "--help", "print this help and exit");
}

static int parse_value(const char *cmd, const pipe_opt *o, const char *val)
{
    char *end = NULL;
    errno = 0;
    switch (o->kind) {
    case PIPE_OPT_FLAG: *(int *)o->dst = 1; return 0;
    case PIPE_OPT_STR: *(const char **)o->dst = val; return 0;
    case PIPE_OPT_INT: {
        long v = strtol(val, &end, 10);
        if (errno || !end || *end || end == val || v < -2147483647L || v > 2147483647L) break;
        *(int *)o->dst = (int)v;
        return 0;
    }
    case PIPE_OPT_I64: {
        long long v = strtoll(val, &end, 10);
        if (errno || !end || *end || end == val) break;
        *(int64_t *)o->dst = (int64_t)v;
        return 0;
    }
    case PIPE_OPT_FLOAT: {
        float v = strtof(val, &end);
        if (errno || !end || *end || end == val || v != v) break;
        *(float *)o->dst = v;
        return 0;
    }
    }
    fprintf(stderr, "llmvq %s: bad value '%s' for --%s\n", cmd, val, o->name);
    return PIPE_EXIT_USAGE;
}

int pipe_opts_parse(const char *cmd, const char *synopsis, const pipe_opt *opts, int n_opts,
                    int argc, char **argv, const char **pos, int max_pos, int *n_pos)
{
    *n_pos = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            pipe_opts_help(stdout, cmd, synopsis, opts, n_opts);
            return -1;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            if (*n_pos >= max_pos) {
                fprintf(stderr, "llmvq %s: unexpected argument '%s' (see --help)\n", cmd, a);
                return PIPE_EXIT_USAGE;
            }
            pos[(*n_pos)++] = a;
            continue;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const pipe_opt *o = NULL;
        for (int k = 0; k < n_opts; k++)
            if (strlen(opts[k].name) == len && !strncmp(opts[k].name, name, len)) o = &opts[k];
        if (!o) {
            fprintf(stderr, "llmvq %s: unknown option '%.*s' (see --help)\n", cmd, (int)len + 2,
                    a);
            return PIPE_EXIT_USAGE;
        }
        const char *val = NULL;
        if (o->kind == PIPE_OPT_FLAG) {
            if (eq) {
                fprintf(stderr, "llmvq %s: --%s takes no value\n", cmd, o->name);
                return PIPE_EXIT_USAGE;
            }
        } else if (eq) {
            val = eq + 1;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            fprintf(stderr, "llmvq %s: --%s needs a value\n", cmd, o->name);
            return PIPE_EXIT_USAGE;
        }
        int rc = parse_value(cmd, o, val);
        if (rc) return rc;
    }
    return 0;
}

int pipe_report_error(const char *cmd)
{
    char line[1024];
    lv_last_error_line(line, sizeof line);
    fprintf(stderr, "llmvq %s: %s\n", cmd, line[0] ? line : "unknown error");
    const char *dbg = getenv("LLMVQ_DEBUG");
    if (dbg && *dbg && strcmp(dbg, "0")) fprintf(stderr, "%s\n", lv_last_error());
    return PIPE_EXIT_ERROR;
}
