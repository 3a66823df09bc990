#!/usr/bin/env bash
# Multi-host TPU VM slice: run the same command on every worker; JAX discovers the slice
# topology and the coordinator itself, so no distributed flags are needed.
#   launch/tpu_pod.sh my-tpu-v5p-128 us-east5-a configs/meditron_70b.gin gs://bucket/runs/m70b [train args]
# (the workdir should be on shared storage such as GCS so all hosts write one checkpoint.)
set -euo pipefail
TPU=${1:?usage: tpu_pod.sh TPU_NAME ZONE GIN_FILE WORKDIR [train args]}
ZONE=${2:?}; GIN_FILE=${3:?}; WORKDIR=${4:?}; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/meditron-jax && meditron-jax train --gin_file $GIN_FILE --workdir $WORKDIR $*"
