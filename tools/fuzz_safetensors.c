/* fuzz_safetensors.c: libFuzzer harness for the safetensors header parser.
 *
 * Feeds arbitrary bytes to io_st_parse(); on success converts every tensor of a
 * supported dtype, which reads exactly the bytes the header claims. Any read
 * past the input is an ASan report. Build and run (docs/formats-models.md):
 *   CC=clang cmake -S . -B build-fuzz -DLLMVQ_FUZZ=ON -DLLMVQ_CUDA=OFF -DLLMVQ_TESTS=OFF
 *   cmake --build build-fuzz --target fuzz_safetensors
 *   build-fuzz/fuzz_safetensors -max_total_time=60 CORPUS_DIR */
#include <stdint.h>
#include <stdlib.h>

#include "io_impl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    io_st_header h;
    if (io_st_parse(&h, data, size, "fuzz.safetensors") != LV_OK) return 0;
    for (int i = 0; i < h.n; i++) {
        const io_st_tensor *t = &h.t[i];
        if (t->dtype == IO_DT_OTHER || t->numel > (1 << 22)) continue;
        if (io_st_find(&h, t->name) == NULL) abort(); /* every parsed name is findable */
        float *dst = malloc((size_t)(t->numel ? t->numel : 1) * sizeof(float));
        if (!dst) continue;
        if (io_st_to_f32(t, data, dst, "fuzz.safetensors") != LV_OK) abort();
        free(dst);
    }
    io_st_header_free(&h);
    return 0;
}
