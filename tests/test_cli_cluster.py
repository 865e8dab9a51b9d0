"""`gpujobs cluster status|nodes|scale` as a process, against the real API server of
tests/k8s_cluster.py with k8s/ applied, and each bad input: no kubeconfig, a missing namespace,
scale to -1, no GPU nodes, an API server that refuses (RBAC, with its reason) or is not there.

Marked `k8s`; skipped, saying why, where the API server binaries or kubectl are missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from gpujobs import keys
from tests.k8s_cluster import (
    GPU_LABEL,
    GPU_NODES,
    NAMESPACE,
    UNLABELLED_NODE,
    Cluster,
    apply_app,
    wait_for,
)

client = pytest.importorskip("kubernetes.client", reason="the kubernetes client is a dependency")

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def applied(k8s_cluster: Cluster) -> Cluster:
    apply_app(k8s_cluster, "device-plugin")
    apply_app(k8s_cluster, "overlays/wsl2")
    return k8s_cluster


def gpujobs(
    *args: str, kubeconfig: Path | str | None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("GPUJOBS_", "KUBERNETES_"))}  # fmt: skip
    environment.update(COLUMNS="200", **env)
    if kubeconfig is not None:
        environment["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run([sys.executable, "-m", "gpujobs", "cluster", *args], env=environment,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def replicas(cluster: Cluster) -> int:
    apps = client.AppsV1Api(cluster.api())
    return int(apps.read_namespaced_deployment("gpujobs-vllm", NAMESPACE).spec.replicas)


def test_status_shows_gpu_nodes_pods_and_queue_depths(applied: Cluster, broker_url: str) -> None:
    server = redis.Redis.from_url(broker_url)
    server.rpush(keys.queue_lists("inference")[0], "a", "b")
    server.rpush(keys.queue_lists("inference")[3], "c")  # another priority: summed
    result = gpujobs("status", kubeconfig=applied.kubeconfig, GPUJOBS_BROKER_URL=broker_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for node in (*GPU_NODES, UNLABELLED_NODE):
        assert node in out
    assert f"{GPU_LABEL}=true" in out
    rows = [line for line in out.splitlines() if "gpujobs-worker-" in line]
    assert len(rows) == len(GPU_NODES) and all("Pending" in r and "0/1" in r for r in rows)
    [vllm] = [line for line in out.splitlines() if "gpujobs-vllm-" in line]
    assert "0/2" in vllm  # vLLM (a native sidecar) and its worker
    [inference] = [line for line in out.splitlines() if "│ inference " in line]
    assert inference.split("│")[-2].strip() == "3"
    # Without a broker the rest still shows, and the queues say why they are missing.
    bare = gpujobs("status", kubeconfig=applied.kubeconfig)
    assert bare.returncode == 0 and "queues: not read: GPUJOBS_BROKER_URL is not set" in bare.stdout


def test_scale_inference_sets_the_replicas_and_minus_one_changes_nothing(applied: Cluster) -> None:
    start = replicas(applied)
    result = gpujobs("scale", "inference", "2", kubeconfig=applied.kubeconfig)
    assert result.returncode == 0, result.stderr
    assert f"gpujobs-vllm: {start} -> 2 replicas" in result.stdout
    assert replicas(applied) == 2
    bad = gpujobs("scale", "inference", "-1", kubeconfig=applied.kubeconfig)
    one_line_error(bad, 2, "replicas must be 0 or more, got -1")
    assert replicas(applied) == 2
    unknown = gpujobs("scale", "transcode", "2", kubeconfig=applied.kubeconfig)
    one_line_error(unknown, 2, "transcode")
    back = gpujobs("scale", "inference", "1", kubeconfig=applied.kubeconfig)
    assert back.returncode == 0 and replicas(applied) == 1


def set_ready(cluster: Cluster, pod: Any) -> None:
    """What a kubelet reports once the container runs: phase Running, Ready."""
    core = client.CoreV1Api(cluster.api())
    now = "2026-01-01T00:00:00Z"
    body = {"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": now}]}}  # fmt: skip
    core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, body)


def missing_by_node(output: str) -> dict[str, str]:
    """node -> the text of its `missing` cell (rows may wrap onto following lines)."""
    found: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 3:
            continue
        if cells[0]:
            current = cells[0]
        if current is not None and current != "node":
            found[current] = (found.get(current, "") + " " + cells[2]).strip()
    return found


def test_nodes_says_what_each_gpu_node_lacks(applied: Cluster) -> None:
    core = client.CoreV1Api(applied.api())
    plugins = wait_for("device plugin pods bound", lambda: [
        p for p in core.list_namespaced_pod(
            "kube-system", label_selector="app.kubernetes.io/name=nvidia-device-plugin").items
        if p.spec.node_name and p.metadata.deletion_timestamp is None
    ])  # fmt: skip
    result = gpujobs("nodes", kubeconfig=applied.kubeconfig)
    assert result.returncode == 1, result.stderr
    missing = missing_by_node(result.stdout)
    assert set(missing) == {*GPU_NODES, UNLABELLED_NODE}, result.stdout
    for node in GPU_NODES:  # labelled, with the runtime class; the plugin pod has no kubelet
        assert missing[node] == "a ready device plugin pod (Pending)", result.stdout
    lacking = missing[UNLABELLED_NODE]
    assert f"label {GPU_LABEL}=true" in lacking and "a device plugin pod" in lacking
    assert "RuntimeClass nvidia selects" in lacking

    try:
        for pod in plugins:
            set_ready(applied, pod)
        after = missing_by_node(gpujobs("nodes", kubeconfig=applied.kubeconfig).stdout)
        assert all(after[node] == "nothing" for node in GPU_NODES), after
        assert after[UNLABELLED_NODE] == lacking
    finally:  # back to pods no kubelet runs: the DaemonSet makes new, Pending ones
        for pod in plugins:
            core.delete_namespaced_pod(pod.metadata.name, "kube-system", grace_period_seconds=0)


def test_no_kubeconfig_and_a_missing_namespace(applied: Cluster, tmp_path: Path) -> None:
    absent = tmp_path / "no-such-kubeconfig"
    for args in (("status",), ("nodes",), ("scale", "inference", "1")):
        result = gpujobs(*args, kubeconfig=absent)
        one_line_error(result, 1, f"no kubeconfig: {absent} does not exist")
    result = gpujobs("status", "-n", "nowhere", kubeconfig=applied.kubeconfig)
    one_line_error(result, 1, "namespace nowhere does not exist")
    result = gpujobs("scale", "inference", "1", "-n", "nowhere", kubeconfig=applied.kubeconfig)
    one_line_error(result, 1, "namespace nowhere does not exist")
    garbled = tmp_path / "garbled"
    garbled.write_text("clusters: [")
    one_line_error(gpujobs("nodes", kubeconfig=garbled), 1, f"kubeconfig {garbled}")


def test_an_api_server_that_refuses_gives_its_reason(applied: Cluster, tmp_path: Path) -> None:
    # A service account with no rights at all: RBAC refuses, and says what and who.
    applied.kubectl("-n", NAMESPACE, "create", "serviceaccount", "nobody", check=False)
    token = applied.kubectl("-n", NAMESPACE, "create", "token", "nobody").stdout.strip()
    config = applied.kubeconfig.read_text()
    [admin] = [line for line in config.splitlines() if "token:" in line]
    limited = tmp_path / "limited"
    limited.write_text(config.replace(admin, f"    token: {token}"))
    result = gpujobs("nodes", kubeconfig=limited)
    who = 'User "system:serviceaccount:gpujobs:nobody" cannot list resource "nodes"'
    one_line_error(result, 1, "the API server refused listing nodes: 403 Forbidden", who)
    result = gpujobs("scale", "inference", "3", kubeconfig=limited)
    one_line_error(result, 1, "403 Forbidden")
    assert replicas(applied) != 3
    # Nobody listening: one line naming the address.
    dead = tmp_path / "dead"
    server = next(line for line in config.splitlines() if "server:" in line).split()[-1]
    dead.write_text(config.replace(server, "https://127.0.0.1:9"))
    result = gpujobs("nodes", kubeconfig=dead)
    one_line_error(result, 1, "cannot reach the API server at https://127.0.0.1:9: ",
                   "Connection refused")  # fmt: skip


def test_no_gpu_nodes(applied: Cluster) -> None:
    """Every node stripped of the label and of its GPUs; put back afterwards."""
    core = client.CoreV1Api(applied.api())
    nodes = (*GPU_NODES, UNLABELLED_NODE)
    try:
        for node in nodes:
            core.patch_node(node, {"metadata": {"labels": {GPU_LABEL: None}}})
            none = {"nvidia.com/gpu": "0"}
            core.patch_node_status(node, {"status": {"allocatable": none, "capacity": none}})
        for args in (("nodes",), ("status",)):
            result = gpujobs(*args, kubeconfig=applied.kubeconfig)
            one_line_error(result, 1, "no GPU nodes: no node of the cluster",
                           f"labelled {GPU_LABEL}=true or offers nvidia.com/gpu")  # fmt: skip
    finally:
        for node in GPU_NODES:
            applied.fake_node(node, f"{GPU_LABEL}=true")
        applied.fake_node(UNLABELLED_NODE)
