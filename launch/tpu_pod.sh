#!/usr/bin/env bash
# Trains with jaxdiff on a Cloud TPU pod slice: one process per TPU VM worker, all started with
# `gcloud ... ssh --worker=all`; `jaxdiff train --distributed` calls jax.distributed.initialize(),
# which finds the other workers from the TPU metadata (JAX's own multi-controller runtime).
#
#   launch/tpu_pod.sh create                 # create the slice (once)
#   launch/tpu_pod.sh install                # copy this checkout to every worker, pip install
#   launch/tpu_pod.sh train --config configs/cifar10_dit.py --workdir /mnt/shared/runs/dit
#   launch/tpu_pod.sh ssh 'tail -n 3 /mnt/shared/runs/dit/metrics.jsonl'   # any command
#   launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME (jaxdiff), TPU_ZONE (us-central2-b), TPU_TYPE (v4-32),
# TPU_VERSION (tpu-ubuntu2204-base), TPU_PROJECT (gcloud's default), TPU_SPOT=1 for spot
# capacity. DRY_RUN=1 prints the gcloud commands instead of running them.
#
# --workdir must be one directory that every worker sees (Filestore/NFS, or a bucket mounted with
# gcsfuse): checkpoints are written by all workers together and resumed from there, so a
# preempted slice restarts with the same `train` command. Data: --config.data.data_dir on the
# same shared storage (TFDS array_record files).
set -euo pipefail

name=${TPU_NAME:-jaxdiff}
zone=${TPU_ZONE:-us-central2-b}
type=${TPU_TYPE:-v4-32}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
remote_dir=${TPU_REMOTE_DIR:-jaxdiff}
here=$(cd "$(dirname "$0")/.." && pwd)

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="$zone")
  [ -z "${TPU_PROJECT:-}" ] || args+=(--project="$TPU_PROJECT")
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${args[@]}"; echo; else "${args[@]}"; fi
}

on_all_workers() {  # runs one shell command on every worker at once
  gcloud_tpu ssh "$name" --worker=all --command="$1"
}

quoted() { printf ' %q' "$@"; }

command=${1:-}
[ $# -eq 0 ] || shift
case "$command" in
  create)
    spot=(); [ -z "${TPU_SPOT:-}" ] || spot=(--spot)
    gcloud_tpu create "$name" --accelerator-type="$type" --version="$version" "${spot[@]}"
    ;;
  install)
    # A clean copy of the checkout (tracked files only), then jax with TPU support + jaxdiff.
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$here" archive --format=tar.gz -o "$archive" HEAD
    gcloud_tpu scp "$archive" "$name:jaxdiff.tar.gz" --worker=all
    rm -f "$archive"
    on_all_workers "set -e; mkdir -p $remote_dir && tar -xzf jaxdiff.tar.gz -C $remote_dir && \
cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q 'jax[tpu]' -e ."
    ;;
  train)
    on_all_workers "cd $remote_dir && .venv/bin/jaxdiff train --distributed$(quoted "$@")"
    ;;
  ssh)
    on_all_workers "cd $remote_dir && ${1:?usage: launch/tpu_pod.sh ssh 'COMMAND'}"
    ;;
  delete)
    gcloud_tpu delete "$name" --quiet
    ;;
  *)
    echo "launch/tpu_pod.sh: unknown command '${command}'; allowed: create, install, train," \
      "ssh, delete" >&2
    exit 2
    ;;
esac
