# XLA / NCCL environment for training on NVIDIA GPUs. Source it: `source launch/gpu_env.sh`.
# Env only, no logic. Flags follow the JAX GPU performance tips (docs.jax.dev/en/latest/
# gpu_performance_tips.html) and NVIDIA JAX-Toolbox's GPU_performance.md; an XLA flag unknown to
# the installed jaxlib aborts start-up, so each one below was checked against jaxlib 0.10.2.
# Sizes: one Llama-2-7B layer is 202M parameters = 0.81 GB in fp32 (what FSDP gathers and
# reduce-scatters: parameters and gradients are fp32); one 70B layer sharded 8-way over
# `tensor` is 0.43 GB. The combine thresholds (1 GiB) hold one such layer's collectives.

export XLA_FLAGS="${XLA_FLAGS:-} \
 --xla_gpu_enable_latency_hiding_scheduler=true \
 --xla_gpu_enable_highest_priority_async_stream=true \
 --xla_gpu_enable_pipelined_all_gather=true \
 --xla_gpu_enable_pipelined_reduce_scatter=true \
 --xla_gpu_enable_pipelined_all_reduce=true \
 --xla_gpu_enable_while_loop_double_buffering=true \
 --xla_gpu_all_gather_combine_threshold_bytes=1073741824 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=1073741824 \
 --xla_gpu_all_reduce_combine_threshold_bytes=1073741824 \
 --xla_gpu_enable_all_gather_combine_by_dim=false \
 --xla_gpu_enable_reduce_scatter_combine_by_dim=false \
 --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,CUBLAS,CUDNN \
 --xla_gpu_enable_nccl_comm_splitting=true"
# Why each XLA flag:
#   latency_hiding_scheduler      schedule collectives early/late so they overlap with compute
#   highest_priority_async_stream collectives run on a high-priority stream: not starved by matmuls
#   pipelined_all_gather          FSDP: gather layer i+1's weights inside the scan while layer i computes
#   pipelined_reduce_scatter      FSDP: reduce-scatter layer i's gradients while layer i-1's backward runs
#   pipelined_all_reduce          data parallel: same overlap for gradient all-reduces in the layer scan
#   while_loop_double_buffering   unroll the layer scan x2 so the pipelined collectives have a slot to overlap
#   *_combine_threshold_bytes     merge a layer's per-tensor collectives into one (1 GiB >= one layer)
#   *_combine_by_dim=false        combine collectives even when they gather along different dims
#   command_buffer                record fusions, cuBLAS/cuDNN calls as CUDA graphs: less launch overhead
#   nccl_comm_splitting           build sub-communicators (per mesh axis) by splitting, not from scratch

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"  # room for XLA; rest for cuDNN/NCCL
export CUDA_DEVICE_MAX_CONNECTIONS=1   # one hardware queue: kernels run in the order the scheduler chose
export NCCL_PROTO=SIMPLE,LL,LL128      # allow NCCL's low-latency protocols (small, latency-bound messages)
export NCCL_LL128_BUFFSIZE=-2          # JAX-Toolbox setting for LL128 buffers (best measured there)
export NCCL_LL_BUFFSIZE=-2             # JAX-Toolbox setting for LL buffers
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-1}"  # NVLink SHARP all-reduce on H100 NVSwitch systems
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"  # keep XLA's info logs out of the run log
