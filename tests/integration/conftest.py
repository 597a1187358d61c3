"""Fixtures of the integration tests: real daemons, real QEMU, real guest."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.helpers.hanabi import daemons_for_test
from hanabi_runtime.demo_bundle import make_bundle

_counter = itertools.count()


@pytest.fixture(scope="session")
def hanabi(tmp_path_factory):
    """The four daemons, started once for the session under a temp run dir."""
    with daemons_for_test(tmp_path_factory.mktemp("hanabi")) as daemons:
        yield daemons


@pytest.fixture
def bundle(tmp_path):
    """Make a busybox bundle running the given args: bundle(args, **process)."""
    def make(args, **kwargs):
        return str(make_bundle(tmp_path / f"bundle{next(_counter)}", list(args), **kwargs))
    return make


@pytest.fixture
def cid(request):
    """A fresh container id for the test."""
    return f"t{next(_counter)}-" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:40]
