# Tokenizer, token files, perplexity evaluation and generation.
llmvq_add_test(NAME test_tokenizer SOURCES test_tokenizer.c LABELS unit)
# The golden perplexity runs the whole 235K-token text: ~40 s in Release on one
# thread, ~10x that under the sanitizers.
llmvq_add_test(NAME test_eval SOURCES test_eval.c LABELS "unit;slow" TIMEOUT 900)
