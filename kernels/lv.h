/* lv.h: the shared core of llmvq: status codes, error context, seeded RNG, logging.
 *
 * Every library function returns an lv_status; results come back through
 * out-parameters. A failing function records a message (file:line, rank, host)
 * in a thread-local buffer that lv_last_error() returns; LV_TRY adds a trace line
 * per level it passes through. Only the program's main() ends a run. */
#ifndef LV_H
#define LV_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    LV_OK = 0,
    LV_ERR_INVALID_ARG,
    LV_ERR_NOMEM,
    LV_ERR_IO,
    LV_ERR_FORMAT,
    LV_ERR_HDF5,
    LV_ERR_MPI,
    LV_ERR_NCCL,
    LV_ERR_CUDA,
    LV_ERR_NUMERIC,
    LV_ERR_UNSUPPORTED,
    LV_ERR_STOPPED, /* a stop signal was honoured at a safe point (append-only enum) */
} lv_status;

/* Short constant name of a status ("LV_ERR_IO"). */
const char *lv_status_str(lv_status st);

/* Message of the last failure on this thread ("" when none): the first line is
 * the problem ("file: problem"), further lines are the trace. Borrowed; valid
 * until the next lv_error_* call on this thread. */
const char *lv_last_error(void);

/* First line of lv_last_error() only, for one-line user-facing messages. The
 * result is copied into buf (always NUL-terminated). */
void lv_last_error_line(char *buf, size_t cap);

/* Record a failure (replaces any previous message). Used by LV_FAIL. */
void lv_error_set(lv_status st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Append a trace line "  at file:line (what)" to the current message. */
void lv_error_trace(const char *file, int line, const char *what);

void lv_error_clear(void);

/* Rank shown in error messages (-1 = not under MPI). Set once by main. */
void lv_error_set_rank(int rank);

/* One exit per function: declare `lv_status st = LV_OK;`, end with
 * `done: ...cleanup...; return st;`. */
#define LV_FAIL(code, ...)                                          \
    do {                                                            \
        st = (code);                                                \
        lv_error_set(st, __FILE__, __LINE__, __VA_ARGS__);          \
        goto done;                                                  \
    } while (0)

#define LV_TRY(expr)                                                \
    do {                                                            \
        lv_status lv_try_st_ = (expr);                              \
        if (lv_try_st_ != LV_OK) {                                  \
            st = lv_try_st_;                                        \
            lv_error_trace(__FILE__, __LINE__, #expr);              \
            goto done;                                              \
        }                                                           \
    } while (0)

/* Allocation that fails into `done` with LV_ERR_NOMEM. */
#define LV_ALLOC(ptr, count)                                                   \
    do {                                                                       \
        size_t lv_n_ = (size_t)(count);                                        \
        (ptr) = lv_n_ ? calloc(lv_n_, sizeof(*(ptr))) : NULL;                  \
        if (lv_n_ && !(ptr))                                                   \
            LV_FAIL(LV_ERR_NOMEM, "out of memory allocating %zu bytes",        \
                    lv_n_ * sizeof(*(ptr)));                                   \
    } while (0)

/* Broken invariant: prints and aborts, in Release too (like GGML_ASSERT).
 * Never for input validation. */
#define LV_ASSERT(cond)                                                        \
    do {                                                                       \
        if (!(cond)) lv_assert_fail(__FILE__, __LINE__, #cond);                \
    } while (0)
_Noreturn void lv_assert_fail(const char *file, int line, const char *cond);

/* ---- seeded RNG (xoshiro256**, seeded through splitmix64); never rand() ---- */
typedef struct {
    uint64_t s[4];
} lv_rng;

void lv_rng_seed(lv_rng *r, uint64_t seed);
uint64_t lv_rng_u64(lv_rng *r);
/* Uniform in [0, 1) with 24 random bits. */
float lv_rng_uniform(lv_rng *r);
/* Standard normal (Box-Muller). */
float lv_rng_normal(lv_rng *r);

/* ---- logging to stderr: "[llmvq HH:MM:SS] message" ---- */
void lv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A warning: as lv_log, but still printed at quiet level 2. */
void lv_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* 0: everything; 1: silence lv_log and lv_warn (tests, --quiet); 2: lv_warn
 * only (MPI ranks other than 0: one progress stream). */
void lv_log_set_quiet(int quiet);

/* Monotonic wall clock in seconds. */
double lv_now(void);

/* Peak resident set size of this process in bytes (from getrusage). */
size_t lv_peak_rss_bytes(void);

#endif
