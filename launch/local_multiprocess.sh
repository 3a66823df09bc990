#!/usr/bin/env bash
# N JAX processes on this machine (CPU, gloo collectives), for testing the multi-host path:
#   launch/local_multiprocess.sh 2 -- meditron-jax train --gin_file configs/tiny.gin --workdir runs/mp \
#       --gin_param mesh.data=2 --gin_param mesh.stage=2 --gin_param mesh.tensor=2 \
#       --gin_param train.micro_batch_size=1
# is the tiny model with pipeline stages spanning the two processes (each process holds one stage of
# both data-parallel groups): global batch 8 = micro 1 x data 2 x 4 pipeline micro-batches. (tiny.gin's
# own mesh, data over all 8 devices, needs global 8 = micro 4 x 8: add train.micro_batch_size=1.)
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (default 4) and the flags
# --coordinator_address/--num_processes/--process_id appended. Exits with the first failure.
set -euo pipefail
N=${1:?usage: local_multiprocess.sh N -- CMD...}; shift
[ "${1:-}" = "--" ] && shift
PORT=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
pids=()
for ((i = 0; i < N; i++)); do
  "$@" --coordinator_address "localhost:${PORT}" --num_processes "$N" --process_id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
