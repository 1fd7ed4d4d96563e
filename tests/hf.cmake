# Hugging Face AQLM export/import (io/export_hf_aqlm.c, io/import_hf_aqlm.c).
llmvq_add_test(NAME test_hf_aqlm SOURCES test_hf_aqlm.c LABELS unit)
# Helper of hf_aqlm_transformers.sh: synthetic quantized models, llmvq's logits.
add_executable(hf_aqlm_logits hf_aqlm_logits.c)
target_link_libraries(hf_aqlm_logits PRIVATE llmvq_core)
# Quantize stories260K (g 4), export, eval the export: same ppl within fp16 rounding.
llmvq_add_script_test(NAME hf_aqlm_export LABELS "cli;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/hf_aqlm_export.sh)
# transformers + aqlm load our exports and agree on the logits; skipped (77)
# when $LLMVQ_PYTHON (default python3) lacks torch, transformers or aqlm.
llmvq_add_script_test(NAME hf_aqlm_transformers LABELS "cli;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  "LLMVQ_HF_LOGITS=$<TARGET_FILE:hf_aqlm_logits>"
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/hf_aqlm_transformers.sh)
