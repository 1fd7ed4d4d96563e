/* fuzz_llama2c.c: libFuzzer harness for the llama2.c .bin loader.
 *
 * Binds arbitrary bytes as a checkpoint with io_llama2c_bind() (header checks,
 * exact size, NaN scan over every tensor); on success reads the first and last
 * value of each tensor through the model's pointers. Build as fuzz_safetensors.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io_impl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* libFuzzer's buffer is malloc'ed (aligned); copy anyway so that the float
     * pointers into it are 4-aligned whatever the fuzzer does. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    lv_model *m = NULL;
    if (io_llama2c_bind(&m, buf, size, "fuzz.bin") == LV_OK) {
        int n = io_tensor_count(&m->cfg);
        io_tensor_ref *refs = calloc((size_t)n, sizeof *refs);
        volatile float sink = 0;
        if (refs) {
            io_tensor_list(&m->cfg, refs, IO_NAMES_LLAMA2C);
            for (int i = 0; i < n; i++) {
                const float *x = io_model_tensor(m, refs[i].kind, refs[i].layer);
                sink += x[0] + x[io_tensor_numel(&refs[i]) - 1];
            }
        }
        sink += m->wcls[0];
        (void)sink;
        free(refs);
        io_model_free(m);
    }
    free(buf);
    return 0;
}
