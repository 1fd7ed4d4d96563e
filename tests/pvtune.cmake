# PV-tuning of a whole quantized model (stages/pvtune.c): gradient check against a
# double-precision reference on stories260K, V/P steps, keep-best driver, determinism.
llmvq_add_test(NAME test_stage_pvtune SOURCES test_stage_pvtune.c LABELS unit)
