"""Fixtures of the Docker end-to-end tests: the hanabi daemons and a private dockerd using them.

One session-wide dockerd (Debian's docker.io) with its own data root, exec root, API socket and
pid file under a temp dir, the hanabi runtimes registered in its daemon.json by
`docker_install.add_runtimes` (pointing at the test daemons' config), and a busybox image made
locally with `docker import`. A failing test gets the dockerd log lines written while it ran and
the ends of the hanabi daemons' logs in its report.
"""

from __future__ import annotations

import itertools
import re

import pytest

from tests.e2e.docker_env import PrivateDocker, e2e_skip_reason
from tests.e2e.engines import engine_fixture

_counter = itertools.count()


# A private dockerd with the hanabi runtimes, and the test image imported (dockerd.log goes
# next to the hanabi daemons' dir).
docker = engine_fixture("docker", lambda base, hanabi: PrivateDocker(base=base, logs=hanabi.root.parent, hanabi=hanabi),
                        prefix="hbe", skip_reason=e2e_skip_reason, start=PrivateDocker.start,
                        images=PrivateDocker.import_busybox, scope="session")


@pytest.fixture
def name(request, docker):
    """A fresh container name for the test; the container is removed (rm -f) afterwards."""
    made = f"e2e{next(_counter)}-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", request.node.name)[:40]
    yield made
    docker.remove(made)


@pytest.fixture(autouse=True)
def _docker_log_mark(request):
    """Remember where dockerd's log was when the test began (for the failure report)."""
    if "docker" in request.fixturenames:
        env = request.getfixturevalue("docker")
        try:
            request.node._dockerd_log_offset = env.log_path.stat().st_size
        except OSError:
            request.node._dockerd_log_offset = 0
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    env = item.funcargs.get("docker") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or env is None:
        return
    offset = getattr(item, "_dockerd_log_offset", 0)
    wanted = re.compile(r"level=(error|warning)|hanabi|OCI runtime|shim", re.I)
    lines = [line for line in env.log_tail(4000, since=offset).splitlines() if wanted.search(line)]
    report.sections.append(("dockerd log (errors, warnings, runtime lines) during the test", "\n".join(lines[-60:])))
    for daemon in ("vmmd", "agentd", "blockd", "netd"):
        path = env.hanabi.root / f"{daemon}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            continue
        report.sections.append((f"hanabi-{daemon} log (end)", "\n".join(tail)))
