# ApiQ LoRA initialisation (stages/apiq.c), adapters in model.h5 / block
# checkpoints (io/h5model.c) and the PEFT export (io/export_peft_lora.c).
llmvq_add_test(NAME test_apiq SOURCES test_apiq.c LABELS unit)
