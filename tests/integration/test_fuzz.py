"""Fuzzing the RPC servers of the four real daemons (issue 13): generated malformed
messages (tests/helpers/fuzz.py), a fixed seed and a time budget of a few seconds each;
bench/fuzz.py runs the same for 100,000+ messages each. Every message gets a reply, the
daemon keeps serving, and it holds no more fds afterwards than before."""

from __future__ import annotations

import os

import pytest

from hanabi_common.config import DAEMONS
from hanabi_common.rpc.client import RpcClient
from tests.helpers.fuzz import RpcFuzzer, fd_count, mutate_frames, run_budgeted, settled_fd_count
from tests.helpers.hanabi import daemons_for_test

pytestmark = pytest.mark.integration
BUDGET_S = float(os.environ.get("HANABI_FUZZ_BUDGET_S", "3"))
SEED = 1313


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    with daemons_for_test(tmp_path_factory.mktemp("fuzz") / "hanabi") as started:
        yield started


def fuzz_daemon(daemons, name: str, *, budget_s: float, max_items: int, first_seed: int) -> int:
    """Fuzz one daemon; returns the number of messages it answered."""
    config = daemons.config
    client = RpcClient(name, config.endpoint(name), timeout=5)
    methods = sorted(client.call("describe")["methods"])
    pid = daemons.procs[name].pid
    baseline = fd_count(pid)
    fuzzer = RpcFuzzer(config.endpoint(name), methods, config.rpc.max_message_bytes)
    try:
        count = run_budgeted(fuzzer.strategy, fuzzer.check, first_seed=first_seed, budget_s=budget_s,
                             max_items=max_items, mutate=mutate_frames)
    finally:
        fuzzer.close()
    assert daemons.procs[name].poll() is None, f"{name} died"
    assert client.ping()["daemon"] == name
    assert settled_fd_count(pid, baseline) <= baseline, f"{name} leaked fds"
    return count


@pytest.mark.parametrize("name", DAEMONS)
def test_rpc_server_survives_generated_malformed_messages(daemons, name):
    count = fuzz_daemon(daemons, name, budget_s=BUDGET_S, max_items=10**9,
                        first_seed=SEED + DAEMONS.index(name) * 1000)
    assert count >= 1000, f"only {count} messages in {BUDGET_S} s"
