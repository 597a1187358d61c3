"""Kubernetes pods: which VM a CRI container runs in and how its namespaces map (hanabi_runtime.pod)."""

from __future__ import annotations

import pytest

from hanabi_common.errors import InvalidArgument
from hanabi_runtime.pod import (CONTAINER_TYPE, SANDBOX_ID, map_namespaces, own_settings, pod_sandbox_of)


def test_only_cri_app_containers_name_a_pod():
    assert pod_sandbox_of("c1", {}) is None
    assert pod_sandbox_of("pod1", {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}) is None
    assert pod_sandbox_of("c1", {CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}) == "pod1"


@pytest.mark.parametrize("annotations, words", [
    ({CONTAINER_TYPE: "container"}, SANDBOX_ID),
    ({CONTAINER_TYPE: "container", SANDBOX_ID: "../etc"}, "is not a container id"),
    ({CONTAINER_TYPE: "container", SANDBOX_ID: "c1"}, "names the container itself"),
    ({CONTAINER_TYPE: "vm"}, "must be 'sandbox' or 'container'"),
])
def test_bad_annotations_are_refused_naming_the_container(annotations, words):
    with pytest.raises(InvalidArgument) as caught:
        pod_sandbox_of("c1", annotations)
    assert "container c1" in caught.value.message and words in caught.value.message


def test_the_pods_namespaces_map_to_the_sandbox_container():
    shared = map_namespaces("c1", [
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": "/proc/4242/ns/net"},
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"},
    ], "pod1", 4242)
    assert shared.namespaces == [{"type": "pid"}, {"type": "mount"}]
    assert shared.join == {"ipc": "pod1", "uts": "pod1"}
    assert shared.shares_uts


def test_own_namespaces_stay_the_containers():
    shared = map_namespaces("c1", [{"type": "ipc"}, {"type": "uts"}], "pod1", 4242)
    assert shared.join == {} and not shared.shares_uts
    assert shared.namespaces == [{"type": "ipc"}, {"type": "uts"}]


@pytest.mark.parametrize("entry, words", [
    ({"type": "ipc", "path": "/proc/999/ns/ipc"}, "is not one of its pod sandbox pod1"),
    ({"type": "ipc", "path": "/run/netns/other"}, "is not one of its pod sandbox pod1"),
    ({"type": "ipc", "path": "/proc/4242/ns/uts"}, "is not one of its pod sandbox pod1"),
    ({"type": "pid", "path": "/proc/4242/ns/pid"}, "shareProcessNamespace"),
    ({"type": "cgroup", "path": "/proc/4242/ns/cgroup"}, "pod-wide cgroup namespace"),
])
def test_other_namespace_paths_are_refused(entry, words):
    with pytest.raises(InvalidArgument) as caught:
        map_namespaces("c1", [entry], "pod1", 4242)
    assert "container c1" in caught.value.message and words in caught.value.message


def test_a_pod_that_has_no_pid_yet_matches_no_path():
    with pytest.raises(InvalidArgument):
        map_namespaces("c1", [{"type": "ipc", "path": "/proc/1/ns/ipc"}], "pod1", None)


def test_own_settings_leave_the_pods_namespaces_and_hostname_out():
    config = {"hostname": "web", "linux": {"namespaces": [
        {"type": "pid"}, {"type": "uts", "path": "/proc/1/ns/uts"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]}}
    own = own_settings(config)
    assert own["linux"]["namespaces"] == [{"type": "pid"}]
    assert "hostname" not in own
    assert config["linux"]["namespaces"][1]["path"]  # the original is untouched
    assert own_settings({"hostname": "web", "linux": {"namespaces": [{"type": "uts"}]}})["hostname"] == "web"
