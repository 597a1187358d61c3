"""The lifecycle of a Kubernetes pod's app containers: created in their pod's VM.

`Runtime.create` of a CRI app container (hanabi_runtime.pod names its pod sandbox) checks
the pod here (its state, its VM and agent alive) and provisions only what is the
container's own: its directory in the VM's file share (blockd, recorded under the
container's id), its host cgroups (its stand-ins') and its container in the guest (agentd,
in the pod's session), with the pod's network, IPC and UTS namespaces as its config names
them. The VM, its network and its agent session are the pod sandbox's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hanabi_common.errors import FailedPrecondition, HanabiError, InvalidArgument, NotFound
from hanabi_common.state import StateStore
from hanabi_runtime.bundle import Bundle
from hanabi_runtime.mounts import plan_mounts
from hanabi_runtime.state import STATE_NAME, RuntimeState

if TYPE_CHECKING:
    from hanabi_common.models.vmmd import VmInfo
    from hanabi_runtime.lifecycle import Runtime


def pod_of(runtime: Runtime, cid: str, bundle: Bundle) -> RuntimeState:
    """The recorded state of the pod sandbox app container `cid` is to run in; a clear
    error naming the container when there is no such pod or it does not run."""
    from hanabi_runtime.pod import SANDBOX_ID

    sid = bundle.pod_sandbox
    assert sid is not None
    pod = runtime.store.read(sid, STATE_NAME, RuntimeState)
    if pod is None:
        raise NotFound(f"container {cid}: its pod sandbox {sid} (annotation {SANDBOX_ID}) does not exist")
    if pod.sandbox is not None:
        raise InvalidArgument(f"container {cid}: {sid} (annotation {SANDBOX_ID}) is an app container "
                              f"of pod {pod.sandbox}, not a pod sandbox")
    status = runtime.status(pod)
    if status not in ("created", "running"):
        raise FailedPrecondition(f"container {cid}: its pod sandbox {sid} is {status}: "
                                 "the pod has no running VM to create the container in")
    return pod


def pod_vm(runtime: Runtime, cid: str, pod: RuntimeState) -> VmInfo:
    """The pod's VM, checked alive (its VMM and its agent)."""
    d = runtime.daemons
    try:
        vm = d.vmmd.get(pod.id)
        agent = d.agentd.get(pod.id)
    except NotFound:
        raise FailedPrecondition(f"container {cid}: the VM of its pod sandbox {pod.id} is gone") from None
    if vm.state != "running" or not agent.connected:
        raise FailedPrecondition(f"container {cid}: the VM of its pod sandbox {pod.id} is not running "
                                 f"(VM {vm.state}, agent {'connected' if agent.connected else 'lost'})")
    return vm


def provision(runtime: Runtime, cid: str, bundle: Bundle, pod: RuntimeState) -> tuple[dict[str, float], list[str]]:
    """Make app container `cid` in the VM of `pod`; its phase timings and host cgroups."""
    from hanabi_common.models.agentd import CreateContainer, GuestMount, RootfsSpec
    from hanabi_runtime.guest_linux import guest_linux
    from hanabi_runtime.lifecycle import _phase
    from hanabi_runtime.pod import map_namespaces

    d = runtime.daemons
    timings: dict[str, float] = {}
    shared = map_namespaces(cid, (bundle.config.get("linux") or {}).get("namespaces"), pod.id, pod.standin_pid)
    vm = pod_vm(runtime, cid, pod)
    rootfs_mode = runtime.config.block.rootfs
    if vm.share_dir is None or rootfs_mode != "share":
        raise FailedPrecondition(
            f"container {cid}: a container of a pod needs the VM's file share (its VM has "
            f"{'none' if vm.share_dir is None else 'one'}; [block] rootfs = {rootfs_mode!r}): "
            "the block root layer is one container per VM")
    plan = plan_mounts(bundle.config.get("mounts"))
    cgroup_dirs = runtime._make_cgroups(bundle)
    with _phase(timings, "volume_s"):
        volume = d.blockd.provision(cid, str(bundle.rootfs), bundle.readonly, plan.binds, None, vm.share_dir, cid)
    linux = guest_linux(bundle.config, seccomp=runtime.config.agent.seccomp)
    linux["namespaces"] = shared.namespaces
    if shared.shares_uts:
        linux.pop("domainname", None)  # the pod's UTS namespace: its names are the sandbox's
    with _phase(timings, "container_create_s"):
        d.agentd.create_container(CreateContainer(
            sandbox_id=pod.id, container_id=cid,
            rootfs=RootfsSpec(share=f"{volume.share}/rootfs", fstype="9p", readonly=bundle.readonly),
            process=bundle.process, hostname=None if shared.shares_uts else bundle.hostname,
            mounts=[GuestMount(**m) for m in plan.guest], share=volume.share, linux=linux,
            join_namespaces=shared.join or None))
    return timings, cgroup_dirs


def members(store: StateStore, sid: str) -> list[str]:
    """The app containers recorded in pod sandbox `sid`."""
    found = []
    for cid in store.list_sandboxes(having=STATE_NAME):
        try:
            state = store.read(cid, STATE_NAME, RuntimeState)
        except HanabiError:
            continue
        if state is not None and state.sandbox == sid:
            found.append(cid)
    return found
