"""blockd's base store on a temp dir: atomic builds, reuse, vanished bases, vetoed removal,
crash leftovers (no root: the builds here write plain files)."""

from __future__ import annotations

import threading

import pytest

from hanabi_blockd.bases import BaseStore


def _writer(calls: list, data: bytes = b"base"):
    def build(partial):
        calls.append(partial)
        partial.write_bytes(data)
        return len(data)
    return build


def test_a_base_is_built_once_then_reused(tmp_path):
    store, calls = BaseStore(tmp_path / "bases"), []
    meta, built = store.obtain("k", "content", "d", "/src", _writer(calls))
    again, built_again = store.obtain("k", "content", "d", "/src", _writer(calls))
    assert (built, built_again, len(calls)) == (True, False, 1)
    assert calls[0].name == "k.raw.partial" and not calls[0].exists()
    assert store.path("k").read_bytes() == b"base" and oct(store.path("k").stat().st_mode & 0o777) == "0o444"
    assert again.last_used >= meta.last_used and [m.key for m in store.all()] == ["k"]


def test_a_failed_build_leaves_nothing(tmp_path):
    store = BaseStore(tmp_path / "bases")

    def failing(partial):
        partial.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        store.obtain("k", "content", "d", "/src", failing)
    assert list((tmp_path / "bases").iterdir()) == [] and store.get("k") is None


def test_a_vanished_image_drops_its_record(tmp_path):
    store = BaseStore(tmp_path / "bases")
    store.obtain("k", "content", "d", "/src", _writer([]))
    store.path("k").unlink()
    assert store.get("k") is None and list((tmp_path / "bases").iterdir()) == []
    assert store.obtain("k", "content", "d", "/src", _writer([]))[1] is True


def test_removal_can_be_vetoed_under_the_keys_lock(tmp_path):
    store = BaseStore(tmp_path / "bases")
    store.obtain("k", "content", "d", "/src", _writer([]))
    assert store.remove("k", unless=lambda: True) is False and store.get("k") is not None
    seen = []
    assert store.remove("k", unless=lambda: seen.append(store._locks.locked("k")) or False) is True
    assert seen == [True] and store.get("k") is None


def test_concurrent_obtains_build_once(tmp_path):
    store, calls = BaseStore(tmp_path / "bases"), []
    threads = [threading.Thread(target=store.obtain, args=("k", "c", "d", "/s", _writer(calls))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_clean_removes_crash_leftovers_only(tmp_path):
    store = BaseStore(tmp_path / "bases")
    store.obtain("good", "content", "d", "/src", _writer([]))
    d = tmp_path / "bases"
    for name in ("half.raw.partial", ".good.json.tmp123", "orphan.raw", "lonely.json"):
        (d / name).write_bytes(b"x")
    removed = sorted(p.name for p in store.clean())
    assert removed == [".good.json.tmp123", "half.raw.partial", "lonely.json", "orphan.raw"]
    assert sorted(p.name for p in d.iterdir()) == ["good.json", "good.raw"]
