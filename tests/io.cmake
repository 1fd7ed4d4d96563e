llmvq_add_test(NAME test_io SOURCES test_io.c LABELS unit)
