#!/usr/bin/env bash
# Run bmx.train on every worker of a Cloud TPU VM slice (one process per host; JAX finds the pod).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type v5p-64 --config CONFIG [--project P]
#                     [--version tpu-ubuntu2204-base] [--create] [--dry-run] [-- key=value ...]
#
# --create makes the slice first (or reuses it when it exists); the local checkout is copied to
# every worker, installed, and the same `python -m bmx.train --config CONFIG` runs on all workers
# (`--worker=all`), their logs streamed here. --dry-run prints the gcloud commands instead.
set -euo pipefail

name="" zone="" accelerator="" config="" project="" version="tpu-ubuntu2204-base" create=0 dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) accelerator=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --create) create=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
for required in name zone accelerator config; do
  if [[ -z ${!required} ]]; then
    echo "error: --${required/accelerator/type} is required" >&2
    exit 2
  fi
done
if [[ ! -f $config ]]; then
  echo "error: config file '$config' not found" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
location=(--zone "$zone")
[[ -n $project ]] && location+=(--project "$project")

run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if ((create)); then
  if ((dry_run)) || ! "${gcloud_tpu[@]}" describe "$name" "${location[@]}" >/dev/null 2>&1; then
    run "${gcloud_tpu[@]}" create "$name" "${location[@]}" --accelerator-type "$accelerator" --version "$version"
  fi
fi

archive=/tmp/bmx-$$.tar.gz
run tar --exclude=.git --exclude=runs -czf "$archive" -C "$(git rev-parse --show-toplevel 2>/dev/null || pwd)" .
run "${gcloud_tpu[@]}" scp "$archive" "$name:~/bmx.tar.gz" "${location[@]}" --worker=all
setup='mkdir -p ~/bmx && tar -xzf ~/bmx.tar.gz -C ~/bmx && cd ~/bmx && pip install -q "jax[tpu]>=0.10,<0.11" -e ".[gcs]"'
run "${gcloud_tpu[@]}" ssh "$name" "${location[@]}" --worker=all --command "$setup"
train="cd ~/bmx && python -m bmx.train --config $(printf '%q' "$config")"
for override in "${overrides[@]+"${overrides[@]}"}"; do
  train+=" $(printf '%q' "$override")"
done
run "${gcloud_tpu[@]}" ssh "$name" "${location[@]}" --worker=all --command "$train"
