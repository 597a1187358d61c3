"""Kubernetes pods through containerd's CRI: a pod is one VM (tests/e2e/cri_env.py).

A private containerd 1.6 with the `hanabi` runtime handler (runc shim, BinaryName =
hanabi-runtime), driven through the CRI v1 gRPC API as the kubelet drives it: RunPodSandbox,
two CreateContainer/StartContainer, ExecSync, one container reaching the other on localhost,
the pod's IPC and UTS namespaces shared and the mount namespaces, root filesystems and
limits each container's own, ContainerStats, StopContainer/RemoveContainer of one container
leaving the other and the VM alone, StopPodSandbox, RemovePodSandbox; then nothing is left
(no QEMU, stand-in, shim, state dir, share, tap, pod netns or cgroup). The bad input: an app
container whose sandbox id names no pod, and one whose pod's VM died (killed): a clear error
naming the container, nothing of it left, and the dead pod removed cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.cri_env import CGROUP_PARENT, HANDLER, IMAGE, PrivateContainerd, cri_skip_reason
from tests.e2e.engines import engine_fixture, wait_for
from tests.helpers.hanabi import kept_vmm_pids, leftovers, processes_mentioning

pytestmark = pytest.mark.e2e
RPC_TIMEOUT_S = 180.0


cri = engine_fixture("cri", PrivateContainerd, prefix="hbc", skip_reason=cri_skip_reason,
                     start=PrivateContainerd.setup, images=PrivateContainerd.import_images)


@pytest.fixture(scope="module")
def api(cri):
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    channel = grpc.insecure_channel(f"unix://{cri.socket}")
    runtime = api_pb2_grpc.RuntimeServiceStub(channel)
    runtime.Version(api_pb2.VersionRequest(), timeout=30)
    yield Cri(api_pb2, runtime, cri)
    channel.close()


class Cri:
    """The CRI calls the tests make, with the kubelet's shapes and a timeout each."""

    def __init__(self, pb, runtime, env: PrivateContainerd) -> None:
        self.pb, self.rt, self.env = pb, runtime, env

    def pod_config(self, name: str):
        pb = self.pb
        uid = uuid.uuid4().hex
        logs = self.env.base / "logs" / uid
        logs.mkdir(parents=True)
        pod = pb.NamespaceMode.POD
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
            hostname=f"{name}-host", log_directory=str(logs),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{CGROUP_PARENT}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
                    network=pod, ipc=pod, pid=pb.NamespaceMode.CONTAINER))))

    def run_pod(self, config) -> str:
        return self.rt.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER),
                                     timeout=RPC_TIMEOUT_S).pod_sandbox_id

    def create(self, pod_id: str, pod_config, name: str, command: list[str], memory: int = 0,
               pid_mode: str = "CONTAINER") -> str:
        """As the kubelet: a PID namespace of the container's own (POD: shareProcessNamespace)."""
        pb = self.pb
        security = pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(pid=getattr(pb.NamespaceMode, pid_mode)))
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0), image=pb.ImageSpec(image=IMAGE),
            command=command, log_path=f"{name}.log",
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory),
                                          security_context=security))
        return self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=RPC_TIMEOUT_S).container_id

    def start(self, cid: str) -> None:
        self.rt.StartContainer(self.pb.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT_S)

    def exec(self, cid: str, *cmd: str, timeout: int = 30):
        reply = self.rt.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout),
                                 timeout=timeout + 60)
        return reply.exit_code, reply.stdout.decode(), reply.stderr.decode()

    def out(self, cid: str, *cmd: str) -> str:
        code, out, err = self.exec(cid, *cmd)
        assert code == 0, f"{cmd} in {cid[:12]} exited {code}: {err}"
        return out.strip()

    def status(self, cid: str) -> int:
        return self.rt.ContainerStatus(self.pb.ContainerStatusRequest(container_id=cid), timeout=60).status.state

    def remove_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT_S)
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT_S)


def our_qemus(cri: PrivateContainerd) -> set[int]:
    """The QEMUs of our pods (not the spare VMMs vmmd keeps for the next clone)."""
    return (set(processes_mentioning("qemu-system")) & set(processes_mentioning(str(cri.hanabi.root)))
            - kept_vmm_pids(cri.hanabi.config))


