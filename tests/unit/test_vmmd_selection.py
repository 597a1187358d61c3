"""`auto` picks Firecracker only where its binary and KVM both work (pure decision)."""

from hanabi_vmmd.selection import Choice, HostFacts, choose, firecracker_unusable

BOTH = {"qemu", "firecracker"}
PVM = "the host's KVM is the nested PVM flavour (module kvm_pvm is loaded)"


def test_auto_takes_firecracker_where_it_and_kvm_work():
    assert choose("auto", HostFacts(None, None), BOTH).backend == "firecracker"


def test_auto_falls_back_to_qemu_and_says_why():
    missing = choose("auto", HostFacts("firecracker not on PATH", None), BOTH)
    assert missing == Choice("qemu", "auto: QEMU, since firecracker not on PATH")
    pvm = choose("auto", HostFacts(None, PVM), BOTH)
    assert pvm.backend == "qemu" and "Firecracker needs KVM" in pvm.reason and "kvm_pvm" in pvm.reason
    assert choose("auto", HostFacts(None, None), {"qemu"}).backend == "qemu"


def test_explicit_choices_are_kept():
    facts = HostFacts("firecracker not on PATH", PVM)
    assert choose("firecracker", facts, BOTH).backend == "firecracker"
    assert choose("qemu", HostFacts(None, None), BOTH).backend == "qemu"


def test_firecracker_unusable_prefers_the_binary_problem():
    assert firecracker_unusable(HostFacts("too old", PVM)) == "too old"
    assert firecracker_unusable(HostFacts(None, None)) is None
