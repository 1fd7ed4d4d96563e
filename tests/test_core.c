/* test_core.c: status strings, error context, RNG determinism. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "lv.h"

static lv_status fail_inner(void)
{
    lv_status st = LV_OK;
    LV_FAIL(LV_ERR_FORMAT, "%s: bad magic %d", "model.bin", 42);
done:
    return st;
}

static lv_status fail_outer(void)
{
    lv_status st = LV_OK;
    LV_TRY(fail_inner());
done:
    return st;
}

static void test_error_context(void **state)
{
    (void)state;
    assert_int_equal(fail_outer(), LV_ERR_FORMAT);
    char line[256];
    lv_last_error_line(line, sizeof line);
    assert_string_equal(line, "model.bin: bad magic 42");
    assert_non_null(strstr(lv_last_error(), "LV_ERR_FORMAT"));
    assert_non_null(strstr(lv_last_error(), "fail_inner()"));
    assert_string_equal(lv_status_str(LV_ERR_NOMEM), "LV_ERR_NOMEM");
    lv_error_clear();
    assert_string_equal(lv_last_error(), "");
}

static void test_rng(void **state)
{
    (void)state;
    lv_rng a, b;
    lv_rng_seed(&a, 1234);
    lv_rng_seed(&b, 1234);
    for (int i = 0; i < 1000; i++) assert_true(lv_rng_u64(&a) == lv_rng_u64(&b));
    lv_rng_seed(&a, 7);
    double s = 0, s2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        float u = lv_rng_uniform(&a);
        assert_true(u >= 0.0f && u < 1.0f);
        float g = lv_rng_normal(&a);
        s += g;
        s2 += (double)g * g;
    }
    assert_true(s / n < 0.01 && s / n > -0.01);
    assert_true(s2 / n > 0.98 && s2 / n < 1.02);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_context),
        cmocka_unit_test(test_rng),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