def assert_nothing_left(cri: PrivateContainerd) -> None:
    def dirty():
        found = {k: v for k, v in cri.leftovers().items() if v}
        return found or None
    deadline = time.monotonic() + 60
    while (found := dirty()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not found, f"left behind: {found}"


def test_a_pod_is_one_vm_holding_its_containers(cri, api):
    pb = api.pb
    config = api.pod_config("web")
    pod = api.run_pod(config)
    state = json.loads((cri.hanabi.config.sandboxes_dir / pod / "state.json").read_text())
    assert state["sandbox"] is None and state["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert len(our_qemus(cri)) == 1

    server = api.create(pod, config, "server",
                        ["sh", "-c", "echo server > /only-here; exec nc -ll -p 8080 -e /bin/echo hello-from-server"])
    client = api.create(pod, config, "client", ["sleep", "3600"], memory=64 << 20)
    for cid in (server, client):
        api.start(cid)
        recorded = json.loads((cri.hanabi.config.sandboxes_dir / cid / "state.json").read_text())
        assert recorded["sandbox"] == pod, recorded
    assert len(our_qemus(cri)) == 1, "the pod's containers run in the pod's one VM"

    # The pod's network: the client reaches the server on localhost.
    def reached():
        code, out, _ = api.exec(client, "nc", "-w", "5", "127.0.0.1", "8080", timeout=20)
        return out if code == 0 and "hello-from-server" in out else None
    wait_for("the client reaching the server on localhost", reached)
    # The pod's IPC and UTS namespaces; each container's own mount namespace and root.
    for kind in ("ipc", "uts"):
        assert api.out(server, "readlink", f"/proc/self/ns/{kind}") == api.out(client, "readlink", f"/proc/self/ns/{kind}")
    assert api.out(server, "readlink", "/proc/self/ns/mnt") != api.out(client, "readlink", "/proc/self/ns/mnt")
    assert api.out(client, "hostname") == "web-host" == api.out(server, "hostname")
    assert api.out(server, "cat", "/only-here") == "server"
    assert api.exec(client, "cat", "/only-here")[0] != 0
    # Each container's limits: the client's memory limit is its own cgroup's in the guest.
    assert api.out(client, "cat", "/sys/fs/cgroup/memory.max") == str(64 << 20)
    assert api.out(server, "cat", "/sys/fs/cgroup/memory.max") == "max"
    # Each its own processes (a PID namespace per container).
    assert "nc -ll" not in api.out(client, "ps")

    stats = api.rt.ContainerStats(pb.ContainerStatsRequest(container_id=client), timeout=60).stats
    assert stats.attributes.id == client
    assert stats.memory.timestamp > 0 and stats.cpu.timestamp > 0

    # One container's lifecycle leaves the other and the VM alone.
    api.rt.StopContainer(pb.StopContainerRequest(container_id=server, timeout=2), timeout=RPC_TIMEOUT_S)
    assert api.status(server) == pb.ContainerState.CONTAINER_EXITED
    assert api.status(client) == pb.ContainerState.CONTAINER_RUNNING
    api.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=server), timeout=RPC_TIMEOUT_S)
    assert not (cri.hanabi.config.sandboxes_dir / server).exists()
    assert not leftovers(cri.hanabi, server, in_pod=True)
    assert api.out(client, "echo", "still here") == "still here"
    assert len(our_qemus(cri)) == 1

    api.remove_pod(pod)
    assert_nothing_left(cri)


