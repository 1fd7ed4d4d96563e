llmvq_add_test(NAME test_h5 SOURCES test_h5.c LABELS unit)
