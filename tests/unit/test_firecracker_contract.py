"""Contract tests: every request the Firecracker client can send, checked against the
vendored Firecracker v1.16.1 OpenAPI spec; the replies it parses, built from that spec."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from hanabi_vmmd.firecracker import boot, models as m
from hanabi_vmmd.firecracker.spec import SPEC_PATH, load_spec
from tests.helpers.firecracker_spec import spec_path_for, validate

SHARED_SPEC = Path(__file__).resolve().parents[3] / "shared/specs/firecracker/firecracker-v1.16.1.yaml"


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_spec()


# -- the vendored spec ---------------------------------------------------------------------

def test_vendored_spec_is_the_shared_one_and_licensed():
    if SHARED_SPEC.exists():
        assert SPEC_PATH.read_bytes() == SHARED_SPEC.read_bytes()
    assert (SPEC_PATH.parent / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_spec_loads_with_its_paths_and_definitions(spec):
    assert spec["swagger"] == "2.0" and spec["info"]["version"] == "1.16.1"
    assert "/drives/{drive_id}" in spec["paths"]
    assert spec["definitions"]["Logger"]["properties"]["level"]["enum"][-1] == "Off"
    assert spec["paths"]["/"]["get"]["responses"][200]["schema"]["$ref"] == "#/definitions/InstanceInfo"


# -- requests ----------------------------------------------------------------------------

TOKEN = m.TokenBucket(size=1000, refill_time=100, one_time_burst=10)
LIMITER = m.RateLimiter(bandwidth=TOKEN, ops=m.TokenBucket(size=10, refill_time=1000))

REQUEST_EXAMPLES: list[tuple[str, str, m._Request]] = [
    ("PUT", "/boot-source", m.BootSource(kernel_image_path="/k/vmlinux")),
    ("PUT", "/boot-source", m.BootSource(kernel_image_path="/k/vmlinux", initrd_path="/k/initrd",
                                         boot_args="console=ttyS0 reboot=k panic=1")),
    ("PUT", "/drives/rootfs", m.Drive(drive_id="rootfs", path_on_host="/r.img", is_root_device=True,
                                      is_read_only=True)),
    ("PUT", "/drives/data", m.Drive(drive_id="data", path_on_host="/d.img", is_root_device=False,
                                    is_read_only=False, cache_type="Writeback", io_engine="Async",
                                    partuuid="abcd-01", rate_limiter=LIMITER)),
    ("PATCH", "/drives/ph0", m.PartialDrive(drive_id="ph0", path_on_host="/vol.img")),
    ("PATCH", "/drives/ph1", m.PartialDrive(drive_id="ph1", rate_limiter=LIMITER)),
    ("PUT", "/machine-config", m.MachineConfiguration(vcpu_count=1, mem_size_mib=128)),
    ("PUT", "/machine-config", m.MachineConfiguration(vcpu_count=32, mem_size_mib=4096, smt=False,
                                                      track_dirty_pages=True, cpu_template="None",
                                                      huge_pages="2M")),
    ("PUT", "/network-interfaces/eth0", m.NetworkInterface(iface_id="eth0", host_dev_name="tap0")),
    ("PUT", "/network-interfaces/eth0", m.NetworkInterface(
        iface_id="eth0", host_dev_name="tap0", guest_mac="02:00:00:00:00:01", mtu=1500,
        rx_rate_limiter=LIMITER, tx_rate_limiter=LIMITER)),
    ("PUT", "/vsock", m.Vsock(guest_cid=3, uds_path="/v.sock")),
    ("PUT", "/logger", m.Logger(log_path="/fc.log", level="Off", show_level=True,
                                show_log_origin=True, module="api_server")),
    ("PUT", "/logger", m.Logger(log_path="/fc.log")),
    ("PUT", "/metrics", m.Metrics(metrics_path="/fc.metrics")),
    ("PUT", "/actions", m.INSTANCE_START),
    ("PUT", "/actions", m.SEND_CTRL_ALT_DEL),
    ("PUT", "/actions", m.FLUSH_METRICS),
    ("PATCH", "/vm", m.Vm(state="Paused")),
    ("PATCH", "/vm", m.Vm(state="Resumed")),
    ("PUT", "/snapshot/create", m.SnapshotCreateParams(snapshot_path="/s", mem_file_path="/mem")),
    ("PUT", "/snapshot/create", m.SnapshotCreateParams(snapshot_path="/s", mem_file_path="/mem",
                                                       snapshot_type="Diff")),
    ("PUT", "/snapshot/load", m.SnapshotLoadParams(snapshot_path="/s", mem_file_path="/mem")),
    ("PUT", "/snapshot/load", m.SnapshotLoadParams(
        snapshot_path="/s", mem_backend=m.MemoryBackend(backend_type="File", backend_path="/mem"),
        track_dirty_pages=True, resume_vm=True, clock_realtime=False,
        network_overrides=[m.NetworkOverride(iface_id="eth0", host_dev_name="tap9")],
        vsock_override=m.VsockOverride(uds_path="/v2.sock"))),
]


@pytest.mark.parametrize("method,path,body", REQUEST_EXAMPLES,
                         ids=[f"{m_} {p}" for m_, p, _ in REQUEST_EXAMPLES])
def test_request_bodies_match_the_spec(spec, method, path, body):
    validate(spec, method, spec_path_for(spec, path), body.to_body())


def test_every_request_model_has_an_example():
    sent = {type(b) for _, _, b in REQUEST_EXAMPLES}
    top_level = {m.BootSource, m.Drive, m.PartialDrive, m.MachineConfiguration, m.NetworkInterface,
                 m.Vsock, m.Logger, m.Metrics, m.InstanceActionInfo, m.Vm,
                 m.SnapshotCreateParams, m.SnapshotLoadParams}
    assert top_level <= sent


def test_strict_validation_catches_a_misspelled_field(spec):
    with pytest.raises(jsonschema.ValidationError):
        validate(spec, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "udspath": "/v"})
    with pytest.raises(jsonschema.ValidationError):
        validate(spec, "PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})


def test_models_refuse_what_the_spec_refuses():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        m.Vsock(guest_cid=2, uds_path="/v")
    with pytest.raises(ValidationError):
        m.MachineConfiguration(vcpu_count=0, mem_size_mib=128)
    with pytest.raises(ValidationError):
        m.Drive(drive_id="x", is_root_device=False, path="/typo")  # extra="forbid"
    with pytest.raises(ValidationError):
        m.SnapshotLoadParams(snapshot_path="/s")  # neither mem_backend nor mem_file_path


def test_every_client_call_is_a_spec_operation(spec):
    """Each (method, path) FirecrackerApi uses exists in the spec, with the model it sends."""
    from hanabi_vmmd.firecracker.api import FirecrackerApi

    calls: list[tuple[str, str, object]] = []

    class Recorder(FirecrackerApi):
        def request(self, method, path, body=None, *, timeout=None):
            calls.append((method, path, body))
            if path == "/":
                return {"app_name": "Firecracker", "id": "x", "state": "Running",
                        "vmm_version": "1.16.1"}
            if path == "/machine-config":
                return {"vcpu_count": 1, "mem_size_mib": 128}
            return None

    api = Recorder("/nonexistent.sock")
    api.describe_instance()
    api.get_machine_config()
    for _method, path, body in REQUEST_EXAMPLES:
        if isinstance(body, m.InstanceActionInfo):
            api.action(body)
            continue
        {
            "/boot-source": api.put_boot_source, "/machine-config": api.put_machine_config,
            "/vsock": api.put_vsock, "/logger": api.put_logger, "/metrics": api.put_metrics,
            "/snapshot/create": api.create_snapshot, "/snapshot/load": api.load_snapshot,
        }.get(path, lambda b: None)(body)
        if isinstance(body, m.Drive):
            api.put_drive(body)
        elif isinstance(body, m.PartialDrive):
            api.patch_drive(body)
        elif isinstance(body, m.NetworkInterface):
            api.put_network_interface(body)
    api.instance_start()
    api.send_ctrl_alt_del()
    api.flush_metrics()
    api.pause()
    api.resume()

    used = set()
    for method, path, body in calls:
        template = spec_path_for(spec, path)
        assert method.lower() in spec["paths"][template], f"{method} {path} not in spec"
        used.add((method, template))
        if body is not None:
            validate(spec, method, template, body.to_body())
    assert used == {
        ("GET", "/"), ("GET", "/machine-config"), ("PUT", "/boot-source"),
        ("PUT", "/drives/{drive_id}"), ("PATCH", "/drives/{drive_id}"), ("PUT", "/machine-config"),
        ("PUT", "/network-interfaces/{iface_id}"), ("PUT", "/vsock"), ("PUT", "/logger"),
        ("PUT", "/metrics"), ("PUT", "/actions"), ("PATCH", "/vm"), ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load")}


def _container_spec(**kw) -> boot.FcBootSpec:
    base = dict(kernel_image_path="/var/lib/hanabi/vmlinux", initrd_path="/var/lib/hanabi/initrd.img",
                boot_args="console=ttyS0 reboot=k panic=1 quiet", vcpus=2, memory_mib=512,
                vsock_uds_path="/run/hanabi/sb1/vsock.sock",
                drives=(boot.DriveSpec("rootfs", "/run/hanabi/sb1/rootfs.img", False, False),),
                placeholder_drives=4, placeholder_dir="/run/hanabi/sb1",
                tap_name="hnb-sb1", guest_mac="02:fc:00:00:00:01")
    base.update(kw)
    return boot.FcBootSpec(**base)


def test_whole_boot_sequence_for_a_container_matches_the_spec(spec):
    steps = boot.boot_sequence(_container_spec(log_path="/run/fc.log", metrics_path="/run/fc.metrics"))
    for method, path, body in steps:
        template = spec_path_for(spec, path)
        validate(spec, method, template, body.to_body())
        if "{" in template:  # the path's id is the body's id
            assert path.rsplit("/", 1)[1] == next(iter(body.to_body().values()))
    paths = [p for _, p, _ in steps]
    assert paths == ["/logger", "/metrics", "/boot-source", "/machine-config", "/drives/rootfs",
                     "/drives/ph0", "/drives/ph1", "/drives/ph2", "/drives/ph3",
                     "/network-interfaces/eth0", "/vsock", "/actions"]
    bodies = {p: b.to_body() for _, p, b in steps}
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    assert bodies["/vsock"] == {"guest_cid": 3, "uds_path": "/run/hanabi/sb1/vsock.sock"}
    assert bodies["/drives/ph2"] == {"drive_id": "ph2", "is_root_device": False, "is_read_only": False,
                                     "path_on_host": "/run/hanabi/sb1/ph2.img"}
    assert bodies["/network-interfaces/eth0"] == {"iface_id": "eth0", "host_dev_name": "hnb-sb1",
                                                  "guest_mac": "02:fc:00:00:00:01"}
    assert bodies["/actions"] == {"action_type": "InstanceStart"}


def test_minimal_boot_sequence_and_swap_match_the_spec(spec):
    steps = boot.boot_sequence(_container_spec(tap_name=None, guest_mac=None, placeholder_drives=0,
                                               initrd_path=None))
    assert [p for _, p, _ in steps] == ["/boot-source", "/machine-config", "/drives/rootfs",
                                        "/vsock", "/actions"]
    steps.append(boot.swap_placeholder(1, "/dev/mapper/vol"))
    for method, path, body in steps:
        validate(spec, method, spec_path_for(spec, path), body.to_body())


@pytest.mark.parametrize("kw", [dict(vcpus=0), dict(vcpus=33), dict(memory_mib=16),
                                dict(placeholder_dir=""), dict(tap_name=None),
                                dict(drives=(boot.DriveSpec("ph0", "/x"),)),
                                dict(drives=(boot.DriveSpec("a", "/a", is_root_device=True),
                                             boot.DriveSpec("b", "/b", is_root_device=True)))])
def test_boot_sequence_refuses_bad_specs(kw):
    from hanabi_common.errors import InvalidArgument
    with pytest.raises(InvalidArgument):
        boot.boot_sequence(_container_spec(**kw))


def test_placeholder_files_are_small_and_sparse(tmp_path):
    paths = boot.make_placeholder_files(_container_spec(placeholder_dir=str(tmp_path)))
    assert [p.name for p in paths] == ["ph0.img", "ph1.img", "ph2.img", "ph3.img"]
    assert all(p.stat().st_size == boot.PLACEHOLDER_SIZE for p in paths)
    assert all(p.stat().st_blocks == 0 for p in paths)


# -- replies -----------------------------------------------------------------------------

def example_from(spec: dict, name: str) -> dict:
    """An instance of a definition with every property set, built from the spec alone."""
    definition = spec["definitions"][name]
    out = {}
    for prop, schema in definition.get("properties", {}).items():
        if "$ref" in schema:
            target = schema["$ref"].rsplit("/", 1)[1]
            ref = spec["definitions"][target]
            out[prop] = ref["enum"][0] if "enum" in ref else example_from(spec, target)
        elif "enum" in schema:
            out[prop] = schema["enum"][-1]
        else:
            out[prop] = {"string": f"{prop}-value", "integer": schema.get("minimum", 1) + 1,
                         "boolean": True}[schema["type"]]
    return out


@pytest.mark.parametrize("definition,model", [("InstanceInfo", m.InstanceInfo),
                                              ("MachineConfiguration", m.MachineConfigurationInfo),
                                              ("Error", m.ApiError)])
def test_replies_built_from_the_spec_parse(spec, definition, model):
    doc = example_from(spec, definition)
    jsonschema.Draft4Validator({"$ref": f"#/definitions/{definition}",
                                "definitions": spec["definitions"]}).validate(doc)
    parsed = model.model_validate(doc)
    for key, value in doc.items():
        assert getattr(parsed, key) == value
    # only the required properties
    required = {k: v for k, v in doc.items() if k in spec["definitions"][definition].get("required", [])}
    model.model_validate(required)


def test_instance_states_of_the_spec_are_all_accepted(spec):
    for state in spec["definitions"]["InstanceInfo"]["properties"]["state"]["enum"]:
        assert m.InstanceInfo(app_name="Firecracker", id="x", state=state, vmm_version="1").state == state


def test_client_reply_paths_use_the_models_it_parses(spec):
    responses = {path: spec["paths"][path]["get"]["responses"][200]["schema"]["$ref"]
                 for path in ("/", "/machine-config")}
    assert responses == {"/": "#/definitions/InstanceInfo",
                         "/machine-config": "#/definitions/MachineConfiguration"}
    for path in ("/boot-source", "/actions", "/vm", "/drives/{drive_id}"):
        for op in spec["paths"][path].values():
            assert op["responses"][400]["schema"]["$ref"] == "#/definitions/Error"
