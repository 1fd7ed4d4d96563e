# PV-tuning of a whole quantized model (stages/pvtune.c): gradient check against a
# double-precision reference on stories260K, V/P steps, keep-best driver, determinism.
llmvq_add_test(NAME test_stage_pvtune SOURCES test_stage_pvtune.c LABELS unit)
# Data-parallel PV-tuning over 2 and 3 ranks: bit-identical to one rank.
add_executable(test_pvtune_dist test_pvtune_dist.c)
target_link_libraries(test_pvtune_dist PRIVATE llmvq_core)
target_include_directories(test_pvtune_dist PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
foreach(np 2 3)
  add_test(NAME test_pvtune_dist_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_pvtune_dist> ${MPIEXEC_POSTFLAGS})
  set_tests_properties(test_pvtune_dist_np${np} PROPERTIES
                       ENVIRONMENT "${LLMVQ_TEST_ENV};ASAN_OPTIONS=detect_leaks=0"
                       LABELS "mpi;unit" TIMEOUT 300 PROCESSORS ${np})
endforeach()
# The CUDA block forward/backward of PV-tuning against the CPU (skips without a GPU).
llmvq_add_test(NAME test_ft_grad_cuda SOURCES test_ft_grad_cuda.c LABELS gpu)
