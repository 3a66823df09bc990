#!/usr/bin/env bash
# Multi-host TPU VM slice: run the same command on every worker. Each worker finds the slice
# itself (meditron_jax/distributed/environment.py: TPU chips on this host, so it calls
# jax.distributed.initialize() with no arguments and JAX reads the workers, this worker's index
# and the coordinator from the TPU metadata), so no distributed flags are needed.
#   launch/tpu_pod.sh my-tpu-v5p-128 us-east5-a configs/meditron_70b.gin gs://bucket/runs/m70b \
#       --gin_param "train.init_from='gs://bucket/ckpt/llama2-70b'"
# (the workdir should be on shared storage such as GCS so all hosts write one checkpoint.)
# The train arguments reach the workers word for word (quoted for the remote shell here).
# MEDITRON_JAX_DIR: the checkout on the workers (default ~/meditron-jax).
set -euo pipefail
usage="usage: tpu_pod.sh TPU_NAME ZONE GIN_FILE WORKDIR [train args]"
TPU=${1:?$usage}; ZONE=${2:?$usage}; GIN_FILE=${3:?$usage}; WORKDIR=${4:?$usage}; shift 4
remote="cd ${MEDITRON_JAX_DIR:-~/meditron-jax} && meditron-jax train"
for arg in --gin_file "$GIN_FILE" --workdir "$WORKDIR" "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote"
