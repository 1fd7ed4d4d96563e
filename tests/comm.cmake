# comm/ under mpirun with 1, 2 and 3 ranks (oversubscribed on 2 cores).
add_executable(test_comm test_comm.c)
target_link_libraries(test_comm PRIVATE llmvq_core)
foreach(np 1 2 3)
  add_test(NAME test_comm_np${np}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_comm> ${MPIEXEC_POSTFLAGS})
  # Open MPI's dlopen'ed components leak by design and cannot be suppressed by
  # module name once unloaded: leak checking is off under mpirun (the non-MPI
  # tests keep it on).
  set_tests_properties(test_comm_np${np} PROPERTIES ENVIRONMENT "${LLMVQ_TEST_ENV};ASAN_OPTIONS=detect_leaks=0"
                       LABELS "mpi" TIMEOUT 120 PROCESSORS ${np})
endforeach()

# Device-buffer calls (NCCL and staged MPI) on 2 ranks; exits 77 without CUDA or a GPU.
add_executable(test_comm_dev test_comm_dev.c)
target_link_libraries(test_comm_dev PRIVATE llmvq_core)
add_test(NAME test_comm_dev_np2
         COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 ${MPIEXEC_PREFLAGS}
                 $<TARGET_FILE:test_comm_dev> ${MPIEXEC_POSTFLAGS})
set_tests_properties(test_comm_dev_np2 PROPERTIES ENVIRONMENT "${LLMVQ_TEST_ENV};ASAN_OPTIONS=detect_leaks=0"
                     LABELS "gpu;mpi" TIMEOUT 120 PROCESSORS 2 SKIP_RETURN_CODE 77)
