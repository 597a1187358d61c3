"""Kubernetes pods through containerd's CRI: which containers share one VM, and how.

Pure (no I/O). containerd's CRI plugin marks every container it creates with two OCI
annotations, as Kata reads them: `io.kubernetes.cri.container-type` (`sandbox` for the
pod's pause container, `container` for an app container) and
`io.kubernetes.cri.sandbox-id` (the id of the pod's sandbox container). The sandbox
container makes the pod's VM and holds its network; an app container runs in that VM.

An app container's config.json names the sandbox's namespaces by the host path
`/proc/<pid>/ns/<kind>`, where pid is the sandbox container's pid (its stand-in, here):
`network` is the VM's own network stack (nothing to do: every container of the VM has
it), `ipc` and `uts` are the sandbox container's namespaces in the guest (joined there),
a shared `pid` namespace (`shareProcessNamespace`) is refused, and so is a path that
names anything but the pod's sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hanabi_common.errors import InvalidArgument
from hanabi_common.ids import is_valid_id

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
TYPE_SANDBOX = "sandbox"
TYPE_CONTAINER = "container"
# /proc/<pid>/ns/<file> -> the OCI namespace type
_NS_PATH = re.compile(r"^/proc/([0-9]{1,10})/ns/(net|ipc|uts|pid|cgroup|mnt|user|time)$")
_NS_FILE_TYPE = {"net": "network", "ipc": "ipc", "uts": "uts", "pid": "pid", "cgroup": "cgroup",
                 "mnt": "mount", "user": "user", "time": "time"}
JOINABLE = ("ipc", "uts")  # joined in the guest from the sandbox container's init


def pod_sandbox_of(cid: str, annotations: dict[str, str]) -> str | None:
    """The pod sandbox container `cid` runs in: its sandbox id for a CRI app container,
    None for any other container (a pod's sandbox container makes its own VM).
    InvalidArgument naming the container and the annotation for values that are wrong."""
    kind = annotations.get(CONTAINER_TYPE)
    if kind is None or kind == TYPE_SANDBOX:
        return None
    if kind != TYPE_CONTAINER:
        raise InvalidArgument(f"container {cid}: annotation {CONTAINER_TYPE} is {kind[:64]!r}: "
                              f"it must be {TYPE_SANDBOX!r} or {TYPE_CONTAINER!r}")
    sandbox = annotations.get(SANDBOX_ID)
    if not sandbox:
        raise InvalidArgument(f"container {cid}: a CRI app container ({CONTAINER_TYPE}={TYPE_CONTAINER}) "
                              f"needs the annotation {SANDBOX_ID}")
    if not is_valid_id(sandbox):
        raise InvalidArgument(f"container {cid}: annotation {SANDBOX_ID} {sandbox[:64]!r} is not a container id")
    if sandbox == cid:
        raise InvalidArgument(f"container {cid}: annotation {SANDBOX_ID} names the container itself, "
                              f"but {CONTAINER_TYPE} is {TYPE_CONTAINER!r}")
    return sandbox


@dataclass
class PodNamespaces:
    """An app container's namespaces as the guest takes them: `namespaces` (its
    `linux.namespaces` without the pod's), `join` (kind -> the container of the VM whose
    init's namespace it joins) and whether it keeps the pod's hostname (uts joined)."""

    namespaces: list[dict] = field(default_factory=list)
    join: dict[str, str] = field(default_factory=dict)

    @property
    def shares_uts(self) -> bool:
        return "uts" in self.join


def map_namespaces(cid: str, namespaces: list[dict] | None, sandbox_id: str,
                   sandbox_pid: int | None) -> PodNamespaces:
    """Map the namespace paths of app container `cid`'s config (validated) onto the pod
    sandbox `sandbox_id` whose container pid on the host is `sandbox_pid`."""
    out = PodNamespaces()
    for entry in namespaces or []:
        kind, path = entry.get("type"), entry.get("path") or ""
        if not path:
            out.namespaces.append(entry)
            continue
        match = _NS_PATH.match(path)
        if match is None or int(match.group(1)) != sandbox_pid or _NS_FILE_TYPE[match.group(2)] != kind:
            raise InvalidArgument(
                f"container {cid}: linux.namespaces: the {kind} namespace {path[:80]!r} is not one of its pod "
                f"sandbox {sandbox_id} (pid {sandbox_pid}): a container of a pod can only share the pod's")
        if kind == "network":
            continue  # the VM's network: every container in it has it
        if kind in JOINABLE:
            out.join[kind] = sandbox_id
            continue
        what = "shareProcessNamespace (a pod-wide pid namespace)" if kind == "pid" else f"a pod-wide {kind} namespace"
        raise InvalidArgument(f"container {cid}: linux.namespaces: {what} is not supported: "
                              "each container of a pod has its own in the VM")
    return out


def own_settings(config: dict) -> dict:
    """An app container's config as the guest checks it before the pod is known: its
    `linux.namespaces` without the entries that have a path (the pod's), and no hostname
    when it shares the pod's UTS namespace (the pod's hostname is the sandbox's)."""
    linux = dict(config.get("linux") or {})
    entries = linux.get("namespaces") or []
    linux["namespaces"] = [e for e in entries if not e.get("path")]
    shared_uts = any(e.get("type") == "uts" and e.get("path") for e in entries)
    out = dict(config, linux=linux)
    if shared_uts:
        out.pop("hostname", None)
        out.pop("domainname", None)
    return out
