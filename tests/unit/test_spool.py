"""The spool: commit, atomic rewrites, recovery after a crash at any step, hold/release."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import zlib

import pytest

from mta.spool import store
from mta.spool.envelope import DELIVERED, Envelope, EnvelopeError, Recipient
from mta.spool.store import Spool, SpoolError


def envelope(*recipients: str) -> Envelope:
    return Envelope("", "sender@example.org", [Recipient(r) for r in recipients or ("a@b.test",)],
                    arrival=1_800_000_000.0)


def commit(spool: Spool, data: bytes = b"Subject: x\r\n\r\nbody\r\n", *rcpts: str) -> str:
    incoming = spool.receive(envelope(*rcpts))
    incoming.write(data)
    return spool.commit(incoming)


@pytest.fixture(params=["unnamed", "named"])
def spool(request, tmp_path, monkeypatch) -> Spool:
    """Both ways of receiving: O_TMPFILE files linked in at commit, and named files in
    tmp/ renamed at commit (filesystems without O_TMPFILE)."""
    if request.param == "named":
        monkeypatch.setattr(store, "_can_link_unnamed_files", lambda directory: False)
    made = Spool(tmp_path)
    assert made._unnamed == (request.param == "unnamed")
    return made


def test_commit_makes_one_file_holding_envelope_and_data(spool, tmp_path):
    queue_id = commit(spool)
    assert [p.name for p in (tmp_path / "queue").iterdir()] == [f"{queue_id}.msg"]
    assert list((tmp_path / "tmp").iterdir()) == []
    raw = (tmp_path / "queue" / f"{queue_id}.msg").read_bytes()
    assert raw.startswith(b"MTA2 {") and raw.endswith(b"\nSubject: x\r\n\r\nbody\r\n")
    loaded = spool.load(queue_id)
    assert loaded.queue_id == queue_id and loaded.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert spool.message_data(queue_id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    with spool.message_data(queue_id).open() as f:
        assert f.readline() == b"Subject: x\r\n"


def test_commit_sets_the_size_and_costs_one_file_fsync(spool, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd)))
    incoming = spool.receive(envelope())
    incoming.write(b"x" * 100)
    spool.commit(incoming)
    assert incoming.envelope.size == 100
    import stat
    assert [stat.S_ISDIR(m) for m in synced] == [False, True]  # the file, then queue/


def test_queue_ids_sort_by_arrival_and_are_unique(tmp_path):
    spool = Spool(tmp_path)
    ids = [spool.new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    # By their time: two made in the same microsecond may have the counter wrap
    # between them (it starts at random), and are the same arrival.
    times = [queue_id[:13] for queue_id in ids]
    assert times == sorted(times) and len(set(times)) > 1


def test_queue_ids_of_two_processes_differ(tmp_path, monkeypatch):
    # Same microsecond, same counter: only the pid tells them apart, all of it
    # (pids go up to 2**22), and the pid of now, not of before a daemon fork.
    first, second = Spool(tmp_path, clock=lambda: 1_800_000_000.0), \
        Spool(tmp_path, clock=lambda: 1_800_000_000.0)
    second.new_id.counter = itertools.count(0)
    first.new_id.counter = itertools.count(0)
    monkeypatch.setattr(store, "_pid", [1000])
    a = first.new_id()
    monkeypatch.setattr(store, "_pid", [1000 + 65536])
    b = second.new_id()
    assert a != b and a[:13] == b[:13]


def test_a_forked_child_makes_queue_ids_with_its_own_pid(tmp_path):
    spool = Spool(tmp_path)
    assert spool.new_id()[13:19] == f"{os.getpid() & 0xFFFFFF:06X}"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.write(write, spool.new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    made = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert made[13:19] == f"{child & 0xFFFFFF:06X}"
    assert spool.new_id()[13:19] == f"{os.getpid() & 0xFFFFFF:06X}"  # ours unchanged


def test_commit_failing_at_the_directory_sync_leaves_nothing(spool, tmp_path, monkeypatch):
    incoming = spool.receive(envelope())
    incoming.write(b"x")

    import stat
    real = os.fsync

    def no_directory_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_directory_sync)
    with pytest.raises(OSError):
        spool.commit(incoming)
    monkeypatch.undo()
    # The client hears 451: nothing may stay behind to be delivered or quarantined.
    assert list((tmp_path / "queue").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert Spool(tmp_path).recover() == []
    assert list((tmp_path / "corrupt").iterdir()) == []


def test_a_small_message_has_no_file_until_commit(spool, tmp_path, monkeypatch):
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda *a, **kw: (opened.append(a[0]), real(*a, **kw))[1])
    incoming = spool.receive(envelope())
    incoming.write(b"Subject: x\r\n\r\nsmall\r\n")
    assert opened == []  # the receiving thread made no system call for it
    queue_id = spool.commit(incoming)
    assert len(opened) >= 1
    assert spool.message_data(queue_id).read_bytes() == b"Subject: x\r\n\r\nsmall\r\n"


def test_a_large_message_goes_to_disk_as_it_arrives(spool, tmp_path):
    incoming = spool.receive(envelope())
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(store.WRITE_BUFFER // len(chunk) * 3):
        incoming.write(chunk)
    assert incoming.fd is not None
    assert len(incoming.buffer) < store.WRITE_BUFFER  # memory stays bounded
    incoming.abort()
    assert list((tmp_path / "tmp").iterdir()) == []
    incoming.abort()  # idempotent


@pytest.mark.parametrize("size", [100, store.WRITE_BUFFER * 3 + 7])
def test_checks_read_the_whole_message_and_prepend_fields(spool, tmp_path, size):
    """A small message (in memory) and a large one (partly on disk) alike."""
    body = b"Subject: x\r\n\r\n" + (b"y" * 98 + b"\r\n") * (size // 100)
    incoming = spool.receive(envelope())
    for i in range(0, len(body), 4096):
        incoming.write(body[i:i + 4096])
    assert (incoming.fd is not None) == (size > store.WRITE_BUFFER)
    assert incoming.read_data() == body
    incoming.prepend(b"DKIM-Signature: v=1\r\n")
    incoming.prepend(b"Authentication-Results: here; none\r\n")
    expected = b"Authentication-Results: here; none\r\nDKIM-Signature: v=1\r\n" + body
    assert incoming.read_data() == expected
    queue_id = spool.commit(incoming)
    assert spool.message_data(queue_id).read_bytes() == expected
    assert spool.open_message(queue_id)[0].size == len(expected)
    assert list((tmp_path / "tmp").iterdir()) == []  # the first file is gone


def test_a_prepend_that_fails_keeps_the_message_as_it_was(spool, tmp_path, monkeypatch):
    incoming = spool.receive(envelope())
    body = b"Subject: x\r\n\r\n" + b"z" * (store.WRITE_BUFFER * 2)
    incoming.write(body)
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        incoming.prepend(b"X-Field: 1\r\n")
    monkeypatch.setattr(os, "write", real)
    assert incoming.read_data() == body
    queue_id = spool.commit(incoming)
    assert spool.message_data(queue_id).read_bytes() == body
    assert list((tmp_path / "tmp").iterdir()) == []


def test_concurrent_commits_share_directory_syncs(spool, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    threads = [threading.Thread(target=commit, args=(spool,)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spool.queue_ids()) == 20
    # 1 file fsync per message; directory fsyncs at most one per message.
    assert len(calls) <= 20 * 2


def test_save_records_a_state_beside_the_message(spool, tmp_path):
    queue_id = commit(spool)
    message = (tmp_path / "queue" / f"{queue_id}.msg").read_bytes()
    env = spool.load(queue_id)
    env.recipients[0].state = DELIVERED
    spool.save(env)
    assert spool.load(queue_id).recipients[0].state == DELIVERED
    assert spool.load(queue_id).size == env.size
    assert (tmp_path / "queue" / f"{queue_id}.msg").read_bytes() == message  # untouched
    assert spool.message_data(queue_id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert not list((tmp_path / "queue").glob(".*"))


def test_remove_hold_release(spool, tmp_path):
    queue_id = commit(spool)
    env = spool.load(queue_id)
    env.attempts = 2
    spool.save(env)
    spool.hold(queue_id)
    assert spool.state_of(queue_id) == "hold" and spool.queue_ids() == []
    assert spool.load(queue_id).attempts == 2  # the state moved with the message
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


def test_failed_commit_leaves_nothing(spool, tmp_path, monkeypatch):
    incoming = spool.receive(envelope())
    incoming.write(b"x")

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", no_room)
    monkeypatch.setattr(os, "rename", no_room)
    with pytest.raises(OSError):
        spool.commit(incoming)
    monkeypatch.undo()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "queue").iterdir()) == []


def test_recovery_after_a_crash_at_each_step(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_can_link_unnamed_files", lambda directory: False)
    spool = Spool(tmp_path)
    kept = commit(spool)
    # Crash while receiving: a named file in tmp/ only (an unnamed one leaves nothing).
    receiving = spool.receive(envelope())
    receiving.write(b"half a message")
    receiving.flush()
    # Crash while saving a state: a temporary file beside the message.
    (tmp_path / "queue" / f".{kept}.env.tmp").write_text("{half")
    # A damaged message (its envelope line) and a damaged state.
    damaged = commit(spool)
    (tmp_path / "queue" / f"{damaged}.msg").write_bytes(b"MTA2 {not json\nbody")
    bad_state = commit(spool)
    (tmp_path / "queue" / f"{bad_state}.env").write_text("{not json")
    # Crash in the middle of a hold: the message moved, its state not yet.
    split = commit(spool)
    env = spool.load(split)
    env.attempts = 3
    spool.save(env)
    os.rename(tmp_path / "queue" / f"{split}.msg", tmp_path / "hold" / f"{split}.msg")
    # Crash in the middle of a removal: the state is left without its message.
    removed = commit(spool)
    spool.save(spool.load(removed))
    (tmp_path / "queue" / f"{removed}.msg").unlink()

    recovered = Spool(tmp_path).recover()
    assert sorted(e.queue_id for e in recovered) == [kept]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == sorted(
        [f"{damaged}.msg", f"{bad_state}.env", f"{bad_state}.msg"])
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == [f"{kept}.msg"]
    assert sorted(p.name for p in (tmp_path / "hold").iterdir()) == [
        f"{split}.env", f"{split}.msg"]
    assert Spool(tmp_path).load(split).attempts == 3


def test_a_spool_of_the_earlier_format_is_read(tmp_path):
    # Before one file per message: ID.msg the data alone, ID.env the envelope.
    spool = Spool(tmp_path)
    env = envelope("x@y.test")
    env.queue_id, env.size = "0123456789ABC000001000", 5
    (tmp_path / "queue" / f"{env.queue_id}.msg").write_bytes(b"hello")
    (tmp_path / "queue" / f"{env.queue_id}.env").write_bytes(env.to_json())
    assert [e.queue_id for e in Spool(tmp_path).recover()] == [env.queue_id]
    assert spool.message_data(env.queue_id).read_bytes() == b"hello"
    assert spool.load(env.queue_id).recipients[0].address == "x@y.test"


def test_an_envelope_is_stored_without_its_defaults_and_read_back_whole():
    env = envelope("x@y.test")
    raw = env.to_json()
    assert json.loads(raw) == {"queue_id": env.queue_id, "reverse_path": env.reverse_path,
                               "recipients": [{"address": "x@y.test"}],
                               "arrival": env.arrival, "version": 1}
    assert Envelope.from_json(raw) == env
    # Every field away from its default is kept, and comes back as it was.
    env.recipients.append(Recipient(
        address="z@y.test", orcpt="rfc822;z@y.test", notify=("NEVER",), state="failed",
        status="5.1.1", diagnostic="no such user", remote_mta="mx.y.test", updated=2.5,
        notified=True, delay_warned=True, sender="owner@y.test", expansion=True))
    env.client_address, env.client_helo, env.client_hostname = "192.0.2.1", "c.test", "c.test"
    env.protocol, env.auth_identity, env.ret, env.envid = "ESMTPSA", "alice", "HDRS", "e1"
    env.body, env.smtputf8, env.size, env.attempts = "8BITMIME", True, 42, 3
    env.next_attempt, env.last_error, env.is_report, env.extra = 9.5, "451 later", True, {"k": 1}
    assert Envelope.from_json(env.to_json()) == env
    full = env.as_record()
    assert set(full) == {f.name for f in dataclasses.fields(Envelope)} | {"version"}
    assert set(full["recipients"][0]) == {f.name for f in dataclasses.fields(Recipient)}
    # A record with every field, as mta wrote them before, is read the same.
    assert Envelope.from_json(json.dumps(full).encode()) == env
    assert Envelope.from_json(json.dumps(envelope("x@y.test").as_record()).encode()) \
        == envelope("x@y.test")


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


def test_a_save_that_fails_leaves_no_temporary_file(spool, tmp_path, monkeypatch):
    queue_id = commit(spool)
    env = spool.load(queue_id)
    env.attempts = 1

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        spool.save(env)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == [f"{queue_id}.msg"]
    assert spool.load(queue_id).attempts == 0


@pytest.mark.parametrize(("field", "value"), [
    ("next_attempt", "soon"), ("next_attempt", True), ("attempts", 1.5), ("arrival", None),
    ("reverse_path", 7), ("body", "9BIT"), ("smtputf8", "yes"), ("recipients", []),
    ("size", "big"), ("surprise", 1),
    ("recipients.state", "gone"), ("recipients.notify", ["SOMETIMES"]),
    ("recipients.updated", "now"), ("recipients.notified", 0), ("recipients.address", None),
])
def test_a_mistyped_envelope_field_is_damage_not_a_crash(spool, tmp_path, field, value):
    """A well-formed JSON envelope with a field of the wrong type goes to corrupt/ at
    start, is listed as damaged, and never reaches the scheduler."""
    good = commit(spool)
    bad = commit(spool)
    state = json.loads(spool.load(bad).to_json())
    if field.startswith("recipients."):
        state["recipients"][0][field.split(".")[1]] = value
    else:
        state[field] = value
    (tmp_path / "queue" / f"{bad}.env").write_text(json.dumps(state))
    with pytest.raises(EnvelopeError):
        spool.load(bad)
    listed = dict(spool.scan())
    assert isinstance(listed[bad], ValueError) and isinstance(listed[good], dict)
    loaded = spool.load_committed(spool.queue_ids())
    assert [e.queue_id for e in loaded] == [good]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [f"{bad}.env", f"{bad}.msg"]


def _ids_and_kinds(messages):
    return [(queue_id, type(found).__name__) for queue_id, found in messages]


def test_a_large_queue_is_read_by_several_processes_in_order(spool, tmp_path, monkeypatch):
    """scan_runs gives what one sequential scan gives, run by run, damaged ones included."""
    ids = [commit(spool) for _ in range(23)]
    (tmp_path / "queue" / f"{ids[7]}.env").write_text("{not json")
    monkeypatch.setattr(store, "SCAN_RUN", 3)
    monkeypatch.setattr(store, "SCAN_WORKERS", 4)
    runs = spool.scan_runs(store.QUEUE, _ids_and_kinds)
    assert len(runs) == 4  # four processes, each a run of consecutive messages
    expected = _ids_and_kinds(spool.scan())
    assert [pair for run in runs for pair in run] == expected
    assert expected[7] == (ids[7], "JSONDecodeError") and len(expected) == 23
    import multiprocessing
    assert multiprocessing.active_children() == []  # the readers are gone
    monkeypatch.setattr(store, "SCAN_RUN", 100)  # small: one run, read in this process
    assert spool.scan_runs(store.QUEUE, _ids_and_kinds) == [expected]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_scan_asks_for_a_batch_of_files_before_it_reads_one(spool, tmp_path, monkeypatch):
    """Every file of a batch is open and asked for before the first of them is read; a
    message gone since the listing is left out, a file that cannot be read is
    damaged, and the order is the queue's, across batches."""
    ids = [commit(spool) for _ in range(8)]
    changed = spool.load(ids[2])
    changed.attempts = 1
    spool.save(changed)
    (tmp_path / "queue" / f"{ids[5]}.msg").unlink()
    (tmp_path / "queue" / f"{ids[5]}.msg").mkdir()  # opens, cannot be read: damaged
    listed = [(queue_id, queue_id == ids[2]) for queue_id in ids]
    listed.insert(4, ("0123ABCD", False))  # delivered between the listing and the reading
    monkeypatch.setattr(store, "SCAN_BATCH", 3)
    events: list[str] = []
    advise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, *args: events.append("ask") or advise(fd, *args))
    read = store._envelope_from
    monkeypatch.setattr(store, "_envelope_from",
                        lambda fd, *args: events.append("read") or read(fd, *args))
    before = _open_fds()
    found = list(store._scan_run(str(tmp_path / "queue"), listed))
    assert _open_fds() == before
    assert [queue_id for queue_id, _ in found] == ids
    assert isinstance(found[5][1], IsADirectoryError)
    assert found[2][1]["attempts"] == 1 and found[3][1]["size"] > 0
    # Batches of three listed: 0-2, 3 + the gone one + 4, 5-7.
    assert "".join(e[0] for e in events) == "aaarrr" "aarr" "aaarrr"


