/* job.h: job files (INI) for `llmvq quantize` and `llmvq plan`.
 *
 * Every key is declared once in a schema (jobs/job_schema.c) with its type,
 * default, allowed range or values and one line of help; docs/jobfile.md is
 * generated from it (`llmvq quantize --help-keys`). Unknown sections or keys,
 * bad values and duplicate keys are errors naming the file, line and key.
 * `--set section.key=value` overrides go through the same validation. */
#ifndef JOB_H
#define JOB_H

#include <stdint.h>
#include <stdio.h>

#include "lv.h"

typedef enum { JOB_STR, JOB_INT, JOB_FLOAT, JOB_BOOL, JOB_ENUM, JOB_PATH } job_type;

typedef struct {
    const char *section;
    const char *key;
    job_type type;
    const char *def;     /* default as text; NULL = required */
    double min, max;     /* JOB_INT / JOB_FLOAT range (inclusive) */
    const char *choices; /* JOB_ENUM: "a|b|c" */
    const char *help;
} job_key;

/* The schema (static table) and its length. */
const job_key *job_schema(int *n);

typedef struct job_file job_file;

/* Read and validate an INI job file. Relative JOB_PATH values are resolved
 * against the job file's directory. Caller frees with job_free. */
lv_status job_load(job_file **out, const char *path);
/* A job with every key at its default (required keys unset). */
lv_status job_init_defaults(job_file **out);
void job_free(job_file *j);

/* Apply "section.key=value" (from --set); validated like the file. */
lv_status job_set(job_file *j, const char *assignment);

/* Check that every required key is set. */
lv_status job_validate(const job_file *j);

/* Typed getters by "section.key"; a key not in the schema or of another type
 * is an error (LV_ERR_INVALID_ARG). Strings are borrowed from j. */
lv_status job_get_str(const job_file *j, const char *name, const char **v);
lv_status job_get_int(const job_file *j, const char *name, int64_t *v);
lv_status job_get_float(const job_file *j, const char *name, double *v);
lv_status job_get_bool(const job_file *j, const char *name, int *v);

/* The effective job as canonical INI text (every key, sorted by schema order):
 * what is hashed to tie checkpoints to a job, and what `plan` prints.
 * *text malloc'd. */
lv_status job_canonical(const job_file *j, char **text);

/* FNV-1a 64 over the keys that change the quantized result (not output.*,
 * run.checkpoint_dir or model.path): ties checkpoints to a job. */
uint64_t job_hash(const job_file *j);
/* job_hash over the keys that change the quantized blocks only: without the
 * [pvtune] section (PV-tuning runs after the blocks, on their result), so a
 * job that differs in [pvtune] alone reuses the block checkpoints. */
uint64_t job_hash_blocks(const job_file *j);

/* Markdown table of the schema (docs/jobfile.md). */
void job_schema_markdown(FILE *f);

#endif
