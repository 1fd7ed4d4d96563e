# One codebook tensor for every linear (quant.share_codebooks = model): joint
# fine-tuning (stages/finetune_shared.c) and the model file storing it once.
llmvq_add_test(NAME test_shared_codebooks SOURCES test_shared_codebooks.c LABELS unit)