def test_a_scan_stopped_early_leaves_no_file_open(spool, tmp_path, monkeypatch):
    ids = [commit(spool) for _ in range(7)]
    monkeypatch.setattr(store, "SCAN_BATCH", 5)
    before = _open_fds()
    messages = spool.scan()
    assert next(messages)[0] == ids[0]
    assert len(_open_fds() - before) == 5  # the directory, and a batch of five less the one read
    messages.close()
    assert _open_fds() == before


def test_recovery_and_the_queue_leave_the_mta_sts_cache_alone(spool, tmp_path):
    from mta.delivery.mta_sts import Policy, read_cached, write_cached
    directory = tmp_path / "sts"  # SPOOL/sts, where the relayer keeps MTA-STS policies
    write_cached(directory, "example.com", Policy("enforce", ("mx.example.com",), 86400, "1"))
    queue_id = commit(spool)
    assert spool.recover_files() == [queue_id]
    assert [qid for qid, _ in spool.scan()] == [queue_id]
    assert read_cached(directory, "example.com").id == "1"
    assert sorted(p.name for p in directory.iterdir()) == ["example.com.json"]


def test_a_large_queue_is_still_read_where_processes_cannot_be_made(spool, monkeypatch):
    """No /dev/shm for the pool's locks, say: one process reads it all, in order."""
    import concurrent.futures

    ids = [commit(spool) for _ in range(7)]
    monkeypatch.setattr(store, "SCAN_RUN", 2)

    def no_pool(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    runs = spool.scan_runs(store.QUEUE, _ids_and_kinds)
    assert runs == [[(queue_id, "dict") for queue_id in ids]]


def test_a_scan_gives_the_size_of_an_empty_message_with_a_state(spool):
    """A state file leaves out a size of 0, as every field at its default: a scan says 0."""
    queue_id = spool.inject(envelope("x@y.test"), b"")
    env = spool.load(queue_id)
    env.attempts = 1
    spool.save(env)
    assert b'"size"' not in (spool.root / "queue" / f"{queue_id}.env").read_bytes()
    [(found_id, found)] = list(spool.scan())
    assert found_id == queue_id and found["size"] == 0 and found["attempts"] == 1


@pytest.mark.parametrize("body_size, recipients", [(10, 1), (5000, 1), (10, 300), (70_000, 300)])
def test_a_scan_gives_each_message_its_size(spool, body_size, recipients):
    """Small and large messages, short and long envelope lines (a file read whole, or not)."""
    env = Envelope(queue_id="", reverse_path="a@client.test",
                   recipients=[Recipient(address=f"user{i}@example.org") for i in range(recipients)],
                   arrival=1.0)
    body = b"Subject: s\r\n\r\n" + b"x" * body_size
    queue_id = spool.inject(env, body)
    [(found_id, found)] = list(spool.scan())
    assert found_id == queue_id and found["size"] == len(body)
    assert len(found["recipients"]) == recipients


def test_a_shape_learnt_for_envelopes_does_not_pass_a_recipient(spool):
    """The checks of a shape seen good are kept per kind of object: an envelope's fields
    in the place of a recipient are damage, after envelopes of that shape were read."""
    from mta.spool.envelope import validate
    state = json.loads(spool.load(commit(spool)).to_json())
    validate(state)
    validate(dict(state))  # the same shape again: fine
    bad = dict(state)
    bad["recipients"] = [dict(state)]
    with pytest.raises(EnvelopeError):
        validate(bad)
    for value in (float("inf"), float("nan")):
        with pytest.raises(EnvelopeError):
            validate(dict(state, next_attempt=value))  # a learnt shape still checks values
    with pytest.raises(EnvelopeError):
        validate(dict(state, body="9BIT"))


def _need_unnamed_files(spool: Spool) -> None:
    """Spare files are for unnamed files (O_TMPFILE): a laptop whose temporary file
    system lacks them skips; CI must run these tests."""
    if spool._unnamed:
        return
    why = "no O_TMPFILE here: spare files are for unnamed files only"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def test_spare_files_are_made_ahead_and_messages_take_them(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    _need_unnamed_files(spool)
    spool.keep_spare_files(3)
    spool._blanks.close()  # spare files alone here: blanks are tested below
    spool._blanks = None
    spool.top_up_spare_files()
    spares = spool._spares
    assert len(spares._files) == 2  # two at a time
    for _ in range(5):
        spool.top_up_spare_files()
    assert len(spares._files) == 3  # no more than wanted
    made = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **kw: (made.append(a[0]), real_open(*a, **kw))[1])
    ids = [commit(spool, b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(2)]
    assert not [p for p in made if str(p).endswith("tmp/")]  # both took a spare file
    assert len(spares._files) == 1
    for i, queue_id in enumerate(ids):
        assert spool.message_data(queue_id).read_bytes() == b"Subject: %d\r\n\r\nbody\r\n" % i
    monkeypatch.setattr(os, "open", real_open)
    assert list((tmp_path / "tmp").iterdir()) == []  # unnamed: nothing to clean up, ever
    left = list(spares._files)
    spool.stop_spare_files()
    assert spool._spares is None and spares._files == []
    for fd in left:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    spool.top_up_spare_files()  # stopped: makes nothing
    spares.top_up()
    assert spares._files == []
    queue_id = commit(spool)  # without spares, a message makes its own file
    assert spool.message_data(queue_id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"


def test_a_spare_file_that_cannot_be_made_leaves_the_error_to_the_commit(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    _need_unnamed_files(spool)
    spool.keep_spare_files(2)

    def full(path, flags, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "open", full)
    spool.top_up_spare_files()  # quietly makes none
    incoming = spool.receive(envelope())
    incoming.write(b"x")
    with pytest.raises(OSError, match="No space"):
        spool.commit(incoming)  # the commit meets the error, and the client hears 451
    monkeypatch.undo()
    spool.top_up_spare_files()
    assert len(spool._spares._files) == 2
    spool.stop_spare_files()


def test_a_named_spool_keeps_no_spare_files(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_can_link_unnamed_files", lambda directory: False)
    spool = Spool(tmp_path)
    spool.keep_spare_files()
    spool.top_up_spare_files()
    assert spool._spares is None
    spool.stop_spare_files()


def test_a_scan_reads_smaller_batches_where_few_files_may_be_open(spool, monkeypatch):
    """A process with a low limit on open files (ulimit -n) still lists every message:
    a batch stops where opening fails for the limit, and the next starts there."""
    import resource
    ids = [commit(spool) for _ in range(30)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(_open_fds())
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 6, hard))  # the directory and 5 files
    try:
        found = list(spool.scan())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [(queue_id, type(envelope).__name__) for queue_id, envelope in found] == \
        [(queue_id, "dict") for queue_id in ids]


def test_loading_reads_states_skips_what_moved_and_quarantines_damage(spool, tmp_path,
                                                                      monkeypatch):
    """The start-up load, in batches: a message's state file wins over its first line, a
    message put on hold (or delivered) since its id was listed is skipped, a file whose
    name is no queue id is left alone, and damage goes to corrupt/, batch after batch."""
    monkeypatch.setattr(store, "SCAN_BATCH", 2)
    ids = [commit(spool) for _ in range(6)]
    tried = spool.load(ids[0])
    tried.attempts, tried.next_attempt = 2, 1e10
    spool.save(tried)
    spool.hold(ids[1])
    spool.remove(ids[2])
    (tmp_path / "queue" / f"{ids[3]}.msg").write_bytes(b"MTA2 {\"queue_id\": 7}\n")
    (tmp_path / "queue" / "notes.msg").write_bytes(b"an operator's file")
    other = tmp_path / "queue" / f"{ids[4]}.msg"
    other.write_bytes(other.read_bytes().replace(ids[4].encode(), ids[5].encode(), 1))
    loaded = spool.load_committed(ids + ["notes"])
    assert [e.queue_id for e in loaded] == [ids[0], ids[5]]
    assert loaded[0].attempts == 2 and loaded[1].size > 0
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == \
        [f"{ids[3]}.msg", f"{ids[4]}.msg"]
    assert (tmp_path / "queue" / "notes.msg").exists()
    assert [e.queue_id for e in spool.load_committed([ids[1]], store.HOLD)] == [ids[1]]


def test_recovery_lists_each_directory_once(spool, tmp_path, monkeypatch):
    """The server listens only after `recover_files`: with 100,000 messages queued, each
    listing of queue/ is a tenth of a second or more."""
    ids = [commit(spool) for _ in range(3)]
    spool.hold(ids[2])
    listings: list[str] = []
    listdir, scandir = os.listdir, os.scandir
    monkeypatch.setattr(os, "listdir", lambda path=".": listings.append(
        os.path.basename(os.path.normpath(path))) or listdir(path))
    monkeypatch.setattr(os, "scandir", lambda path=".": listings.append(
        os.path.basename(os.path.normpath(path))) or scandir(path))
    assert spool.recover_files() == ids[:2]
    assert sorted(listings) == ["hold", "queue", "tmp"]


# -- blanks: messages committed into files named ahead of need -----------------------


def _blank_spool(tmp_path, count: int = 8) -> Spool:
    spool = Spool(tmp_path)
    _need_unnamed_files(spool)
    spool.keep_spare_files(count)
    spool.top_up_spare_files()
    return spool


def _blanks_in(tmp_path) -> list[str]:
    return sorted(p.name[:-4] for p in (tmp_path / "queue").glob("*.msg")
                  if p.stat().st_size == 0)


def test_blanks_are_made_in_a_batch_with_one_directory_fsync(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    _need_unnamed_files(spool)
    spool.keep_spare_files(8)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    spool.top_up_spare_files()
    assert synced == [str(tmp_path / "queue")]  # one, of the directory
    ready = [queue_id for queue_id, _ in spool._blanks._ready]
    assert len(ready) == 8 and ready == sorted(ready) == _blanks_in(tmp_path)
    spool.top_up_spare_files()  # as many as wanted: no more
    assert len(spool._blanks._ready) == 8 and len(synced) == 1
    spool.stop_spare_files()
    assert _blanks_in(tmp_path) == []  # the ones not taken are gone


def test_a_message_alone_is_committed_into_a_blank_with_one_fsync(tmp_path, monkeypatch):
    spool = _blank_spool(tmp_path)
    first = _blanks_in(tmp_path)[0]
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    data = b"Subject: x\r\n\r\nbody\r\n"
    queue_id = commit(spool, data)
    assert queue_id == first  # the oldest blank: ids keep the order of arrival
    path = tmp_path / "queue" / f"{queue_id}.msg"
    assert synced == [path.stat().st_ino]  # the file's fsync, and no directory's
    raw = path.read_bytes()
    assert raw.startswith(b"MTA3 ") and raw.endswith(b"\n" + data)
    assert int(raw[5:13], 16) == zlib.crc32(raw[14:])
    loaded = spool.load(queue_id)
    assert loaded.queue_id == queue_id and loaded.size == len(data)
    assert spool.message_data(queue_id).read_bytes() == data
    assert spool.unchanged(queue_id).read_bytes() == data
    listed = list(spool.scan())  # a listing leaves the other blanks out
    assert [(i, e["size"]) for i, e in listed] == [(queue_id, len(data))]
    assert spool.queue_ids() == [queue_id]  # committed ones only
    assert len(spool.queue_ids(blanks=True)) == 8
    assert [e.queue_id for e in spool.load_committed(spool.queue_ids(blanks=True))] == [queue_id]
    assert len(_blanks_in(tmp_path)) == 7  # our own blanks: kept, this process runs
    assert list((tmp_path / "corrupt").iterdir()) == []
    spool.stop_spare_files()


def test_a_blank_is_given_back_when_its_message_is_dropped(tmp_path):
    spool = _blank_spool(tmp_path)
    incoming = spool.receive(envelope())
    incoming.write(b"Subject: dropped\r\n\r\n")
    taken = incoming.queue_id
    incoming.abort()
    incoming.abort()  # idempotent: given back once
    assert [queue_id for queue_id, _ in spool._blanks._ready].count(taken) == 1
    assert taken in _blanks_in(tmp_path)
    assert commit(spool) == taken  # the next message takes it
    assert spool.load(taken).size > 0


def test_a_message_that_outgrows_the_buffer_gives_up_its_blank(tmp_path):
    spool = _blank_spool(tmp_path)
    incoming = spool.receive(envelope())
    queue_id = incoming.queue_id
    assert queue_id in _blanks_in(tmp_path)
    data = b"Subject: big\r\n\r\n" + b"x" * (store.WRITE_BUFFER * 2)
    incoming.write(data)
    assert not (tmp_path / "queue" / f"{queue_id}.msg").exists()  # received in tmp/
    assert spool.commit(incoming) == queue_id  # linked in under the same name
    raw = (tmp_path / "queue" / f"{queue_id}.msg").read_bytes()
    assert raw.startswith(b"MTA2 {") and spool.message_data(queue_id).read_bytes() == data


def test_messages_open_together_take_no_blanks(tmp_path):
    """Concurrent commits share directory fsyncs; blanks are for a message alone."""
    spool = _blank_spool(tmp_path)
    blanks = set(_blanks_in(tmp_path))
    first, second = spool.receive(envelope()), spool.receive(envelope())
    assert first.queue_id in blanks and second.queue_id not in blanks
    for incoming in (second, first):
        incoming.write(b"Subject: together\r\n\r\n")
        spool.commit(incoming)
    assert spool.load(first.queue_id).size == spool.load(second.queue_id).size > 0
    assert commit(spool) in blanks  # alone again


def test_a_failed_commit_into_a_blank_leaves_nothing(tmp_path, monkeypatch):
    spool = _blank_spool(tmp_path)
    incoming = spool.receive(envelope())
    incoming.write(b"Subject: x\r\n\r\n")

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        spool.commit(incoming)
    monkeypatch.undo()
    assert not (tmp_path / "queue" / f"{incoming.queue_id}.msg").exists()
    incoming.abort()  # what the session does after a failed commit: nothing more
    assert spool._open == 0
    ready = _blanks_in(tmp_path)
    assert commit(spool) == ready[0]  # alone again: a blank


def test_recovery_removes_the_blanks_of_processes_gone_and_keeps_a_running_ones(tmp_path):
    spool = _blank_spool(tmp_path)
    ours = _blanks_in(tmp_path)
    dead_pid = next(pid for pid in range(4_000_000, 4_100_000) if not _runs(pid))
    dead = f"{0x5F0000000000:013X}{dead_pid:06X}001"
    (tmp_path / "queue" / f"{dead}.msg").write_bytes(b"")
    # One an earlier process with our process id made: not among ours, so gone too.
    earlier = f"{0x5F0000000000:013X}{os.getpid() & 0xFFFFFF:06X}002"
    (tmp_path / "queue" / f"{earlier}.msg").write_bytes(b"")
    # Those of a process that runs (our parent) may be written into at any moment: a
    # blank, and one half written (its checksum does not match yet), are left alone.
    running = [f"{0x5F0000000000 + n:013X}{os.getppid() & 0xFFFFFF:06X}003" for n in (1, 2)]
    (tmp_path / "queue" / f"{running[0]}.msg").write_bytes(b"")
    (tmp_path / "queue" / f"{running[1]}.msg").write_bytes(
        b'MTA3 00000000 {"queue_id": "%s"}\nSubject: half' % running[1].encode())
    queued = commit(spool)
    ids = spool.recover_files()
    assert {dead, earlier, *running} <= set(ids)
    assert [e.queue_id for e in spool.load_committed(ids)] == [queued]
    assert not (tmp_path / "queue" / f"{dead}.msg").exists()
    assert not (tmp_path / "queue" / f"{earlier}.msg").exists()
    assert all((tmp_path / "queue" / f"{queue_id}.msg").exists() for queue_id in running)
    assert _blanks_in(tmp_path) == sorted(ours[1:] + running[:1])  # ours: in use any moment
    assert list((tmp_path / "corrupt").iterdir()) == []


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@pytest.mark.parametrize("damage", ["cut short", "a block of zeros", "one octet changed",
                                    "no checksum"])
def test_a_commit_into_a_blank_that_a_crash_cut_short_is_known_by_its_checksum(tmp_path, damage):
    """A machine crash in the middle of the fsync can leave the file shorter, or with
    blocks never written; the client never heard 250.  Recovery moves it to corrupt/,
    where a human can look; a listing, which trusts the checksum, still shows it."""
    spool = _blank_spool(tmp_path)
    good = commit(spool, b"Subject: good\r\n\r\n" + b"y" * 5000)
    queue_id = commit(spool, b"Subject: torn\r\n\r\n" + b"x" * 5000)
    path = tmp_path / "queue" / f"{queue_id}.msg"
    raw = bytearray(path.read_bytes())
    if damage == "cut short":
        del raw[4096:]
    elif damage == "a block of zeros":
        raw[4096:] = bytes(len(raw) - 4096)
    elif damage == "one octet changed":
        raw[-3] ^= 1
    else:
        raw[5:13] = b"zzzzzzzz"
    path.write_bytes(raw)
    assert queue_id in [i for i, _ in spool.scan()]
    assert [e.queue_id for e in spool.load_committed(spool.queue_ids())] == [good]
    assert [p.name for p in (tmp_path / "corrupt").iterdir()] == [f"{queue_id}.msg"]


def test_stopping_removes_the_blanks_and_one_taken_meanwhile_when_it_is_let_go(tmp_path):
    spool = _blank_spool(tmp_path)
    incoming = spool.receive(envelope())
    spool.stop_spare_files()
    assert _blanks_in(tmp_path) == [incoming.queue_id]
    incoming.abort()
    assert _blanks_in(tmp_path) == []
    spool.top_up_spare_files()  # stopped: makes nothing
    assert _blanks_in(tmp_path) == []


def test_a_blank_of_ours_written_into_while_the_queue_is_read_stays(tmp_path, monkeypatch):
    """The look for unreported messages runs beside this process's own sessions: a blank
    read empty, then committed into before the blanks are cleared, is a message."""
    spool = _blank_spool(tmp_path)
    incoming = spool.receive(envelope())
    incoming.write(b"Subject: racing\r\n\r\n")
    real = store._scan_run

    def racing(*args, **kwargs):
        yield from real(*args, **kwargs)
        spool.commit(incoming)  # after it was read empty, before the blanks are cleared

    monkeypatch.setattr(store, "_scan_run", racing)
    assert spool.load_committed(spool.queue_ids(blanks=True)) == []
    assert spool.load(incoming.queue_id).size == len(b"Subject: racing\r\n\r\n")


def test_a_blank_of_ours_read_half_written_is_not_damage(tmp_path, monkeypatch):
    """Read in the middle of its commit (the checksum does not match yet), and done by
    the time the failure is looked at: read again, whole, and left to the commit."""
    spool = _blank_spool(tmp_path)
    queue_id = commit(spool)
    real = store._scan_run

    def racing(*args, **kwargs):
        for listed, found in real(*args, **kwargs):
            if listed == queue_id:  # as if read while it was being written
                found = ValueError("the checksum does not match")
            yield listed, found

    monkeypatch.setattr(store, "_scan_run", racing)
    assert spool.load_committed(spool.queue_ids(blanks=True)) == []
    assert list((tmp_path / "corrupt").iterdir()) == []
    assert spool.load(queue_id).size > 0


def test_a_blank_that_waited_too_long_is_made_again(tmp_path):
    """Its queue id is when it was made: after a quiet spell a message does not take
    it (ids keep to the order of arrival within BLANK_MAX_AGE); it is removed and made
    again, off the message's path."""
    now = [1_800_000_000.0]
    spool = Spool(tmp_path, clock=lambda: now[0])
    _need_unnamed_files(spool)
    spool.keep_spare_files(8)
    spool.top_up_spare_files()
    old = _blanks_in(tmp_path)
    assert len(old) == 8
    now[0] += store.BLANK_MAX_AGE + 0.5
    fresh = commit(spool)
    assert fresh not in old and int(fresh[:13], 16) == int(now[0] * 1_000_000)
    assert _blanks_in(tmp_path) == old  # still there: removed by a worker, not here
    spool.top_up_spare_files()
    made = _blanks_in(tmp_path)
    assert len(made) == 8 and not set(made) & set(old)
    assert commit(spool) == made[0]


def test_a_blank_is_no_message_to_the_queue_commands(tmp_path):
    """`mta queue delete ID` (or hold, or show) of a blank's name finds no message: the
    blank may be written into at any moment, and must not be removed under it."""
    spool = _blank_spool(tmp_path)
    blank = _blanks_in(tmp_path)[0]
    for change in (spool.remove, spool.hold, spool.load, spool.state_of):
        with pytest.raises(SpoolError, match="no message"):
            change(blank)
    assert blank in _blanks_in(tmp_path)
    assert commit(spool) == blank  # and it is still there to take
