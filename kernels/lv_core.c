/* lv_core.c: status strings, thread-local error context, RNG, logging. */
#define _GNU_SOURCE
#include "lv.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define LV_ERRBUF 4096

static _Thread_local char tl_err[LV_ERRBUF];
static int g_rank = -1;
static int g_quiet = 0;

const char *lv_status_str(lv_status st)
{
    switch (st) {
    case LV_OK: return "LV_OK";
    case LV_ERR_INVALID_ARG: return "LV_ERR_INVALID_ARG";
    case LV_ERR_NOMEM: return "LV_ERR_NOMEM";
    case LV_ERR_IO: return "LV_ERR_IO";
    case LV_ERR_FORMAT: return "LV_ERR_FORMAT";
    case LV_ERR_HDF5: return "LV_ERR_HDF5";
    case LV_ERR_MPI: return "LV_ERR_MPI";
    case LV_ERR_NCCL: return "LV_ERR_NCCL";
    case LV_ERR_CUDA: return "LV_ERR_CUDA";
    case LV_ERR_NUMERIC: return "LV_ERR_NUMERIC";
    case LV_ERR_UNSUPPORTED: return "LV_ERR_UNSUPPORTED";
    case LV_ERR_STOPPED: return "LV_ERR_STOPPED";
    }
    return "LV_ERR_(unknown)";
}

const char *lv_last_error(void) { return tl_err; }

void lv_last_error_line(char *buf, size_t cap)
{
    if (!buf || cap == 0) return;
    size_t n = strcspn(tl_err, "\n");
    if (n >= cap) n = cap - 1;
    memcpy(buf, tl_err, n);
    buf[n] = '\0';
}

void lv_error_clear(void) { tl_err[0] = '\0'; }

void lv_error_set_rank(int rank) { g_rank = rank; }

void lv_error_set(lv_status st, const char *file, int line, const char *fmt, ...)
{
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tl_err, LV_ERRBUF, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n >= LV_ERRBUF) n = LV_ERRBUF - 1;
    snprintf(tl_err + n, LV_ERRBUF - (size_t)n, "\n  [%s] at %s:%d (rank %d, host %s)",
             lv_status_str(st), file, line, g_rank, host);
}

void lv_error_trace(const char *file, int line, const char *what)
{
    size_t n = strlen(tl_err);
    if (n + 1 >= LV_ERRBUF) return;
    snprintf(tl_err + n, LV_ERRBUF - n, "\n  at %s:%d (%s)", file, line, what);
}

_Noreturn void lv_assert_fail(const char *file, int line, const char *cond)
{
    fprintf(stderr, "llmvq: internal error: assertion '%s' failed at %s:%d\n", cond, file,
            line);
    abort();
}

/* ---- RNG ---- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void lv_rng_seed(lv_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t lv_rng_u64(lv_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float lv_rng_uniform(lv_rng *r) { return (float)(lv_rng_u64(r) >> 40) / 16777216.0f; }

float lv_rng_normal(lv_rng *r)
{
    /* u1 in (0, 1] so that log() is finite */
    double u1 = ((double)(lv_rng_u64(r) >> 11) + 1.0) / 9007199254740992.0;
    double u2 = (double)(lv_rng_u64(r) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- logging, time ---- */

void lv_log_set_quiet(int quiet) { g_quiet = quiet; }

static void log_line(const char *fmt, va_list ap)
{
    time_t t = time(NULL);
    struct tm tmv;
    localtime_r(&t, &tmv);
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    if (g_rank >= 0)
        fprintf(stderr, "[llmvq %02d:%02d:%02d r%d] %s\n", tmv.tm_hour, tmv.tm_min,
                tmv.tm_sec, g_rank, line);
    else
        fprintf(stderr, "[llmvq %02d:%02d:%02d] %s\n", tmv.tm_hour, tmv.tm_min, tmv.tm_sec,
                line);
}

void lv_log(const char *fmt, ...)
{
    if (g_quiet) return;
    va_list ap;
    va_start(ap, fmt);
    log_line(fmt, ap);
    va_end(ap);
}

void lv_warn(const char *fmt, ...)
{
    if (g_quiet == 1) return;
    va_list ap;
    va_start(ap, fmt);
    log_line(fmt, ap);
    va_end(ap);
}

double lv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

size_t lv_peak_rss_bytes(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return (size_t)ru.ru_maxrss * 1024u; /* Linux reports KiB */
}
