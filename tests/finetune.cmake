# Block fine-tuning (stages/finetune.c, stages/finetune_grad.c).
llmvq_add_test(NAME test_stage_finetune SOURCES test_stage_finetune.c LABELS unit)
