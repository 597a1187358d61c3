"""The `linux` field of the guest's create_container: what of config.json the guest applies.

Pure. The subset of the OCI `linux` object the agent enforces inside the VM (see
hanabi_wire.ocispec.linux and docs/agent-protocol.md), plus the top-level
`domainname`. `cgroupsPath` stays on the host (runtime cgroups.py); `linux.resources`
travels too: the VM is sized from it and the guest writes it to the container's cgroup.
With `[agent] seccomp = false` the seccomp profile is left out (the container runs without
a filter; the caller logs it).
"""

from __future__ import annotations

from hanabi_wire.ocispec.linux import KNOWN_KEYS

# The keys of config.json's `linux` the guest applies: every key of the guest's `linux` field
# but domainname, which config.json has at the top level.
GUEST_KEYS = tuple(key for key in KNOWN_KEYS if key != "domainname")


def guest_linux(config: dict, seccomp: bool = True) -> dict:
    """The `linux` field for `config` (a validated config.json)."""
    linux = config.get("linux") or {}
    out = {key: linux[key] for key in GUEST_KEYS if linux.get(key) is not None}
    if not seccomp:
        out.pop("seccomp", None)
    if config.get("domainname"):
        out["domainname"] = config["domainname"]
    return out


def check_guest_settings(config: dict, seccomp: bool = True) -> None:
    """Validate what the guest will apply with the guest's own rules (hanabi_wire.ocispec, no
    VM needed): the process (capabilities, noNewPrivileges, LSM labels), the `linux` field
    and the seccomp profile; InvalidArgument naming the field, before anything is
    provisioned."""
    from hanabi_common.errors import InvalidArgument
    from hanabi_wire.ocispec.linux import check_linux, check_user_mapped
    from hanabi_wire.ocispec.process import check_process
    from hanabi_wire.ocispec.seccomp import plan

    try:
        check_process(config.get("process"))
        spec = check_linux(guest_linux(config, seccomp), config.get("hostname"))
        check_user_mapped(config.get("process") or {}, spec)
        if spec is not None and spec.seccomp is not None:
            plan(spec.seccomp)
    except ValueError as exc:
        raise InvalidArgument(f"config.json: {exc}") from None
