# Kernels: CPU reference ops, the batched forward and KV-cache decoding, and the
# CUDA backend against the CPU one (label gpu; exits 77 = skipped without a device).
llmvq_add_test(NAME test_kern_ops SOURCES test_kern_ops.c LABELS unit)
llmvq_add_test(NAME test_kern_forward SOURCES test_kern_forward.c LABELS unit)
llmvq_add_test(NAME test_kern_cuda SOURCES test_kern_cuda.c LABELS gpu)
llmvq_add_test(NAME test_kern_quant_cuda SOURCES test_kern_quant_cuda.c LABELS gpu)
llmvq_add_test(NAME test_kern_qmm SOURCES test_kern_qmm.c LABELS unit)
llmvq_add_test(NAME test_kern_qmm_cuda SOURCES test_kern_qmm_cuda.c LABELS gpu)
llmvq_add_test(NAME test_kern_qmm_forward SOURCES test_kern_qmm_forward.c LABELS unit)
