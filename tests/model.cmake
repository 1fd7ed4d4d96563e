# Cross-module model tests: loaders + forward on the real stories260K.
llmvq_add_test(NAME test_model_logits SOURCES test_model_logits.c LABELS unit)
