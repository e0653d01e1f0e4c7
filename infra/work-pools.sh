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
# BTX_IMAGE=registry/btx-worker:tag sets the Kubernetes jobs' image (default btx-worker:latest).
# BTX_POOL_PREFIX=staging names the pools staging-control, staging-experts, ... (default btx),
# to keep several installs apart on one server; prefect.yaml names the default ones.
set -euo pipefail
kind=${1:-}
[[ $kind == process || $kind == kubernetes ]] || { echo "usage: $0 process|kubernetes" >&2; exit 2; }
: "${PREFECT_API_URL:?set PREFECT_API_URL to your Prefect server, e.g. http://127.0.0.1:4200/api}"
here=$(cd "$(dirname "$0")" && pwd)
prefix=${BTX_POOL_PREFIX:-btx}
prefect=${PREFECT:-prefect}
python=${PYTHON:-python3}

control_pools=("$prefix-control")
expert_pools=("$prefix-experts" "$prefix-experts-2")

# A copy of a job template with the image filled in (the JSON in git keeps the default).
with_image() {
  local out
  out=$(mktemp --suffix .json)
  "$python" - "$1" "${BTX_IMAGE:-}" "$out" <<'PY'
import json, sys
template, image, out = sys.argv[1], sys.argv[2], sys.argv[3]
data = json.load(open(template))
if image:
    data["variables"]["properties"]["image"]["default"] = image
json.dump(data, open(out, "w"), indent=2)
PY
  echo "$out"
}

create() {  # pool type [template]
  local args=("$1" --type "$2" --overwrite)
  [[ -n ${3:-} ]] && args+=(--base-job-template "$3")
  "$prefect" --no-prompt work-pool create "${args[@]}"
}

case $kind in
  process)
    for pool in "${control_pools[@]}" "${expert_pools[@]}"; do create "$pool" process; done
    ;;
  kubernetes)
    cpu=$(with_image "$here/kubernetes/control-job-template.json")
    gpu=$(with_image "$here/kubernetes/gpu-job-template.json")
    trap 'rm -f "$cpu" "$gpu"' EXIT
    for pool in "${control_pools[@]}"; do create "$pool" kubernetes "$cpu"; done
    for pool in "${expert_pools[@]}"; do create "$pool" kubernetes "$gpu"; done
    ;;
esac
