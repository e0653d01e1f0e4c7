#!/usr/bin/env bash
# Create (or update in place) the work pools that infra/prefect.yaml deploys to, on the Prefect
# server at $PREFECT_API_URL:
#
#   infra/work-pools.sh process       # one machine: process pools; run `prefect worker start
#                                     # --pool <pool>` per pool, from a checkout or infra/compose.yaml
#   infra/work-pools.sh kubernetes    # a cluster: Kubernetes job pools; the expert pools request
#                                     # GPUs (infra/kubernetes/*.json); needs prefect-kubernetes
#                                     # where the workers run (the image has it)
#
# BTX_POOL_CONCURRENCY=N: flow runs at once per expert pool (process pools: default 1, one GPU).
# BTX_IMAGE=registry/btx-worker:tag sets the Kubernetes jobs' image (default btx-worker:latest).
# BTX_NAMESPACE=btx (the default) is the Kubernetes namespace of the jobs: the one that holds the
# store Secret, the pull secret and the worker's Role (docs/deploy.md, section 4).
# BTX_CACHE_CLAIM=btx-cache mounts that PersistentVolumeClaim (ReadWriteMany when a pool runs
# several jobs at once) at the jobs' /cache, the config's cache_dir, instead of an emptyDir.
# BTX_POOL_PREFIX=staging names the pools staging-control, staging-experts, ... (default btx),
# to keep several installs apart on one server; prefect.yaml names the default ones.
# BTX_EXPERT_POOLS="btx-h100 btx-a100" names the expert pools instead (one per GPU node class;
# add a train-expert deployment per pool in prefect.yaml). BTX_GPUS=8 makes 8 GPUs per branch the
# default of their `gpu_count` job variable (a branch with expert_training.nproc_per_node: auto
# trains on all of them under torchrun); a deployment or a run can still override it.
set -euo pipefail
kind=${1:-}
[[ $kind == process || $kind == kubernetes ]] || { echo "usage: $0 process|kubernetes" >&2; exit 2; }
: "${PREFECT_API_URL:?set PREFECT_API_URL to your Prefect server, e.g. http://127.0.0.1:4200/api}"
here=$(cd "$(dirname "$0")" && pwd)
prefix=${BTX_POOL_PREFIX:-btx}
# The project's virtualenv when there is one (a checkout after `make setup`), else what PATH has
# (the image, or a virtualenv you activated).
venv="$here/../.venv/bin"
if [[ -x $venv/prefect ]]; then default_prefect=$venv/prefect default_python=$venv/python
else default_prefect=prefect default_python=python3; fi
prefect=${PREFECT:-$default_prefect}
python=${PYTHON:-$default_python}
# Flow runs at once per expert pool: one per GPU a process pool's worker has (two branches on a
# one-GPU worker would share it and run out of memory). Kubernetes pools: no limit unless set
# (the cluster's GPUs and autoscaler decide). A run that waits for a slot stays Scheduled; the
# pipeline does not count that wait against orchestration.start_timeout_s.
slots=${BTX_POOL_CONCURRENCY:-}

control_pools=("$prefix-control")
if [[ -n ${BTX_EXPERT_POOLS:-} ]]; then
  read -r -a expert_pools <<<"$BTX_EXPERT_POOLS"
else
  expert_pools=("$prefix-experts" "$prefix-experts-2")
fi
gpus=${BTX_GPUS:-}
[[ -z $gpus || $gpus =~ ^[1-9][0-9]*$ ]] || { echo "BTX_GPUS must be a whole number >= 1, got '$gpus'" >&2; exit 2; }

namespace=${BTX_NAMESPACE:-btx}
[[ $namespace =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || { echo "BTX_NAMESPACE must be a Kubernetes namespace name, got '$namespace'" >&2; exit 2; }

# A copy of a job template with this install's settings filled in (the JSON in git keeps the
# defaults): the namespace, the image, GPUs per job, and the cache volume.
with_settings() {
  local out
  out=$(mktemp --suffix .json)
  "$python" - "$1" "$namespace" "${BTX_IMAGE:-}" "$gpus" "${BTX_CACHE_CLAIM:-}" "$out" <<'PY'
import json, sys
template, namespace, image, gpus, claim, out = sys.argv[1:]
data = json.load(open(template))
properties = data["variables"]["properties"]
properties["namespace"]["default"] = namespace
if image:
    properties["image"]["default"] = image
if gpus and "gpu_count" in properties:
    properties["gpu_count"]["default"] = int(gpus)
if claim:  # the cache on a claim: the node's disk holds only the scratch volume
    pod = data["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (cache,) = [v for v in pod["volumes"] if v["name"] == "cache"]
    cache.clear()
    cache.update(name="cache", persistentVolumeClaim={"claimName": "{{ cache_claim }}"})
    cache_size = properties.pop("cache_size")["default"]
    properties["cache_claim"] = {
        "title": "Cache Claim", "type": "string", "default": claim,
        "description": "The PersistentVolumeClaim mounted at /cache, the config's cache_dir (BTX_CACHE_DIR)."}
    # A request that reserved node disk for the cache too no longer does.
    request, scratch = properties["ephemeral_storage_request"], properties["scratch_size"]["default"]
    gib = lambda quantity: int(quantity[:-2]) if quantity and quantity.endswith("Gi") else None
    sizes = [gib(q) for q in (request["default"], scratch, cache_size)]
    if None not in sizes and sizes[0] == sizes[1] + sizes[2]:
        request["default"] = scratch
json.dump(data, open(out, "w"), indent=2)
PY
  echo "$out"
}

create() {  # pool type [template]
  local args=("$1" --type "$2" --overwrite)
  [[ -n ${3:-} ]] && args+=(--base-job-template "$3")
  "$prefect" --no-prompt work-pool create "${args[@]}"
}

limit() {  # pool slots
  if [[ -n $2 ]]; then "$prefect" --no-prompt work-pool set-concurrency-limit "$1" "$2"
  else "$prefect" --no-prompt work-pool clear-concurrency-limit "$1" >/dev/null; fi
}

case $kind in
  process)
    for pool in "${control_pools[@]}" "${expert_pools[@]}"; do create "$pool" process; done
    for pool in "${expert_pools[@]}"; do limit "$pool" "${slots:-1}"; done
    ;;
  kubernetes)
    cpu=$(with_settings "$here/kubernetes/control-job-template.json")
    gpu=$(with_settings "$here/kubernetes/gpu-job-template.json")
    trap 'rm -f "$cpu" "$gpu"' EXIT
    for pool in "${control_pools[@]}"; do create "$pool" kubernetes "$cpu"; done
    for pool in "${expert_pools[@]}"; do create "$pool" kubernetes "$gpu"; limit "$pool" "$slots"; done
    ;;
esac

# Next: `prefect deploy --all --prefect-file infra/prefect.yaml`, then
# `python -m flows.automations --within 300`: the automations that crash a lost node's runs and
# reschedule a crashed pipeline run are scoped to the deployments, so they come after the deploy.
