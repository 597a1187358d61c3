"""The runtime's follower of link changes (hanabi_runtime.netfollow): which changes it applies."""

from __future__ import annotations

from hanabi_common.models.netd import Interface, LinkChange
from hanabi_runtime.netfollow import superseded


def change(seq: int, kind: str, tap: str) -> LinkChange:
    return LinkChange(seq=seq, kind=kind, interface=Interface(name="eth1", tap=tap, mac="02:00:00:00:00:02", mtu=1500))


def test_an_add_removed_later_is_superseded_and_holds_nothing_back():
    added, other, removed = change(1, "added", "tap1_h"), change(2, "added", "tap2_h"), change(3, "removed", "tap1_h")
    pending = [added, other, removed]
    assert superseded(added, pending[1:])
    assert not superseded(other, pending[2:])  # another link's add still applies
    assert not superseded(removed, [])          # a removal always applies


def test_an_add_removed_before_it_is_not_superseded():
    readded = change(3, "added", "tap1_h")
    assert not superseded(readded, [])  # connected again after a disconnect: plugged
