/* lv_model.c: model-config arithmetic. */
#include "lv_model.h"

int64_t lv_cfg_n_params(const lv_model_config *c)
{
    int64_t dim = c->dim, hid = c->hidden_dim, kv = lv_cfg_kv_dim(c);
    int64_t per_layer = 2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * dim * hid;
    int64_t n = (int64_t)c->vocab_size * dim + (int64_t)c->n_layers * per_layer + dim;
    if (!c->tied_cls) n += (int64_t)c->vocab_size * dim;
    return n;
}
