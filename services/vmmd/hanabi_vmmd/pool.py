"""The warm pool: VMs booted ahead of demand, handed to the next sandbox that fits.

Booting is most of a container's start (about 3.4 s under TCG here). With
`vmm.pool_size = N`, vmmd keeps N VMs of the default size (`vmm.memory_mib`,
`vmm.vcpus`) booted on a backend that hot-plugs (QEMU): nothing in the boot depends on
a bundle. `vm.create` for a sandbox of that size takes one (`VmService.create` renames
it to the sandbox and hot-plugs its NICs; disks come later as always), and the pool
boots a replacement in the background.

A pooled VM is an ordinary VM whose `hypervisor.json` lives in `<run_dir>/pool/<id>/`
instead of the sandboxes' directory, so the runtime, the other daemons and their leak
checks never see it; a restarted vmmd re-adopts pooled VMs like any other. This module
owns the bookkeeping (which pooled VMs are free, how many are booting, when to boot);
the service does the booting and the hand-over.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

from hanabi_common.errors import HanabiError

log = logging.getLogger("hanabi.vmmd.pool")
POOL_PREFIX = "pool-"
RETRY_AFTER_FAILURE_S = 10.0


def new_pool_id() -> str:
    """A fresh id for a pooled VM (a valid sandbox id; what makes it pooled is where its
    state file lives, not its name)."""
    return POOL_PREFIX + secrets.token_hex(6)


class WarmPool:
    """Keeps `size` VMs booted; `boot(pool_id)` boots one (raises on failure)."""

    def __init__(self, size: int, boot: Callable[[str], None]) -> None:
        self.size = size
        self._boot = boot
        self._free: list[str] = []
        self._booting = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmmd-pool", daemon=True)

    def start(self, adopted: list[str]) -> None:
        """Take the pooled VMs a restart found again, then keep the pool full."""
        with self._lock:
            self._free.extend(adopted)
        if self.size > 0:
            self._thread.start()
            self._wake.set()

    def take(self) -> str | None:
        """A free pooled VM's id (oldest first), or None; the pool then boots another."""
        with self._lock:
            taken = self._free.pop(0) if self._free else None
        if taken is not None:
            self._wake.set()
        return taken

    def forget(self, pool_id: str) -> None:
        """A pooled VM died or was found unusable: drop it (a replacement follows)."""
        with self._lock:
            if pool_id in self._free:
                self._free.remove(pool_id)
        self._wake.set()

    def free(self) -> list[str]:
        """The ids of the pooled VMs ready to be taken."""
        with self._lock:
            return list(self._free)

    def close(self) -> None:
        """Stop booting; pooled VMs keep running for the next vmmd."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _deficit(self) -> int:
        with self._lock:
            return self.size - len(self._free) - self._booting

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._deficit() <= 0:
                self._wake.wait()
                self._wake.clear()
                continue
            pool_id = new_pool_id()
            with self._lock:
                self._booting += 1
            try:
                self._boot(pool_id)
            except HanabiError as exc:
                log.warning("pooled vm did not boot", extra={"pool_id": pool_id, "error": exc.message})
                self._stop.wait(RETRY_AFTER_FAILURE_S)
                continue
            except Exception:  # noqa: BLE001 - the pool thread must go on
                log.exception("pooled vm did not boot", extra={"pool_id": pool_id})
                self._stop.wait(RETRY_AFTER_FAILURE_S)
                continue
            finally:
                with self._lock:
                    self._booting -= 1
            with self._lock:
                self._free.append(pool_id)
            log.info("pooled vm ready", extra={"pool_id": pool_id, "free": len(self._free)})
