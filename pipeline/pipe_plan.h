/* pipe_plan.h: helpers shared by `llmvq quantize` and `llmvq plan`. */
#ifndef PIPE_PLAN_H
#define PIPE_PLAN_H

#include <stdint.h>

/* Blocks [*first, *last) of rank `rank` of `size`: contiguous shards of equal
 * cost (every block of a LLaMA model has the same shapes); docs/pipeline.md.
 * The one definition of the shard map: quantize and plan must agree. */
static inline void pipe_shard_of(int n_layers, int rank, int size, int *first, int *last)
{
    *first = (int)((int64_t)n_layers * rank / size);
    *last = (int)((int64_t)n_layers * (rank + 1) / size);
}

#endif
