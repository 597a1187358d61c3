"""Fuzzing the RPC servers of the four real daemons (issue 13): generated malformed
messages (tests/helpers/fuzz.py), a fixed seed and a fixed count each (a time cap only
guards against a stall: a count, not a rate, so a loaded host cannot fail it);
bench/fuzz.py runs the same for 100,000+ messages each. Every message gets a reply, the
daemon keeps serving, and it holds no more fds afterwards than before."""

from __future__ import annotations

import os

import pytest

from hanabi_common.config import DAEMONS
from tests.helpers.fuzz import fuzz_daemon
from tests.helpers.hanabi import daemons_for_test

pytestmark = pytest.mark.integration
ITEMS = int(os.environ.get("HANABI_FUZZ_ITEMS", "1000"))
CAP_S = float(os.environ.get("HANABI_FUZZ_CAP_S", "300"))
SEED = 1313


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    with daemons_for_test(tmp_path_factory.mktemp("fuzz") / "hanabi") as started:
        yield started


@pytest.mark.parametrize("name", DAEMONS)
def test_rpc_server_survives_generated_malformed_messages(daemons, name):
    count = fuzz_daemon(daemons, name, budget_s=CAP_S, max_items=ITEMS,
                        first_seed=SEED + DAEMONS.index(name) * 1000)
    assert count >= ITEMS, f"only {count} of {ITEMS} messages answered in {CAP_S} s: stalled?"
