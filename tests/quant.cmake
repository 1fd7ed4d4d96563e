# Layer-wise quantization numerics: kernels (quant_ref.c), VQ init, AQLM.
llmvq_add_test(NAME test_kern_quant SOURCES test_kern_quant.c LABELS unit)
llmvq_add_test(NAME test_stage_vq SOURCES test_stage_vq.c LABELS unit)
llmvq_add_test(NAME test_stage_aqlm SOURCES test_stage_aqlm.c LABELS unit)
llmvq_add_test(NAME test_stage_aqlm_shared SOURCES test_stage_aqlm_shared.c LABELS unit)
# Outlier columns (stages/outliers.c): exact corrections, greedy choice, kernels, file.
llmvq_add_test(NAME test_stage_outliers SOURCES test_stage_outliers.c LABELS unit)
