"""Client of Firecracker's REST API on its Unix socket (`firecracker --api-sock PATH`).

Every request body is a pydantic model from `models` serialized without None fields; the
(method, path) pairs are the ones of the vendored spec (checked by the contract tests).
Errors are hanabi's typed errors:

- the socket is missing or refuses connections  -> Unavailable (names the socket)
- no reply within the timeout                    -> DeadlineExceeded
- 400 with {"fault_message": ...}                -> InvalidArgument(fault_message)
- 404                                            -> NotFound
- other 4xx                                      -> FailedPrecondition
- 5xx or an unparseable reply                    -> Internal
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any
from collections.abc import Iterable

import requests
import requests_unixsocket
from pydantic import BaseModel, ValidationError

from hanabi_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HanabiError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)

from . import models as m

DEFAULT_TIMEOUT = 5.0


def _error_for_status(status: int, fault: str, method: str, path: str) -> HanabiError:
    details = {"status": status, "method": method, "path": path, "fault_message": fault}
    message = fault or f"firecracker {method} {path} failed with HTTP {status}"
    if status == 400:
        return InvalidArgument(message, details=details)
    if status == 404:
        return NotFound(message, details=details)
    if 400 <= status < 500:
        return FailedPrecondition(message, details=details)
    return Internal(message, details=details)


class FirecrackerApi:
    """One Firecracker process's API socket. Not thread-safe; one per sandbox."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._base = "http+unix://" + urllib.parse.quote(self.socket_path, safe="")
        self._session = requests_unixsocket.Session()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------

    def request(self, method: str, path: str, body: BaseModel | None = None,
                *, timeout: float | None = None) -> Any:
        """Send one request; return the decoded JSON reply (None for 204)."""
        payload = body.to_body() if isinstance(body, m._Request) else (
            body.model_dump(mode="json", exclude_none=True) if body is not None else None)
        timeout = self.timeout if timeout is None else timeout
        try:
            resp = self._session.request(
                method, self._base + path, json=payload, timeout=(timeout, timeout),
                headers={"Accept": "application/json"})
        except requests.exceptions.ConnectTimeout as exc:
            raise Unavailable(f"firecracker API socket {self.socket_path}: connect timed out",
                              details={"socket": self.socket_path}) from exc
        except requests.exceptions.Timeout as exc:
            raise DeadlineExceeded(
                f"firecracker {method} {path} on {self.socket_path}: no reply in {timeout}s",
                details={"socket": self.socket_path}) from exc
        except requests.exceptions.ConnectionError as exc:
            raise Unavailable(f"firecracker API socket {self.socket_path} unreachable: {exc}",
                              details={"socket": self.socket_path}) from exc
        if 200 <= resp.status_code < 300:
            if resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise Internal(f"firecracker {method} {path}: reply is not JSON") from exc
        fault = ""
        try:
            fault = m.ApiError.model_validate(resp.json()).fault_message
        except (ValueError, ValidationError):
            fault = resp.text.strip()[:500]
        raise _error_for_status(resp.status_code, fault, method, path)

    def _get(self, path: str, model: type[BaseModel]) -> Any:
        data = self.request("GET", path)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise Internal(f"firecracker GET {path}: unexpected reply: {exc}") from exc

    def wait_ready(self, timeout: float | None = None, interval: float = 0.01) -> m.InstanceInfo:
        """Poll GET / until the API answers; Unavailable when it does not within `timeout`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            try:
                return self.describe_instance(timeout=max(0.05, min(left, self.timeout)))
            except (Unavailable, DeadlineExceeded) as exc:
                if time.monotonic() + interval >= deadline:
                    raise Unavailable(
                        f"firecracker API socket {self.socket_path} not ready after "
                        f"{timeout if timeout is not None else self.timeout}s: {exc.message}",
                        details={"socket": self.socket_path}) from exc
                time.sleep(interval)

    # -- endpoints --------------------------------------------------------------------

    def describe_instance(self, *, timeout: float | None = None) -> m.InstanceInfo:
        data = self.request("GET", "/", timeout=timeout)
        try:
            return m.InstanceInfo.model_validate(data)
        except ValidationError as exc:
            raise Internal(f"firecracker GET /: unexpected reply: {exc}") from exc

    def get_machine_config(self) -> m.MachineConfigurationInfo:
        return self._get("/machine-config", m.MachineConfigurationInfo)

    def put_boot_source(self, boot: m.BootSource) -> None:
        self.request("PUT", "/boot-source", boot)

    def put_drive(self, drive: m.Drive) -> None:
        self.request("PUT", "/drives/" + _seg(drive.drive_id), drive)

    def patch_drive(self, drive: m.PartialDrive) -> None:
        self.request("PATCH", "/drives/" + _seg(drive.drive_id), drive)

    def put_machine_config(self, cfg: m.MachineConfiguration) -> None:
        self.request("PUT", "/machine-config", cfg)

    def put_network_interface(self, nic: m.NetworkInterface) -> None:
        self.request("PUT", "/network-interfaces/" + _seg(nic.iface_id), nic)

    def put_vsock(self, vsock: m.Vsock) -> None:
        self.request("PUT", "/vsock", vsock)

    def put_logger(self, logger: m.Logger) -> None:
        self.request("PUT", "/logger", logger)

    def put_metrics(self, metrics: m.Metrics) -> None:
        self.request("PUT", "/metrics", metrics)

    def action(self, action: m.InstanceActionInfo) -> None:
        self.request("PUT", "/actions", action)

    def instance_start(self) -> None:
        self.action(m.INSTANCE_START)

    def send_ctrl_alt_del(self) -> None:
        self.action(m.SEND_CTRL_ALT_DEL)

    def flush_metrics(self) -> None:
        self.action(m.FLUSH_METRICS)

    def pause(self) -> None:
        self.request("PATCH", "/vm", m.Vm(state="Paused"))

    def resume(self) -> None:
        self.request("PATCH", "/vm", m.Vm(state="Resumed"))

    def create_snapshot(self, params: m.SnapshotCreateParams) -> None:
        self.request("PUT", "/snapshot/create", params)

    def load_snapshot(self, params: m.SnapshotLoadParams) -> None:
        self.request("PUT", "/snapshot/load", params)

    def replay(self, steps: Iterable[tuple[str, str, BaseModel | None]]) -> None:
        """Send a request sequence, e.g. `boot.boot_sequence(...)`, stopping at the first error."""
        for method, path, body in steps:
            self.request(method, path, body)


def _seg(value: str) -> str:
    """One path segment; Firecracker ids are alphanumeric/underscore, but never allow '/'."""
    return urllib.parse.quote(value, safe="")
