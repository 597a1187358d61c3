"""`hanabi-runtime check`: can this host run hanabi's VMs, with which backend, and if not, why
and what to install.

`gather()` probes the host once (binaries and their versions, /dev/kvm, /dev/vhost-vsock,
device-mapper, the guest image, the four daemons); `assess()` is a pure function of those
facts that says, per backend, whether it can run and why not; `render()` prints it. The
command exits 0 when at least one backend can run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

INSTALL_FIRECRACKER = ("install a Firecracker release binary >= {floor} as `firecracker` on PATH "
                       "(or set vmm.firecracker.binary); Firecracker publishes static x86_64 builds")
INSTALL_KVM = ("run on a host with usable hardware KVM (bare metal or a cloud metal instance, "
               "kvm_intel/kvm_amd loaded, /dev/kvm read-write for root)")
INSTALL_QEMU = "apt-get install qemu-system-x86 (provides qemu-system-x86_64)"
INSTALL_GUEST = "build the guest image: `make guest` (hanabi-image build), or set vmm.guest_dir"
INSTALL_JAILER = "install Firecracker's `jailer` next to it (same release), or set vmm.firecracker.jailer = false"


@dataclass(frozen=True)
class HostFacts:
    """What `gather()` found; every *_problem is None when that part is fine."""

    firecracker_binary: str
    firecracker_path: str | None
    firecracker_version: str | None
    firecracker_problem: str | None
    firecracker_floor: str
    jailer_wanted: bool
    jailer_path: str | None
    qemu_binary: str
    qemu_path: str | None
    kvm_problem: str | None
    vhost_vsock: bool
    device_mapper: bool
    guest_problem: str | None
    fc_kernel_problem: str | None
    daemons: dict[str, str | None] = field(default_factory=dict)  # name -> None (answers) or why not


@dataclass(frozen=True)
class BackendReport:
    """Whether one backend can run here; `problems` say why not, `install[i]` what fixes `problems[i]`."""

    name: str
    can_run: bool
    problems: list[str]
    install: list[str]
    notes: list[str]


def assess(facts: HostFacts) -> list[BackendReport]:
    """Firecracker and QEMU, judged from the facts (pure)."""
    guest = [f"guest image: {facts.guest_problem}"] if facts.guest_problem else []
    guest_fix = [INSTALL_GUEST] if facts.guest_problem else []

    fc_problems, fc_install, fc_notes = [], [], []
    if facts.firecracker_problem:
        fc_problems.append(facts.firecracker_problem)
        fc_install.append(INSTALL_FIRECRACKER.format(floor=facts.firecracker_floor))
    else:
        fc_notes.append(f"{facts.firecracker_path}: Firecracker {facts.firecracker_version}")
    if facts.kvm_problem:
        fc_problems.append(f"KVM unusable: {facts.kvm_problem}")
        fc_install.append(INSTALL_KVM)
    if facts.fc_kernel_problem and not facts.guest_problem:
        fc_problems.append(f"guest kernel: {facts.fc_kernel_problem}")
        fc_install.append(INSTALL_GUEST)
    if facts.jailer_wanted and facts.jailer_path is None:
        fc_problems.append("vmm.firecracker.jailer is set but `jailer` is not on PATH")
        fc_install.append(INSTALL_JAILER)
    fc_notes.append("agent channel: hybrid vsock over a Unix socket (needs no /dev/vhost-vsock)")
    firecracker = BackendReport("firecracker", not fc_problems and not guest, fc_problems + guest,
                                fc_install + guest_fix, fc_notes)

    q_problems, q_install, q_notes = [], [], []
    if facts.qemu_path is None:
        q_problems.append(f"{facts.qemu_binary} not on PATH")
        q_install.append(INSTALL_QEMU)
    if facts.kvm_problem:
        q_notes.append(f"no usable KVM ({facts.kvm_problem}): TCG software emulation, slower")
    else:
        q_notes.append("accelerator: KVM")
    q_notes.append("agent channel: " + ("vhost-vsock available" if facts.vhost_vsock
                                        else "virtio-serial (no /dev/vhost-vsock)"))
    qemu = BackendReport("qemu", not q_problems and not guest, q_problems + guest, q_install + guest_fix,
                         q_notes)
    return [firecracker, qemu]


def auto_choice(reports: list[BackendReport]) -> str | None:
    """What `--hypervisor auto` takes: Firecracker when it can run, else QEMU, else nothing."""
    usable = [r.name for r in reports if r.can_run]
    return "firecracker" if "firecracker" in usable else ("qemu" if "qemu" in usable else None)


def exit_status(reports: list[BackendReport]) -> int:
    """0 when at least one backend can run."""
    return 0 if any(r.can_run for r in reports) else 1


def render(facts: HostFacts, reports: list[BackendReport]) -> str:
    """The human report."""
    lines = []
    for r in reports:
        lines.append(f"{r.name}: {'can run' if r.can_run else 'CANNOT run on this host'}")
        for problem, fix in zip(r.problems, r.install, strict=False):  # one fix per problem
            lines += [f"  - {problem}", f"    to fix: {fix}"]
        lines += [f"  note: {n}" for n in r.notes]
    choice = auto_choice(reports)
    lines.append(f"--hypervisor auto takes: {choice or 'nothing (no backend can run)'}")
    lines.append("block devices: " + ("device-mapper present (dm-thin volumes)" if facts.device_mapper
                                      else "no device-mapper: blockd uses its loop-file backend"))
    for name, trouble in sorted(facts.daemons.items()):
        lines.append(f"daemon {name}: " + ("answers" if trouble is None else f"not reachable ({trouble})"))
    return "\n".join(lines)


def as_json(facts: HostFacts, reports: list[BackendReport]) -> dict:
    """Machine-readable form of the same report."""
    return {"facts": asdict(facts), "backends": [asdict(r) for r in reports],
            "auto": auto_choice(reports), "ok": exit_status(reports) == 0}


# -- probing (I/O) -----------------------------------------------------------------------

def _device_mapper() -> bool:
    return Path("/dev/mapper/control").exists() or Path("/sys/module/dm_mod").exists()


def _guest_problems(guest_dir: Path) -> tuple[str | None, str | None]:
    """(what the guest image lacks for any VMM, why its kernel does not suit Firecracker)."""
    kernels = [guest_dir / name for name in ("vmlinux", "vmlinuz") if (guest_dir / name).is_file()]
    initrd = guest_dir / "initrd.img"
    missing = ([] if kernels else [f"{guest_dir}/vmlinux"]) + ([] if initrd.is_file() else [str(initrd)])
    vmlinux = guest_dir / "vmlinux"
    try:
        with open(vmlinux, "rb") as handle:
            elf = handle.read(4) == b"\x7fELF"
    except OSError:
        elf = False
    fc_problem = None if elf else f"{vmlinux} is not an ELF vmlinux (Firecracker boots no bzImage)"
    return (f"{', '.join(missing)} missing" if missing else None), fc_problem


def _daemons(config) -> dict[str, str | None]:
    from hanabi_common.config import DAEMONS
    from hanabi_common.errors import HanabiError
    from hanabi_common.rpc.client import RpcClient

    found: dict[str, str | None] = {}
    for name in DAEMONS:
        try:
            RpcClient(name, config.endpoint(name), timeout=2.0).ping(timeout=1.0)
            found[name] = None
        except HanabiError as exc:
            found[name] = exc.message
    return found


def gather(config, *, daemons: bool = True) -> HostFacts:
    """Probe this host (see the module docstring)."""
    from hanabi_vmmd import accel
    from hanabi_vmmd.firecracker.version import MIN_VERSION, fmt, probe_version

    fc_cfg = config.vmm.firecracker
    version = probe_version(fc_cfg.binary)
    guest = _guest_problems(Path(config.vmm.guest_dir))
    return HostFacts(
        firecracker_binary=fc_cfg.binary, firecracker_path=version.path,
        firecracker_version=fmt(version.version) if version.version else None,
        firecracker_problem=version.problem, firecracker_floor=fmt(MIN_VERSION),
        jailer_wanted=fc_cfg.jailer, jailer_path=shutil.which(fc_cfg.jailer_binary),
        qemu_binary=config.vmm.qemu_binary, qemu_path=shutil.which(config.vmm.qemu_binary),
        kvm_problem=accel.kvm_problem(accel.probe_facts()),
        vhost_vsock=os.path.exists("/dev/vhost-vsock"), device_mapper=_device_mapper(),
        guest_problem=guest[0], fc_kernel_problem=guest[1],
        daemons=_daemons(config) if daemons else {})
