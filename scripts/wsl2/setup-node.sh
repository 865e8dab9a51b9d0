#!/usr/bin/env bash
# Make a WSL2 distribution (Ubuntu 22.04/24.04, systemd on) a gpujobs GPU node, once it has
# joined the cluster as a node (kubeadm join, k3s agent, ...): checks the GPU as WSL2 exposes it,
# installs the NVIDIA container toolkit 1.18.1 (pinned and held), registers its `nvidia` runtime
# in containerd (not as the default: the GPU pods name RuntimeClass nvidia), and labels the node
# node-role.kubernetes.io/worker-gpu=true. Safe to run again: each step checks first and does
# only what is missing.
#
#   sudo scripts/wsl2/setup-node.sh [--dry-run] [--node NAME] [--no-label]
#
#   --dry-run   check everything, change nothing: print each command that would change the host
#   --node      the node's name in the cluster (default: this host's name)
#   --no-label  do not label (print the command to run where kubectl has admin rights)
#
# Environment (defaults in brackets): WSL_LIB_DIR [/usr/lib/wsl/lib], DXG [/dev/dxg],
# PROC_SWAPS [/proc/swaps], WSL_CONF [/etc/wsl.conf], CONTAINERD_CONFIG
# [/etc/containerd/config.toml; k3s: /var/lib/rancher/k3s/agent/etc/containerd/config.toml],
# KUBECTL [kubectl]. Exit status: 0 done (or would be), 1 a check failed (the line says which).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TOOLKIT_VERSION=1.18.1-1
TOOLKIT_PACKAGES=(nvidia-container-toolkit nvidia-container-toolkit-base libnvidia-container-tools
  libnvidia-container1)
KEYRING=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
APT_LIST=/etc/apt/sources.list.d/nvidia-container-toolkit.list
REPO_URL=https://nvidia.github.io/libnvidia-container
GPU_LABEL=node-role.kubernetes.io/worker-gpu
# What ffmpeg and the driver need from the Windows driver (lib/ of /usr/lib/wsl).
WSL_LIBS=(libcuda.so.1 libnvidia-ml.so.1 libnvidia-encode.so.1 libnvcuvid.so.1 nvidia-smi)

WSL_LIB_DIR=${WSL_LIB_DIR:-/usr/lib/wsl/lib}
DXG=${DXG:-/dev/dxg}
PROC_SWAPS=${PROC_SWAPS:-/proc/swaps}
WSL_CONF=${WSL_CONF:-/etc/wsl.conf}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
KUBECTL=${KUBECTL:-kubectl}
NODE=$(hostname)
LABEL=1

while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --node) [ $# -ge 2 ] || die "--node needs a name"; NODE=$2; shift ;;
    --no-label) LABEL=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

if [ "$DRY_RUN" != 1 ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0), or with --dry-run to see what it would do"
fi

# --- Checks: the GPU as WSL2 exposes it -------------------------------------------------------

[ -e "$DXG" ] || die "no $DXG: not WSL2 with GPU support (update WSL: wsl --update, and the \
Windows NVIDIA driver)"
missing=()
for lib in "${WSL_LIBS[@]}"; do
  [ -e "$WSL_LIB_DIR/$lib" ] || missing+=("$lib")
done
[ ${#missing[@]} -eq 0 ] || die "missing in $WSL_LIB_DIR: ${missing[*]} (the Windows NVIDIA \
driver provides them: install or update it on the Windows side)"
log "GPU: $DXG and ${WSL_LIBS[*]} in $WSL_LIB_DIR"
if [ "$(tail -n +2 "$PROC_SWAPS" | grep -c .)" != 0 ]; then
  die "swap is on: the kubelet refuses it. Set swap=0 under [wsl2] in %UserProfile%\\.wslconfig \
(scripts/wsl2/.wslconfig), then wsl --shutdown"
fi

# --- systemd (containerd and the kubelet are services) -----------------------------------------

if grep -qs '^[[:space:]]*systemd[[:space:]]*=[[:space:]]*true' "$WSL_CONF"; then
  log "systemd: on in $WSL_CONF"
else
  printf '[boot]\nsystemd=true\n' | write_file "$WSL_CONF" --append
  log "systemd: turned on in $WSL_CONF; run wsl --shutdown, start the distribution, run this again"
  [ "$DRY_RUN" = 1 ] || exit 0
fi

# --- The NVIDIA container toolkit, pinned ---------------------------------------------------------

installed=$(dpkg-query -W -f='${Version}' nvidia-container-toolkit 2>/dev/null || true)
if [ "$installed" = "$TOOLKIT_VERSION" ]; then
  log "container toolkit: $TOOLKIT_VERSION installed"
else
  log "container toolkit: ${installed:-none} installed; installing $TOOLKIT_VERSION"
  if [ ! -s "$KEYRING" ]; then
    key=${TMPDIR:-/tmp}/nvidia-container-toolkit-gpgkey.$$
    run curl -fsSL -o "$key" "$REPO_URL/gpgkey"
    run gpg --batch --yes --dearmor -o "$KEYRING" "$key"
    run rm -f "$key"
  fi
  # $(ARCH) is apt's, expanded by apt itself.
  # shellcheck disable=SC2016
  printf 'deb [signed-by=%s] %s/stable/deb/$(ARCH) /\n' "$KEYRING" "$REPO_URL" \
    | write_file "$APT_LIST"
  run apt-get update
  pinned=()
  for package in "${TOOLKIT_PACKAGES[@]}"; do pinned+=("$package=$TOOLKIT_VERSION"); done
  run apt-get install -y --allow-change-held-packages "${pinned[@]}"
  run apt-mark hold "${TOOLKIT_PACKAGES[@]}"
fi

# --- containerd: the `nvidia` runtime beside runc (not the default) ---------------------------------

if command -v containerd >/dev/null; then
  version=$(containerd --version | grep -o ' v\{0,1\}[0-9][0-9.]*' | head -1 | tr -d ' v')
  if [ "${version%%.*}" -lt 2 ]; then
    log "warning: containerd $version: the wsl2 overlay's recursiveReadOnly mount needs 2.0 or later"
  fi
elif [ "$DRY_RUN" != 1 ]; then
  die "no containerd: join the node to the cluster first (kubeadm, k3s), then run this again"
else
  log "containerd: not found (needed before a real run)"
fi
if grep -qs 'runtimes\.["]\{0,1\}nvidia["]\{0,1\}\]' "$CONTAINERD_CONFIG"; then
  log "containerd: runtime nvidia already in $CONTAINERD_CONFIG"
else
  run nvidia-ctk runtime configure --runtime=containerd --config="$CONTAINERD_CONFIG"
  run systemctl restart containerd
fi

# --- The label the GPU pods select --------------------------------------------------------------

label=("$KUBECTL" label node "$NODE" "$GPU_LABEL=true" --overwrite)
if [ "$LABEL" = 0 ]; then
  log "label: not done; where kubectl has admin rights run: ${label[*]}"
elif ! command -v "$KUBECTL" >/dev/null || ! "$KUBECTL" get node "$NODE" >/dev/null 2>&1; then
  # A kubelet may not set node-role.kubernetes.io/ labels on its own node (NodeRestriction).
  log "label: cannot reach node $NODE with $KUBECTL here; where kubectl has admin rights run:"
  log "  ${label[*]}"
else
  run "${label[@]}"
fi
log "done. Next: scripts/wsl2/install-device-plugin.sh, then scripts/wsl2/smoke-test.sh --node $NODE"
