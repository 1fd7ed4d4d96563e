llmvq_add_test(NAME test_job SOURCES test_job.c LABELS unit)
