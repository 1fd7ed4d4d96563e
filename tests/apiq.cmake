# ApiQ LoRA initialisation (stages/apiq.c), adapters in model.h5 / block
# checkpoints (io/h5model.c) and the PEFT export (io/export_peft_lora.c).
llmvq_add_test(NAME test_apiq SOURCES test_apiq.c LABELS unit)
# PEFT loads the peft-lora export onto `convert --no-lora`'s HF base and gives
# llmvq's logits (tools/peft_check.py); skipped (77) without torch/transformers/peft.
llmvq_add_script_test(NAME peft_lora_load LABELS "cli" ENV ${LLMVQ_MPI_ASAN_ENV}
  "LLMVQ_HF_LOGITS=$<TARGET_FILE:hf_aqlm_logits>"
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/peft_lora_load.sh)
