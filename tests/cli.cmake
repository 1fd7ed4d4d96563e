# Shell-level tests of the llmvq program (CLI contract, error messages, golden values).
llmvq_add_script_test(NAME cli_bad_inputs LABELS cli
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/cli_bad_inputs.sh)
llmvq_add_script_test(NAME cli_golden LABELS cli
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/cli_golden.sh)
