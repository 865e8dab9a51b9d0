"""The promises tests/test_k8s_cluster.py reads back from a real API server, checked offline on
the manifests as well (so that they hold where no API server is at hand): the seed's vLLM
command, the runtime class, no API tokens, memory limits, digests, disruption budgets, Pod
Security and the default deny. Helpers from tests/test_k8s_manifests.py.
"""

from __future__ import annotations

import re
from unittest.mock import ANY

from tests.test_k8s_manifests import (
    BASE,
    GPUJOBS_IMAGE,
    RESOURCES,
    container,
    containers,
    find,
    mount_of,
    overlay_patches,
    pod_spec,
    secret_ref,
    workloads,
)

VLLM_SERVE_ARGS = [
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
DEVICE_PLUGIN = [d.data for d in RESOURCES if d.path.parts[0] == "device-plugin"]


def test_vllm_is_the_seeds_command_from_the_model_volume_with_no_replicas() -> None:
    vllm = find("Deployment", "gpujobs-vllm")
    server = container(vllm, "vllm")
    assert server["image"].startswith("vllm/vllm-openai:v0.11.1@sha256:")
    assert server["command"] == ["vllm", "serve"]
    assert server["args"] == VLLM_SERVE_ARGS
    assert secret_ref(server, "VLLM_API_KEY") == ("gpujobs-vllm", "api-key")
    worker = container(vllm, "inference-worker")
    assert secret_ref(worker, "GPUJOBS_VLLM_API_KEY") == ("gpujobs-vllm", "api-key")
    models = mount_of(vllm, server, "/models")
    assert models["persistentVolumeClaim"]["claimName"] == "gpujobs-models"
    assert "ReadOnlyMany" in find("PersistentVolumeClaim", "gpujobs-models")["spec"]["accessModes"]
    assert "replicas" not in vllm["spec"]  # KEDA or `gpujobs cluster scale` own the count


def test_gpu_pods_name_the_nvidia_runtime_class_and_select_the_gpu_nodes() -> None:
    runtime = find("RuntimeClass", "nvidia", DEVICE_PLUGIN)
    assert runtime["handler"] == "nvidia"
    selector = {"node-role.kubernetes.io/worker-gpu": "true"}
    assert runtime["scheduling"]["nodeSelector"] == selector
    gpu_pods = [find("DaemonSet", "gpujobs-worker"), find("Deployment", "gpujobs-vllm"),
                find("DaemonSet", "nvidia-device-plugin-daemonset", DEVICE_PLUGIN)]  # fmt: skip
    for obj in gpu_pods:
        assert pod_spec(obj)["runtimeClassName"] == "nvidia", obj["metadata"]["name"]
        assert pod_spec(obj)["nodeSelector"] == selector, obj["metadata"]["name"]
    plugin = pod_spec(gpu_pods[2])["containers"][0]["image"]
    assert plugin.startswith("nvcr.io/nvidia/k8s-device-plugin:v0.17.1@sha256:")


def test_every_pod_has_no_api_token_memory_limits_and_pinned_images() -> None:
    for obj in [*workloads(), *workloads(DEVICE_PLUGIN)]:
        assert pod_spec(obj)["automountServiceAccountToken"] is False, obj["metadata"]["name"]
        for c in containers(obj):
            assert "memory" in c["resources"]["limits"], c["name"]
            if not c["image"].startswith(f"{GPUJOBS_IMAGE}:"):
                assert re.fullmatch(r"[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}", c["image"]), c["image"]
    redis = find("StatefulSet", "gpujobs-redis")
    assert (
        pod_spec(redis)["priorityClassName"]
        == find("PriorityClass", "gpujobs-redis")["metadata"]["name"]
    )
    budgets = {b["metadata"]["name"]: b["spec"] for b in BASE if b["kind"] == "PodDisruptionBudget"}
    assert budgets == {"gpujobs-redis": {"minAvailable": 1, "selector": ANY},
                       "gpujobs-vllm": {"maxUnavailable": 1, "selector": ANY}}  # fmt: skip


def test_namespace_enforces_baseline_and_the_wsl2_overlay_names_its_exception() -> None:
    labels = find("Namespace", "gpujobs")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    patched = {obj["kind"]: obj for _, obj in overlay_patches("wsl2")}
    namespace = patched["Namespace"]["metadata"]
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace["labels"]["pod-security.kubernetes.io/warn"] == "baseline"
    assert "volume wsl-lib" in namespace["annotations"]["gpujobs.io/pod-security-exceptions"]
    deny = find("NetworkPolicy", "gpujobs-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
