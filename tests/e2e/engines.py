"""What the private container engines of the end-to-end tests share (dockerd, podman,
containerd): the body of their fixtures, the busybox image import and the poll helper.

``engine_fixture`` makes each engine's module- or session-scoped fixture: skip with the
engine's own reason, start the hanabi daemons, make the engine on them with a short temp dir
of its own (AF_UNIX paths are limited to 108 bytes), start it and import its images, yield
it; close it and stop the daemons whatever happened (``engine`` is that body).
``import_busybox`` is the `docker import`/`podman import` of a busybox-static rootfs.
``wait_for`` polls a probe with a deadline.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from tests.helpers.hanabi import Daemons, daemons_for_test


class Engine(Protocol):
    """A private engine: made on the test's hanabi daemons, closed at the end."""

    setup_seconds: float

    def close(self) -> None: ...


E = TypeVar("E", bound=Engine)


def engine(root: Path, *, skip_reason: Callable[[], str | None], make: Callable[[Daemons], E],
           prepare: Callable[[E], None]) -> Iterator[E]:
    """Skip unless the engine can run here; else yield ``make(daemons)`` once ``prepare``d
    (``setup_seconds``: the daemons, the engine and its images), closed after, with the
    daemons under ``root`` stopped last."""
    started = time.monotonic()
    with daemons_for_test(root, skip_reason) as daemons:
        env = make(daemons)
        try:
            prepare(env)
            env.setup_seconds = round(time.monotonic() - started, 1)
            yield env
        finally:
            env.close()


def engine_fixture(name: str, make: Callable[..., E], *, prefix: str, skip_reason: Callable[[], str | None],
                   start: Callable[[E], None], images: Callable[[E], None], scope: str = "module") -> Any:
    """The pytest fixture ``name`` (of ``scope``) yielding ``make(base=<short temp dir
    /tmp/PREFIX-*>, hanabi=<the daemons, under a pytest temp dir PREFIX>)``, once
    ``start``ed and its ``images`` imported."""

    def prepare(env: E) -> None:
        start(env)
        images(env)

    @pytest.fixture(scope=scope, name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E]:
        yield from engine(tmp_path_factory.mktemp(prefix) / "hanabi", skip_reason=skip_reason, prepare=prepare,
                          make=lambda daemons: make(base=Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")),
                                                    hanabi=daemons))

    return fixture


def import_busybox(argv: list[str], image: str, workdir: Path, env: dict[str, str], what: str) -> None:
    """``argv import --change 'CMD ["sh"]' - image`` fed a tar of a fresh busybox rootfs
    (made under ``workdir``, removed after); RuntimeError naming ``what`` if it fails."""
    from hanabi_runtime.demo_bundle import make_rootfs

    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=workdir))
    make_rootfs(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        done = subprocess.run([*argv, "import", "--change", 'CMD ["sh"]', "-", image], stdin=tar.stdout,
                              capture_output=True, text=True, timeout=120, env=env)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)
    shutil.rmtree(rootfs, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} import failed: {done.stderr.strip()}")


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3) -> Any:
    """Poll ``probe()`` until it returns something true, and return that; fail with its
    last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f} s (last: {value!r})")
        time.sleep(interval)
