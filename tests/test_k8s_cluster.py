"""k8s/ against a real API server (tests/k8s_cluster.py): every overlay passes a server dry run and
is applied for real; every pod of the transcode workers, vLLM, Redis and the device plugin is
bound to a node (Pending only for want of a kubelet); the objects read back keep their promises.

The tests run in order and build on each other: base (plain Linux) first, then the wsl2 overlay
on top of it, then KEDA. Marked `k8s`; skipped, saying why, without the binaries or kubectl.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.k8s_cluster import (
    GPU_LABEL,
    GPU_NODES,
    K8S,
    NAMESPACE,
    ROOT,
    Cluster,
    apply_app,
    settle,
    wait_for,
)

client = pytest.importorskip("kubernetes.client", reason="the kubernetes client is a dependency")

pytestmark = pytest.mark.k8s

VLLM_ARGS = [
    "/models/Qwen/Qwen3-VL-32B-Instruct",
    "--served-model-name", "Qwen3-VL-32B-Instruct",
    "--tensor-parallel-size", "4",
    "--port", "9999",
    "--max-model-len", "32768",
    "--gpu-memory-utilization", "0.85",
    "--max-num-seqs", "10",
    "--max-num-batched-tokens", "32768",
    "--dtype", "bfloat16",
    "--api-key", "$(VLLM_API_KEY)",
]  # fmt: skip
DIGEST = re.compile(r"^[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}$")
OUR_IMAGE = "gpujobs-worker:"
# Component label -> how many pods: one worker per GPU node, one vLLM replica, one Redis.
COMPONENTS = {"transcode-worker": len(GPU_NODES), "vllm": 1, "redis": 1}
DEVICE_PLUGIN = "app.kubernetes.io/name=nvidia-device-plugin"


def pods(cluster: Cluster, selector: str, namespace: str = NAMESPACE) -> list[Any]:
    core = client.CoreV1Api(cluster.api())
    found = core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in found if p.metadata.deletion_timestamp is None]


def all_bound(cluster: Cluster) -> dict[str, list[Any]]:
    """Component -> its pods, once each has its count and every pod is bound; else {}."""
    found = {c: pods(cluster, f"app.kubernetes.io/component={c}") for c in COMPONENTS}
    found["device-plugin"] = pods(cluster, DEVICE_PLUGIN, "kube-system")
    wanted = {**COMPONENTS, "device-plugin": len(GPU_NODES)}
    for component, count in wanted.items():
        if len(found[component]) != count or not all(p.spec.node_name for p in found[component]):
            return {}
    return found


def assert_bound_and_pending(cluster: Cluster) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = wait_for("every pod bound to a node", lambda: all_bound(cluster))
    for component, items in found.items():
        for pod in items:
            scheduled = {c.type: c.status for c in pod.status.conditions or []}
            assert scheduled.get("PodScheduled") == "True", (component, pod.metadata.name)
            assert pod.status.phase == "Pending", (component, pod.status.phase)  # no kubelet
            if component in ("transcode-worker", "vllm", "device-plugin"):
                assert pod.spec.node_name in GPU_NODES, (component, pod.spec.node_name)
    workers = {p.spec.node_name for p in found["transcode-worker"]}
    assert workers == set(GPU_NODES), "one transcode worker on each GPU node"
    return found


def dry_run(cluster: Cluster, target: str) -> str:
    result = cluster.kubectl("apply", "--dry-run=server", "-k", str(K8S / target))
    assert "(server dry run)" in result.stdout
    return result.stdout


# --- Apply ---------------------------------------------------------------------------------------


def test_base_passes_a_server_dry_run_then_applies_and_every_pod_is_bound(
    k8s_cluster: Cluster,
) -> None:
    # A server dry run persists no namespace: the namespace first, for real.
    k8s_cluster.kubectl("apply", "-f", str(K8S / "base" / "namespace.yaml"))
    for target in ("device-plugin", "base", "overlays/wsl2"):
        dry_run(k8s_cluster, target)
    apply_app(k8s_cluster, "device-plugin")
    output = apply_app(k8s_cluster, "base")
    assert "Warning" not in output, output  # nothing in the base breaks Pod Security baseline
    found = assert_bound_and_pending(k8s_cluster)
    [worker] = found["transcode-worker"][:1]
    assert not [v for v in worker.spec.volumes if v.host_path], "no hostPath outside wsl2"


def test_wsl2_overlay_applies_over_the_base_and_every_pod_is_bound(k8s_cluster: Cluster) -> None:
    output = apply_app(k8s_cluster, "overlays/wsl2")
    # Pod Security warns about exactly the one exception the overlay names.
    warnings = [line for line in output.splitlines() if line.startswith("Warning")]
    assert warnings == ['Warning: would violate PodSecurity "baseline:v1.29": '
                        'hostPath volumes (volume "wsl-lib")'], output  # fmt: skip

    core = client.CoreV1Api(k8s_cluster.api())

    def rolled() -> bool:
        # The DaemonSet replaces one node's pod at a time and waits for the new one to be ready,
        # which takes a kubelet: replace the old pods here, as a finished rollout would have.
        settle(k8s_cluster)
        workers = pods(k8s_cluster, "app.kubernetes.io/component=transcode-worker")
        old = [p for p in workers if not any(v.name == "wsl-lib" for v in p.spec.volumes)]
        for pod in old:
            core.delete_namespaced_pod(pod.metadata.name, NAMESPACE, grace_period_seconds=0)
        return len(workers) == len(GPU_NODES) and not old

    wait_for("the worker DaemonSet rolled to the wsl2 pod", rolled)
    found = assert_bound_and_pending(k8s_cluster)
    for pod in found["transcode-worker"]:
        [mount] = [m for m in pod.spec.containers[0].volume_mounts if m.name == "wsl-lib"]
        assert (mount.mount_path, mount.read_only) == ("/usr/lib/wsl", True)
        assert mount.recursive_read_only == "Enabled"  # kept by the server, not dropped


def test_pod_security_exceptions_are_the_named_hostpath_mounts_and_no_more(
    k8s_cluster: Cluster,
) -> None:
    core = client.CoreV1Api(k8s_cluster.api())
    namespace = core.read_namespace(NAMESPACE).metadata
    labels = namespace.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "baseline"
    named = namespace.annotations["gpujobs.io/pod-security-exceptions"]
    assert "gpujobs-worker volume wsl-lib" in named
    assert "nvidia-device-plugin-daemonset volume device-plugin" in named
    # Ask the API server which running pods `baseline` would refuse, and why.
    result = k8s_cluster.kubectl(
        "label", "--dry-run=server", "--overwrite", "namespace", NAMESPACE,
        "pod-security.kubernetes.io/enforce=baseline",
    )  # fmt: skip
    violations = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert violations[0].startswith("Warning: existing pods in namespace")
    workers = {
        p.metadata.name for p in pods(k8s_cluster, "app.kubernetes.io/component=transcode-worker")
    }
    offenders = {}
    for line in violations[1:]:
        name, _, reason = line.removeprefix("Warning: ").partition(": ")
        offenders[name] = reason
    # The API server groups identical violations: "<pod> (and 1 other pod): hostPath volumes".
    names = {name.split(" ")[0] for name in offenders}
    assert names <= workers and names, offenders
    assert set(offenders.values()) == {"hostPath volumes"}, offenders
    device_plugin = pods(k8s_cluster, DEVICE_PLUGIN, "kube-system")
    for pod in device_plugin:
        [volume] = [v for v in pod.spec.volumes if v.host_path]
        assert (volume.name, volume.host_path.path) == (
            "device-plugin",
            "/var/lib/kubelet/device-plugins",
        )


def test_keda_applies_and_vllm_keeps_the_replicas_it_was_scaled_to(k8s_cluster: Cluster) -> None:
    k8s_cluster.kubectl("apply", "-f", str(ROOT / "tests" / "k8s" / "keda-crds.yaml"))
    crds = ("crd/scaledobjects.keda.sh", "crd/triggerauthentications.keda.sh")
    k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds)
    dry_run(k8s_cluster, "optional/keda")
    k8s_cluster.kubectl("apply", "-k", str(K8S / "optional" / "keda"))
    apps = client.AppsV1Api(k8s_cluster.api())
    # What KEDA (or `gpujobs cluster scale`) does, then what an operator does next: apply again.
    apps.patch_namespaced_deployment_scale("gpujobs-vllm", NAMESPACE, {"spec": {"replicas": 2}})
    apply_app(k8s_cluster, "overlays/wsl2")
    k8s_cluster.kubectl("apply", "-k", str(K8S / "optional" / "keda"))
    assert apps.read_namespaced_deployment("gpujobs-vllm", NAMESPACE).spec.replicas == 2
    last = apps.read_namespaced_deployment("gpujobs-vllm", NAMESPACE).metadata.annotations[
        "kubectl.kubernetes.io/last-applied-configuration"
    ]
    assert "replicas" not in yaml.safe_load(last)["spec"]
    # Two replicas of 4 GPUs each: one on each GPU node.
    bound = wait_for("two vLLM replicas bound", lambda: [
        p for p in pods(k8s_cluster, "app.kubernetes.io/component=vllm") if p.spec.node_name
    ] if len(pods(k8s_cluster, "app.kubernetes.io/component=vllm")) == 2 else [])  # fmt: skip
    assert {p.spec.node_name for p in bound} == set(GPU_NODES)
    apps.patch_namespaced_deployment_scale("gpujobs-vllm", NAMESPACE, {"spec": {"replicas": 1}})


# --- Read back: the promises ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def applied(k8s_cluster: Cluster) -> Cluster:
    """The wsl2 overlay in place (also when this test runs alone)."""
    apply_app(k8s_cluster, "device-plugin")
    apply_app(k8s_cluster, "overlays/wsl2")
    return k8s_cluster


def test_vllm_runs_the_seeds_command_exactly(applied: Cluster) -> None:
    deployment = client.AppsV1Api(applied.api()).read_namespaced_deployment(
        "gpujobs-vllm", NAMESPACE
    )
    spec = deployment.spec.template.spec
    [server] = spec.init_containers
    assert server.image.startswith("vllm/vllm-openai:v0.11.1@sha256:")
    assert server.command == ["vllm", "serve"]
    assert server.args == VLLM_ARGS
    assert server.restart_policy == "Always"  # a native sidecar
    env = {e.name: e for e in server.env}
    assert env["NCCL_CUMEM_ENABLE"].value == "0"
    key = env["VLLM_API_KEY"].value_from.secret_key_ref
    assert (key.name, key.key) == ("gpujobs-vllm", "api-key")
    assert server.resources.limits["nvidia.com/gpu"] == "4"
    volumes = {v.name: v for v in spec.volumes}
    mounts = {m.mount_path: m for m in server.volume_mounts}
    shm = volumes[mounts["/dev/shm"].name].empty_dir
    assert (shm.medium, shm.size_limit) == ("Memory", "16G")
    models = volumes[mounts["/models"].name].persistent_volume_claim
    assert models.claim_name == "gpujobs-models" and mounts["/models"].read_only
    [worker] = spec.containers
    sent = {e.name: e for e in worker.env}["GPUJOBS_VLLM_API_KEY"].value_from.secret_key_ref
    assert (sent.name, sent.key) == ("gpujobs-vllm", "api-key")
    assert spec.runtime_class_name == "nvidia"
    assert spec.node_selector == {GPU_LABEL: "true"}


def test_gpu_pods_name_the_runtime_class_and_select_the_gpu_nodes(applied: Cluster) -> None:
    api = applied.api()
    runtime = client.NodeV1Api(api).read_runtime_class("nvidia")
    assert runtime.handler == "nvidia"
    assert runtime.scheduling.node_selector == {GPU_LABEL: "true"}
    apps = client.AppsV1Api(api)
    templates = {
        "worker": apps.read_namespaced_daemon_set("gpujobs-worker", NAMESPACE),
        "vllm": apps.read_namespaced_deployment("gpujobs-vllm", NAMESPACE),
        "plugin": apps.read_namespaced_daemon_set("nvidia-device-plugin-daemonset", "kube-system"),
    }
    for name, obj in templates.items():
        spec = obj.spec.template.spec
        assert spec.runtime_class_name == "nvidia", name
        assert spec.node_selector == {GPU_LABEL: "true"}, name
    [worker] = templates["worker"].spec.template.spec.containers
    # Shares the cards vLLM holds: no GPU request, every card through the runtime.
    assert "nvidia.com/gpu" not in (worker.resources.limits or {})
    assert "nvidia.com/gpu" not in (worker.resources.requests or {})
    assert {e.name: e.value for e in worker.env}["NVIDIA_VISIBLE_DEVICES"] == "all"
    plugin_image = templates["plugin"].spec.template.spec.containers[0].image
    assert plugin_image.startswith("nvcr.io/nvidia/k8s-device-plugin:v0.17.1@sha256:")


def test_every_pod_is_locked_down_limited_and_pinned(applied: Cluster) -> None:
    core = client.CoreV1Api(applied.api())
    checked = 0
    for namespace, selector in ((NAMESPACE, "app.kubernetes.io/part-of=gpujobs"),
                                ("kube-system", DEVICE_PLUGIN)):  # fmt: skip
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            spec = pod.spec
            assert spec.automount_service_account_token is False, pod.metadata.name
            for c in [*(spec.init_containers or []), *spec.containers]:
                where = f"{pod.metadata.name}/{c.name}"
                assert c.resources.limits and "memory" in c.resources.limits, where
                assert c.security_context.allow_privilege_escalation is False, where
                assert c.security_context.capabilities.drop == ["ALL"], where
                assert not c.security_context.privileged, where
                if c.image.startswith(OUR_IMAGE):
                    # Ours is built and pushed by you (docs/operations.md): run as 10001, r/o.
                    assert c.security_context.read_only_root_filesystem is True, where
                else:
                    assert DIGEST.match(c.image), f"{where}: {c.image} is not pinned by digest"
                checked += 1
    assert checked >= 8
    redis_pod = core.read_namespaced_pod("gpujobs-redis-0", NAMESPACE)
    assert redis_pod.spec.priority_class_name == "gpujobs-redis"
    assert redis_pod.spec.priority == 1000000  # resolved by the API server's admission
    assert redis_pod.spec.containers[0].security_context.read_only_root_filesystem is True


def test_default_deny_and_the_allowed_flows(applied: Cluster) -> None:
    policies = {
        p.metadata.name: p.spec
        for p in client.NetworkingV1Api(applied.api())
        .list_namespaced_network_policy(NAMESPACE)
        .items
    }
    deny = policies["gpujobs-default-deny"]
    assert not deny.pod_selector.match_labels and not deny.pod_selector.match_expressions
    assert sorted(deny.policy_types) == ["Egress", "Ingress"]
    assert not deny.ingress and not deny.egress
    [dns] = policies["gpujobs-dns"].egress
    assert sorted((p.protocol, p.port) for p in dns.ports) == [("TCP", 53), ("UDP", 53)]
    [to_redis] = policies["gpujobs-to-redis"].egress
    assert [p.port for p in to_redis.ports] == [6379]
    [into_redis] = policies["gpujobs-redis"].ingress
    assert into_redis._from[0].pod_selector.match_labels == {"app.kubernetes.io/part-of": "gpujobs"}


def test_disruption_budgets_cover_redis_and_vllm(applied: Cluster) -> None:
    policy = client.PolicyV1Api(applied.api())

    def counted() -> dict[str, int]:
        budgets = policy.list_namespaced_pod_disruption_budget(NAMESPACE).items
        found = {b.metadata.name: (b.status.expected_pods or 0) for b in budgets}
        return found if found.get("gpujobs-redis") and found.get("gpujobs-vllm") else {}

    expected = wait_for("the disruption controller to count the pods", counted)
    assert expected == {"gpujobs-redis": 1, "gpujobs-vllm": 1}
    redis_budget = policy.read_namespaced_pod_disruption_budget("gpujobs-redis", NAMESPACE)
    assert redis_budget.spec.min_available == 1
