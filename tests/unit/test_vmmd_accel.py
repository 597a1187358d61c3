"""Choosing kvm or tcg from injected host facts."""

from __future__ import annotations

import logging

import pytest

from hanabi_vmmd.accel import AccelFacts, decide, probe_facts, resolve

GOOD = AccelFacts(api_version=12)


def test_auto_picks_kvm_when_it_works():
    decision = decide("auto", GOOD)
    assert decision.accel == "kvm" and not decision.forced


@pytest.mark.parametrize("facts, words", [
    (AccelFacts(kvm_error="cannot open /dev/kvm: No such file or directory"), "cannot open"),
    (AccelFacts(api_version=11), "API version is 11"),
    (AccelFacts(api_version=12, pvm=True), "PVM"),
])
def test_auto_falls_back_to_tcg_with_the_reason(facts, words):
    decision = decide("auto", facts)
    assert decision.accel == "tcg"
    assert words in decision.reason and "TCG" in decision.reason


def test_config_forces():
    assert decide("tcg", GOOD).accel == "tcg"
    forced = decide("kvm", AccelFacts(api_version=12, pvm=True))
    assert forced.accel == "kvm" and forced.forced and "PVM" in forced.reason
    with pytest.raises(ValueError):
        decide("whpx", GOOD)


def test_probe_without_a_kvm_device(tmp_path):
    facts = probe_facts(device=tmp_path / "kvm", pvm_module=tmp_path / "kvm_pvm")
    assert facts.kvm_error and "cannot open" in facts.kvm_error and not facts.pvm
    (tmp_path / "kvm_pvm").mkdir()
    assert probe_facts(device=tmp_path / "kvm", pvm_module=tmp_path / "kvm_pvm").pvm


def test_probe_of_a_device_that_is_not_kvm(tmp_path):
    facts = probe_facts(device=__import__("pathlib").Path("/dev/null"), pvm_module=tmp_path / "x")
    assert facts.kvm_error and "KVM_GET_API_VERSION" in facts.kvm_error
    assert decide("auto", facts).accel == "tcg"


def test_resolve_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="hanabi.vmmd"):
        decision = resolve("auto", AccelFacts(api_version=12, pvm=True))
    assert decision.accel == "tcg"
    lines = [r.getMessage() for r in caplog.records if r.name == "hanabi.vmmd"]
    assert len(lines) == 1 and lines[0].startswith("accelerator: tcg: ") and "PVM" in lines[0]