def _bundle(tmp_path: Path, name: str, annotations: dict[str, str], args: list[str]) -> Path:
    from hanabi_runtime.demo_bundle import make_bundle

    bundle = make_bundle(tmp_path / name, args)
    config = json.loads((bundle / "config.json").read_text())
    config["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_an_app_container_of_no_pod_is_refused_naming_it(cri, tmp_path):
    daemons = cri.hanabi
    bundle = _bundle(tmp_path, "orphan", {"io.kubernetes.cri.container-type": "container",
                                          "io.kubernetes.cri.sandbox-id": "nosuchpod"}, ["true"])
    done = daemons.runtime("create", "--bundle", str(bundle), "orphan1")
    assert done.returncode != 0
    error = done.stderr.decode()
    assert "container orphan1" in error and "pod sandbox nosuchpod" in error and "does not exist" in error, error
    assert not leftovers(daemons, "orphan1")


def test_a_pod_whose_vm_died_takes_no_container(cri, tmp_path):
    """The runtime as containerd's shim calls it: a pod sandbox whose QEMU is killed: its
    running container reads as stopped and deletes cleanly; a new app container for it is
    refused naming the container, nothing of it left; the dead pod is deleted with nothing left."""
    daemons = cri.hanabi
    pod = "deadpod1"
    sandbox = _bundle(tmp_path, "pause", {"io.kubernetes.cri.container-type": "sandbox",
                                          "io.kubernetes.cri.sandbox-id": pod}, ["sleep", "600"])
    daemons.runtime("create", "--bundle", str(sandbox), pod, check=True)
    daemons.runtime("start", pod, check=True)
    early = _bundle(tmp_path, "early", {"io.kubernetes.cri.container-type": "container",
                                        "io.kubernetes.cri.sandbox-id": pod}, ["sleep", "600"])
    daemons.runtime("create", "--bundle", str(early), "early1", check=True)
    daemons.runtime("start", "early1", check=True)
    assert daemons.state("early1")["status"] == "running"
    (qemu,) = our_qemus(cri)
    os.kill(qemu, signal.SIGKILL)
    wait_for("the pod's VM to be seen dead", lambda: daemons.state(pod)["status"] == "stopped")
    wait_for("its container to be seen stopped", lambda: daemons.state("early1")["status"] == "stopped")
    daemons.runtime("delete", "early1", check=True)
    assert not leftovers(daemons, "early1", in_pod=True)

    bundle = _bundle(tmp_path, "late", {"io.kubernetes.cri.container-type": "container",
                                        "io.kubernetes.cri.sandbox-id": pod}, ["true"])
    done = daemons.runtime("create", "--bundle", str(bundle), "late1")
    assert done.returncode != 0
    error = done.stderr.decode()
    assert "container late1" in error and f"pod sandbox {pod} is stopped" in error, error
    assert not leftovers(daemons, "late1", in_pod=True)
    daemons.runtime("delete", "--force", pod, check=True)
    assert not leftovers(daemons, pod)


def test_a_cri_pod_whose_vm_died(cri, api):
    """Through CRI: the pod's QEMU is killed (containerd sees its sandbox task exit and has
    it deleted); a container made or started in the pod then fails (naming the container
    when the runtime says why), and the pod is removed with nothing left."""
    import grpc

    config = api.pod_config("dead")
    pod = api.run_pod(config)
    (qemu,) = our_qemus(cri)
    os.kill(qemu, signal.SIGKILL)
    wait_for("the pod's VM to be seen dead", lambda: cri.hanabi.runtime("state", pod).returncode != 0
             or json.loads(cri.hanabi.runtime("state", pod).stdout)["status"] == "stopped")
    cid = None
    with pytest.raises(grpc.RpcError) as caught:
        cid = api.create(pod, config, "late", ["sleep", "60"])
        api.start(cid)
    details = caught.value.details()
    # containerd may fail it itself: at the create once it deleted the dead sandbox's task ("no
    # running task found"), or at the start (the pod's shim exits with its sandbox task: "ttrpc:
    # closed"); when the runtime is reached, its error names the container and the pod.
    if "OCI runtime create failed" in details:
        assert cid is not None and f"container {cid}" in details and f"pod sandbox {pod}" in details, details
    else:
        assert cid is not None or "no running task found" in details, details
    api.remove_pod(pod)
    assert_nothing_left(cri)


def test_a_shared_pid_namespace_is_refused_naming_the_container(cri, api):
    import grpc

    config = api.pod_config("sharedpid")
    pod = api.run_pod(config)
    cid = api.create(pod, config, "c", ["sleep", "60"], pid_mode="POD")
    with pytest.raises(grpc.RpcError) as caught:
        api.start(cid)
    details = caught.value.details()
    assert f"container {cid}" in details and "shareProcessNamespace" in details, details
    api.remove_pod(pod)
    assert_nothing_left(cri)
