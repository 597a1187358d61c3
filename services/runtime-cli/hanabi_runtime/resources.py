"""`update --resources`: what may change in a running container's VM.

The VM's memory and vCPUs are fixed when it boots (hotplug of memory and CPUs is a later
step). An update is validated against the OCI schema; one that asks for a different VM
size is refused with a clear error, one that changes nothing else the VM honours is
accepted (Docker sends updates of settings a VM has no use for, such as block-IO weights).
"""

from __future__ import annotations

import json

from hanabi_common.errors import FailedPrecondition, InvalidArgument
from hanabi_runtime.sizing import vm_size


def parse_resources(raw: str) -> dict:
    """The LinuxResources object, schema-checked."""
    from hanabi_common.oci import validate_config

    try:
        resources = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"--resources is not valid JSON: {exc}") from None
    if not isinstance(resources, dict):
        raise InvalidArgument("--resources must be a JSON object (LinuxResources)")
    validate_config({"ociVersion": "1.0.2", "linux": {"resources": resources}}, "--resources")
    return resources


def apply_update(runtime, cid: str, raw: str) -> None:
    """Accept an update that keeps the VM's size; refuse one that would change it."""
    resources = parse_resources(raw)
    state = runtime.load(cid)
    if state.sandbox is not None:
        raise FailedPrecondition(f"container {cid} of pod sandbox {state.sandbox}: its limits are set in the "
                                 "pod's VM at create and cannot be updated yet (recreate the container)")
    wanted = vm_size(resources)
    vm = runtime.daemons.vmmd.get(cid)
    changes = []
    if wanted.memory_mib is not None and wanted.memory_mib != vm.memory_mib:
        changes.append(f"memory {vm.memory_mib} MiB -> {wanted.memory_mib} MiB")
    if wanted.vcpus is not None and wanted.vcpus != vm.vcpus:
        changes.append(f"vcpus {vm.vcpus} -> {wanted.vcpus}")
    if changes:
        raise FailedPrecondition(f"container {cid} runs in a VM whose size is fixed at create; "
                                 f"cannot change {', '.join(changes)} (recreate the container)")
