/* bench_npy.h: 2-D float32 .npy files (NumPy format 1.0, C order) for the
 * benches that exchange layers with Python tools (dump_layers.c,
 * aqlm_side_by_side.c, tools/aqlm_ref/). Header-only (static inline),
 * included by one bench executable each. Little-endian hosts only. */
#ifndef BENCH_NPY_H
#define BENCH_NPY_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lv.h"

/* Writes a (rows, cols) row-major float32 array to path. */
static inline lv_status bench_npy_write(const char *path, const float *a, int64_t rows,
                                        int64_t cols)
{
    lv_status st = LV_OK;
    FILE *f = NULL;
    char hdr[128];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                     (long long)rows, (long long)cols);
    /* magic (6) + version (2) + header length (2) + header, padded with spaces
     * to a multiple of 64 and ended by '\n' (the format's alignment rule) */
    int total = (10 + n + 1 + 63) / 64 * 64;
    int hlen = total - 10;
    if (n <= 0 || n >= (int)sizeof hdr || rows < 0 || cols < 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "npy: bad shape (%lld, %lld)", (long long)rows,
                (long long)cols);
    f = fopen(path, "wb");
    if (!f) LV_FAIL(LV_ERR_IO, "npy: cannot create %s", path);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    if (fwrite(pre, 1, 10, f) != 10 || fwrite(hdr, 1, (size_t)n, f) != (size_t)n)
        LV_FAIL(LV_ERR_IO, "npy: write failed on %s", path);
    for (int t = n; t < hlen - 1; t++)
        if (fputc(' ', f) == EOF) LV_FAIL(LV_ERR_IO, "npy: write failed on %s", path);
    if (fputc('\n', f) == EOF) LV_FAIL(LV_ERR_IO, "npy: write failed on %s", path);
    size_t cnt = (size_t)(rows * cols);
    if (cnt && fwrite(a, sizeof(float), cnt, f) != cnt)
        LV_FAIL(LV_ERR_IO, "npy: write failed on %s", path);
done:
    if (f && fclose(f) != 0 && st == LV_OK) {
        st = LV_ERR_IO;
        lv_error_set(st, __FILE__, __LINE__, "npy: close failed on %s", path);
    }
    return st;
}

/* Reads a 2-D '<f4' C-order array: *a (rows, cols) malloc'd, caller frees. */
static inline lv_status bench_npy_read(const char *path, float **a, int64_t *rows, int64_t *cols)
{
    lv_status st = LV_OK;
    FILE *f = NULL;
    char *hdr = NULL;
    unsigned char pre[10];
    long long r = 0, c = 0;
    *a = NULL;
    f = fopen(path, "rb");
    if (!f) LV_FAIL(LV_ERR_IO, "npy: cannot open %s", path);
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1)
        LV_FAIL(LV_ERR_FORMAT, "npy: %s is not a version 1 .npy file (save with np.save)", path);
    int hlen = pre[8] | (pre[9] << 8);
    LV_ALLOC(hdr, (size_t)hlen + 1);
    if (fread(hdr, 1, (size_t)hlen, f) != (size_t)hlen)
        LV_FAIL(LV_ERR_FORMAT, "npy: %s: short header", path);
    hdr[hlen] = '\0';
    const char *sh = strstr(hdr, "'shape': (");
    if (!strstr(hdr, "'descr': '<f4'") || !strstr(hdr, "'fortran_order': False") || !sh ||
        sscanf(sh + 10, "%lld, %lld)", &r, &c) != 2 || r <= 0 || c <= 0)
        LV_FAIL(LV_ERR_FORMAT, "npy: %s must be a 2-D float32 C-order array (header %s)", path,
                hdr);
    LV_ALLOC(*a, (size_t)(r * c));
    if (fread(*a, sizeof(float), (size_t)(r * c), f) != (size_t)(r * c))
        LV_FAIL(LV_ERR_FORMAT, "npy: %s: short data", path);
    *rows = r;
    *cols = c;
done:
    if (f) fclose(f);
    free(hdr);
    if (st != LV_OK) {
        free(*a);
        *a = NULL;
    }
    return st;
}

/* 1-minute load average from /proc/loadavg (-1 when unavailable). */
static inline double bench_loadavg(void)
{
    double l = -1.0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1.0;
        fclose(f);
    }
    return l;
}

#endif
