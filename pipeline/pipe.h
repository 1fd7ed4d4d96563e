/* pipe.h: the llmvq command line: option parsing and the subcommands.
 * Each pipe_cmd_* takes the arguments after the command name and returns the
 * process exit status (DESIGN.md): 0 success, 1 error (one line on stderr naming
 * the file and problem), 2 usage, 75 stopped by a signal with work checkpointed.
 * Only main() exits. */
#ifndef PIPE_H
#define PIPE_H

#include <stdint.h>
#include <stdio.h>

#include "lv.h"

enum { PIPE_EXIT_OK = 0, PIPE_EXIT_ERROR = 1, PIPE_EXIT_USAGE = 2, PIPE_EXIT_STOPPED = 75 };

/* ---- option parsing: a table of long options, "--name value" or "--name=value" ---- */

typedef enum { PIPE_OPT_FLAG, PIPE_OPT_STR, PIPE_OPT_INT, PIPE_OPT_I64, PIPE_OPT_FLOAT } pipe_opt_kind;

typedef struct {
    const char *name;  /* without the leading "--" */
    pipe_opt_kind kind;
    void *dst;         /* int* for FLAG/INT, const char** for STR, int64_t*, float* */
    const char *help;  /* one line; the default is stated in it */
} pipe_opt;

/* Parses argv[0..argc) against opts. Positional arguments (not starting with
 * "--") are stored in pos[0..max_pos) and counted in *n_pos. Returns 0 on
 * success, PIPE_EXIT_USAGE after printing a message on bad input, and -1 when
 * --help was given (help already printed on stdout). */
int pipe_opts_parse(const char *cmd, const char *synopsis, const pipe_opt *opts, int n_opts,
                    int argc, char **argv, const char **pos, int max_pos, int *n_pos);

void pipe_opts_help(FILE *f, const char *cmd, const char *synopsis, const pipe_opt *opts,
                    int n_opts);

/* Print "llmvq CMD: <first line of lv_last_error()>" (+ the trace when
 * LLMVQ_DEBUG is set) and return PIPE_EXIT_ERROR. */
int pipe_report_error(const char *cmd);

/* Tokenizer beside a model: DIR/tokenizer.bin, then DIR/tok<vocab>.bin, where
 * DIR is the model directory (HF) or the directory of the .bin. */
lv_status pipe_find_tokenizer(const char *model_path, int vocab, char *buf, size_t cap);

/* SIGTERM / SIGUSR1 set a flag that long runs poll at safe points. */
void pipe_signals_install(void);
int pipe_stop_requested(void);

/* ---- subcommands ---- */
/* What a PV-tuning checkpoint (CKPT/pv_state.h5) holds, read and verified in
 * full (model checksum, state checksum, lengths) by pipe_pv_state_inspect
 * (quantize_pv.c, for `llmvq inspect`). */
typedef struct {
    int64_t epoch, v_steps, p_steps, n_param, n_codes, n_train;
    double best, loss_before;
    uint64_t job_hash;
} pipe_pv_progress;
lv_status pipe_pv_state_inspect(const char *path, pipe_pv_progress *out);

int pipe_cmd_eval(int argc, char **argv);
int pipe_cmd_generate(int argc, char **argv);
int pipe_cmd_convert(int argc, char **argv);
int pipe_cmd_synth(int argc, char **argv);
int pipe_cmd_quantize(int argc, char **argv);
int pipe_cmd_inspect(int argc, char **argv);
int pipe_cmd_plan(int argc, char **argv);
int pipe_cmd_export(int argc, char **argv);
int pipe_cmd_bench(int argc, char **argv);

#endif
