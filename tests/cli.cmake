# Shell-level tests of the llmvq program (CLI contract, error messages, golden values).
llmvq_add_script_test(NAME cli_bad_inputs LABELS cli
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/cli_bad_inputs.sh)
llmvq_add_script_test(NAME cli_golden LABELS "cli;slow"
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/cli_golden.sh)
llmvq_add_script_test(NAME quantize_smoke LABELS cli ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_smoke.sh)
llmvq_add_script_test(NAME quantize_e2e LABELS "cli;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_e2e.sh)
llmvq_add_script_test(NAME quantize_4bit LABELS "cli;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_4bit.sh)
llmvq_add_script_test(NAME quantize_ranks LABELS "cli;mpi" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_ranks.sh)
llmvq_add_script_test(NAME quantize_resume LABELS "cli;mpi;slow" TIMEOUT 900 ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_resume.sh)
llmvq_add_script_test(NAME quantize_damage LABELS cli ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_damage.sh)
# A real one-node Slurm cluster (tools/slurm-local.sh): USR1 -> exit 75 -> requeue -> resume.
llmvq_add_script_test(NAME slurm_requeue LABELS "slurm;slow" TIMEOUT 900 ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/slurm_requeue.sh)
llmvq_add_script_test(NAME plan LABELS cli ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/plan.sh)
llmvq_add_script_test(NAME quantize_shared LABELS "cli;mpi" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_shared.sh)
llmvq_add_script_test(NAME quantize_patience LABELS "cli;mpi;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_patience.sh)
llmvq_add_script_test(NAME quantize_apiq LABELS "cli;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_apiq.sh)
# PV-tuning in quantize: 2 ranks byte-identical, kill -9 / SIGTERM / corrupt state resume
# (slow: 9 runs; under ASan the PV code runs in test_stage_pvtune, test_pvtune_dist, test_h5).
llmvq_add_script_test(NAME quantize_pv LABELS "cli;mpi;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_pv.sh)
llmvq_add_script_test(NAME quantize_outliers LABELS "cli;mpi;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_outliers.sh)
# The ~4-bit quality target end to end (PV-tuning included): ~6 minutes.
llmvq_add_script_test(NAME quantize_4bit_pv LABELS "cli;slow" TIMEOUT 1200 ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_4bit_pv.sh)
llmvq_add_script_test(NAME quantize_shared_type LABELS "cli;mpi;slow" ENV ${LLMVQ_MPI_ASAN_ENV}
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/scripts/quantize_shared_type.sh)
