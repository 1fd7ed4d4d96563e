# Tokenizer, token files, perplexity evaluation and generation.
llmvq_add_test(NAME test_tokenizer SOURCES test_tokenizer.c LABELS unit)
