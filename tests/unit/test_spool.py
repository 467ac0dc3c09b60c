"""The spool: commit, atomic rewrites, recovery after a crash at any step, hold/release."""

from __future__ import annotations

import itertools
import os
import threading

import pytest

from mta.spool import store
from mta.spool.envelope import DELIVERED, Envelope, EnvelopeError, Recipient
from mta.spool.store import Spool, SpoolError


def envelope(*recipients: str) -> Envelope:
    return Envelope("", "sender@example.org", [Recipient(r) for r in recipients or ("a@b.test",)],
                    arrival=1_800_000_000.0)


def commit(spool: Spool, data: bytes = b"Subject: x\r\n\r\nbody\r\n", *rcpts: str) -> str:
    incoming = spool.receive()
    incoming.write(data)
    return spool.commit(incoming, envelope(*rcpts))


def test_commit_puts_both_files_in_queue(tmp_path):
    spool = Spool(tmp_path)
    queue_id = commit(spool)
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == \
        [f"{queue_id}.env", f"{queue_id}.msg"]
    assert list((tmp_path / "tmp").iterdir()) == []
    loaded = spool.load(queue_id)
    assert loaded.queue_id == queue_id and loaded.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert spool.data_path(queue_id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"


def test_queue_ids_sort_by_arrival_and_are_unique(tmp_path):
    spool = Spool(tmp_path)
    ids = [spool.receive().queue_id for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert ids == sorted(ids)


def test_queue_ids_of_two_processes_differ(tmp_path, monkeypatch):
    # Same microsecond, same counter: only the pid tells them apart, all of it
    # (pids go up to 2**22), and the pid of now, not of before a daemon fork.
    first, second = Spool(tmp_path, clock=lambda: 1_800_000_000.0), \
        Spool(tmp_path, clock=lambda: 1_800_000_000.0)
    second.new_id.counter = itertools.count(0)
    first.new_id.counter = itertools.count(0)
    monkeypatch.setattr(os, "getpid", lambda: 1000)
    a = first.new_id()
    monkeypatch.setattr(os, "getpid", lambda: 1000 + 65536)
    b = second.new_id()
    assert a != b and a[:13] == b[:13]


def test_commit_failing_at_the_directory_sync_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    incoming = spool.receive()
    incoming.write(b"x")

    def no_sync(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "fsync_dir", no_sync)
    with pytest.raises(OSError):
        spool.commit(incoming, envelope())
    monkeypatch.undo()
    # The client hears 451: no envelope may stay behind to be delivered or quarantined.
    assert list((tmp_path / "queue").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert Spool(tmp_path).recover() == []
    assert list((tmp_path / "corrupt").iterdir()) == []


def test_abort_on_a_full_disk_still_removes_the_file(tmp_path):
    spool = Spool(tmp_path)
    incoming = spool.receive()
    real = incoming.file

    class Full:
        def close(self):
            real.close()
            raise OSError(28, "No space left on device")  # the buffered tail cannot be flushed

    incoming.file = Full()
    incoming.abort()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_concurrent_commits_share_directory_syncs(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    threads = [threading.Thread(target=commit, args=(spool,)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spool.queue_ids()) == 20
    # 2 file fsyncs per message; directory fsyncs at most one per message.
    assert len(calls) <= 20 * 3


def test_save_rewrites_atomically(tmp_path):
    spool = Spool(tmp_path)
    queue_id = commit(spool)
    env = spool.load(queue_id)
    env.recipients[0].state = DELIVERED
    spool.save(env)
    assert spool.load(queue_id).recipients[0].state == DELIVERED
    assert not list((tmp_path / "queue").glob(".*"))


def test_remove_hold_release(tmp_path):
    spool = Spool(tmp_path)
    queue_id = commit(spool)
    spool.hold(queue_id)
    assert spool.state_of(queue_id) == "hold" and spool.queue_ids() == []
    with pytest.raises(SpoolError):
        spool.hold(queue_id)
    spool.release(queue_id)
    assert spool.queue_ids() == [queue_id]
    spool.remove(queue_id)
    assert list((tmp_path / "queue").iterdir()) == []
    with pytest.raises(SpoolError):
        spool.load(queue_id)
    with pytest.raises(SpoolError):
        spool.load("../../etc/passwd")


def test_failed_commit_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    incoming = spool.receive()
    incoming.write(b"x")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        spool.commit(incoming, envelope())
    monkeypatch.undo()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "queue").iterdir()) == []


def test_recovery_after_a_crash_at_each_step(tmp_path):
    spool = Spool(tmp_path)
    kept = commit(spool)
    # Crash while receiving: data in tmp/ only.
    receiving = spool.receive()
    receiving.write(b"half a message")
    receiving.file.flush()
    # Crash between the two renames: data in queue/, no envelope.
    orphan = spool.receive()
    orphan.write(b"never acknowledged")
    orphan.file.close()
    os.rename(orphan.path, tmp_path / "queue" / f"{orphan.queue_id}.msg")
    # Crash while rewriting an envelope: a temporary file beside it.
    (tmp_path / "queue" / f".{kept}.env.tmp").write_text("{half")
    # A damaged envelope.
    damaged = commit(spool)
    (tmp_path / "queue" / f"{damaged}.env").write_text("{not json")
    # Crash in the middle of a hold: data moved, envelope not yet.
    split = commit(spool)
    os.rename(tmp_path / "queue" / f"{split}.msg", tmp_path / "hold" / f"{split}.msg")

    recovered = Spool(tmp_path).recover()
    assert sorted(e.queue_id for e in recovered) == sorted([kept, split])
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == \
        [f"{damaged}.env", f"{damaged}.msg"]
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == sorted(
        [f"{kept}.env", f"{kept}.msg", f"{split}.env", f"{split}.msg"])
    assert list((tmp_path / "hold").iterdir()) == []


def test_envelope_round_trip_and_rejects():
    env = envelope("x@y.test")
    env.recipients[0].notify = ("SUCCESS", "FAILURE")
    env.recipients[0].orcpt = "rfc822;x@y.test"
    env.envid = "abc"
    again = Envelope.from_json(env.to_json())
    assert again == env
    for raw in (b"", b"[]", b'{"version": 9}', b'{"version": 1, "queue_id": "A"}',
                (b'{"version": 1, "queue_id": "A", "reverse_path": "", "arrival": 1,'
                 b' "recipients": [{"address": "a@b", "state": "lost"}]}')):
        with pytest.raises(EnvelopeError):
            Envelope.from_json(raw)


def test_notices(tmp_path):
    spool = Spool(tmp_path)
    spool.notify("flush", domain="example.org")
    spool.notify("hold", queue_id="ABC")
    assert spool.take_notices() == [{"action": "flush", "domain": "example.org"},
                                    {"action": "hold", "queue_id": "ABC"}]
    assert spool.take_notices() == []
