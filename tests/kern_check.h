/* kern_check.h: helpers shared by the test_kern_* tests (header-only). */
#ifndef KERN_CHECK_H
#define KERN_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "lv.h"

/* Fill x (n) with normal(0, 1) * scale + shift from r. */
static inline void kc_fill(lv_rng *r, float *x, int64_t n, float scale, float shift)
{
    for (int64_t i = 0; i < n; i++) x[i] = lv_rng_normal(r) * scale + shift;
}

/* Count elements with |got - ref| > atol + rtol*|ref| (NaN counts); print the
 * max abs/rel diff and the first few mismatches under `name`. */
static inline int64_t kc_compare(const char *name, const float *got, const double *ref, int64_t n,
                                 double atol, double rtol)
{
    double max_abs = 0.0, max_rel = 0.0;
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        double rel = d / (fabs(ref[i]) > 1e-30 ? fabs(ref[i]) : 1e-30);
        if (!(d <= atol + rtol * fabs(ref[i]))) {
            if (bad < 5)
                printf("  %s: mismatch at %lld: got %.9g want %.9g\n", name, (long long)i,
                       (double)got[i], ref[i]);
            bad++;
        }
        if (d > max_abs || d != d) max_abs = d;
        if (rel > max_rel) max_rel = rel;
    }
    printf("  %-28s n=%-8lld max|diff|=%.3g max rel=%.3g (atol %.1g rtol %.1g) %s\n", name,
           (long long)n, max_abs, max_rel, atol, rtol, bad ? "FAIL" : "ok");
    return bad;
}

/* kc_compare against a float reference. */
static inline int64_t kc_compare_f(const char *name, const float *got, const float *ref,
                                   int64_t n, double atol, double rtol, double *scratch)
{
    for (int64_t i = 0; i < n; i++) scratch[i] = ref[i];
    return kc_compare(name, got, scratch, n, atol, rtol);
}

#endif
