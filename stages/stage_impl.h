/* stage_impl.h: private to stages/ (no public header includes it).
 *
 * stage_qprob is one layer-wise quantization problem with the input dimension
 * padded to a multiple of the group size g (the padding rule of
 * docs/quant-numerics.md): W (d_out, d_pad) with zero padded columns, H
 * (d_pad, d_pad) with zero padded rows and columns. When g divides d_in the
 * caller's arrays are borrowed, otherwise padded copies are owned. */
#ifndef STAGE_IMPL_H
#define STAGE_IMPL_H

#include <stdint.h>

#include "stage.h"

typedef struct {
    int64_t d_out, d_in, d_pad, n_groups;
    int g;
    const float *W; /* (d_out, d_pad) */
    const float *H; /* (d_pad, d_pad) */
    float *W_own;   /* owned padded copies (NULL when borrowed) */
    float *H_own;
} stage_qprob;

/* Validate shapes and build the padded problem. Free with stage_qprob_free. */
lv_status stage_qprob_init(stage_qprob *p, const float *W, const float *H, int64_t d_out,
                           int64_t d_in, int g);
void stage_qprob_free(stage_qprob *p);

/* Check that L matches p (shape and group size). */
lv_status stage_qprob_check_layer(const stage_qprob *p, const stage_aqlm_layer *L);

/* VQ init on a padded problem into an initialised layer L (M, nbits, g from L). */
lv_status stage_vq_init_prob(const stage_qprob *p, const stage_vq_config *cfg,
                             stage_aqlm_layer *L);

#endif
