"""The durable spool: where accepted mail lives until every recipient is final.

Layout under the spool root::

    tmp/       messages being received: unnamed files (O_TMPFILE) that appear in
               queue/ only when committed; where the filesystem cannot make
               those, ID.msg files renamed into queue/ at commit
    queue/     committed messages: ID.msg, the envelope as received (one line)
               followed by the message data; and ID.env, the envelope's current
               state, once something changed since receipt.  Also blanks: empty
               ID.msg files a receiving process made ahead of need (see below)
    hold/      messages an operator put on hold (the same files)
    corrupt/   messages we could not read, kept for a human, never deleted
    control/   notices from the command line to a running server (`notify`)

A message is one file, so receiving it costs one fsync (and a share of one
directory fsync): Postfix's queue file holds envelope and data together for
the same reason.  A process that receives mail over SMTP keeps blanks
(`keep_spare_files`): empty files in queue/, each named after a queue id of its
own, whose directory entries were made durable in a batch before any is used.
A message that fits in memory and is the only one its process has open takes
one at its start (its queue id is the blank's) and is committed by writing it
into the blank and one fsync: no directory change, so no directory fsync, on
the way to the 250.  Such a file begins ``MTA3 `` and the CRC-32 of the rest:
a crash (of the process, or of the machine) in the middle of its commit,
before any 250, can leave it half written, and recovery knows it by the
checksum.  Later state changes (a deferral, a failure) go into the small
ID.env beside it; a message whose first attempt delivers everything never has
one.

What it promises:

- `receive(envelope)` opens a message in tmp/ and writes the envelope first;
  `commit()` returns only when the file is fsync'd, in ``queue/``, and the
  directory entry is fsync'd: only then may the server say 250.  Concurrent
  commits share directory fsyncs (a group commit: a directory fsync that
  started after a link covers it); a commit into a blank needs none, its
  entry was durable before it began.  A message not committed leaves nothing:
  an unnamed file is freed by the kernel, a named one is removed by
  `recover()`, and a blank goes back to its pool, or is removed.
- `save()` rewrites ID.env atomically (temporary file in the same directory,
  fsync, rename, directory fsync), so a crash leaves the old or the new
  state, never a mix.
- `remove()` deletes the message file first, then its state: a crash in
  between leaves a state without a message, which `recover()` removes.  It
  does not wait for the disk: a crash (of the machine, not the process) that
  loses the removal means the message is delivered again, never lost.
- `recover()` runs once at start: it clears tmp/, removes half-written
  states, puts together what a crash left split between queue/ and hold/,
  removes the blanks of processes that are gone, moves unreadable messages
  (a checksum that does not match among them) to ``corrupt/`` and returns
  every committed envelope.  Listings (`scan`) leave blanks out.

Every method blocks on the disk; the server calls them through a thread,
except `receive()` (an open and a buffered write: cheap, and done in the
reactor so that the data can stream straight in).

Errors are `OSError` (disk trouble: the caller answers 451 and keeps nothing)
and `SpoolError` (a queue id that is not there).  A spool written by an
earlier mta (ID.msg holding only the data, ID.env the envelope) is read as
it is.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from mta.safeio import fsync_dir
from mta.spool.envelope import Envelope, EnvelopeError, validate


class _Log:
    """The spool's twisted.logger Logger, made at its first use: `mta queue list` and the
    other commands that read the spool do not import Twisted for it (a tenth of a
    second of every command)."""

    _logger: Any = None

    def __getattr__(self, name: str) -> Any:
        if _Log._logger is None:
            from twisted.logger import Logger
            _Log._logger = Logger(namespace="mta.spool")
        return getattr(_Log._logger, name)


log = _Log()
T = TypeVar("T")

TMP, QUEUE, HOLD, CORRUPT, CONTROL = "tmp", "queue", "hold", "corrupt", "control"
DATA_SUFFIX, ENVELOPE_SUFFIX = ".msg", ".env"
HEADER = b"MTA2 "  # a message file's first line: HEADER, the envelope as JSON, LF
# Or, in a file committed into a blank: CHECKED, the CRC-32 of everything after
# those 14 octets as 8 hex digits, a space, the envelope as JSON, LF.
CHECKED = b"MTA3 "
CHECKED_PREFIX = len(CHECKED) + 9
WRITE_BUFFER = 64 * 1024
SPARE_FILES = 16  # blanks a receiving process keeps ahead of need
BLANK_BATCH = 8  # blanks made at a time, with one directory fsync
BLANK_MAX_AGE = 1.0  # seconds a blank may wait to be taken: its queue id's time is its making
# Processes reading a large queue's envelopes at once (Spool.scan_runs): one a core, as
# opening the files is the kernel's work, on the reader's core.
SCAN_WORKERS = max(2, min(8, os.cpu_count() or 2))
SCAN_ADVICE = 4096  # octets of each file a reader asks the kernel to read ahead
SCAN_BATCH = 256  # files a reader opens and asks for before it reads the first of them
SCAN_RUN = 2000  # messages each of them reads at least


class SpoolError(Exception):
    """A queue id that is not in the state asked for."""


class _QueueIds:
    """Queue ids sort by arrival and are unique without coordination.

    13 hex digits of microseconds since the epoch (good until the year 2112),
    6 of the process id (Linux pids stay below 2**22) and 3 of a per-process
    counter: two processes writing the same spool (the server and `mta
    sendmail`) never collide.  The pid is kept, and taken again in a forked child
    (twistd forks to daemonise after the spool is made): a getpid() a message
    was a system call, with a round of the interpreter's lock under load.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.counter = itertools.count(random.randrange(0x1000))

    def __call__(self) -> str:
        usec = int(self.clock() * 1_000_000)
        return f"{usec:013X}{_pid[0]:06X}{next(self.counter) & 0xFFF:03X}"


_pid = [os.getpid() & 0xFFFFFF]  # this process's, for queue ids


# Blanks this process made (any Spool) and has not committed or dropped: written into
# at any moment, never to be touched by recovery (set.add and discard are atomic).
_made: set[str] = set()


def _forked() -> None:
    _pid[0] = os.getpid() & 0xFFFFFF
    _made.clear()  # the parent's, not ours


os.register_at_fork(after_in_child=_forked)


@dataclass(frozen=True)
class MessageData:
    """Where a committed message's data is: the file, from `offset` to its end (None:
    after the envelope line, found when the file is opened)."""

    path: str  # not a Path: pathlib was 4% of the main process's time, a message at a time
    offset: int | None = 0

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError("message data is read-only")
        f = open(self.path, "rb")  # noqa: SIM115 (the caller closes it)
        if self.offset is not None:
            f.seek(self.offset)
        elif f.read(len(HEADER)) in (HEADER, CHECKED):
            f.readline()
        else:
            f.seek(0)
        return f

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()


class Incoming:
    """A message being received: kept in memory up to `WRITE_BUFFER`, then written to
    ``tmp/`` as it arrives (a large message is never held in memory).

    Its file is opened only when the data outgrows the buffer, or at `commit`, in
    the committing thread: a small message costs the receiving thread no system
    call at all.

    Between the end of the data and the commit, checks that need the whole
    message (DKIM signing, DKIM/DMARC verification) may read it with
    `read_data()` and put header fields in front of it with `prepend()`: in
    memory for a message still in the buffer, by writing a new file for one
    that outgrew it.  Both block on the disk: the committing thread calls them.
    """

    def __init__(self, spool: Spool, envelope: Envelope,
                 blank: tuple[str, int] | None = None) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        # The blank (queue id, descriptor) the message is committed into, while it
        # fits in the buffer; given up when it outgrows it.
        self.blank = blank
        self.counted = True  # among the spool's open messages (`Spool.receive`)
        self.fd: int | None = None  # None until the file is opened
        self.path: Path | None = None  # None: an unnamed file (O_TMPFILE)
        self.buffer = bytearray(HEADER + envelope.to_json())
        self.data_start = len(self.buffer)  # where the data begins, in the file
        self.size = 0  # octets of data (the envelope line not counted)
        self.done = False

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        if len(self.buffer) >= WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered to the file (opened now if it is not yet).  A message
        that outgrows the buffer gives up its blank: it is received as any other, in
        tmp/, and linked into queue/ under the same name at its commit."""
        if self.fd is None:
            if self.blank is not None:
                self.spool._drop_blank(self.blank)
                self.blank = None
            self.fd, self.path = self.spool._open_tmp(self.queue_id)
        _write_all(self.fd, self.buffer)
        self.buffer.clear()

    def read_data(self) -> bytes:
        """The message data received so far (without the envelope line)."""
        if self.fd is None:
            return bytes(self.buffer[self.data_start:])
        written = os.fstat(self.fd).st_size
        parts = []
        offset = self.data_start
        while offset < written:
            chunk = os.pread(self.fd, min(written - offset, 1 << 20), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        parts.append(bytes(self.buffer))
        return b"".join(parts)

    def prepend(self, fields: bytes) -> None:
        """Put `fields` (complete header lines, CRLF-terminated) before the data."""
        if not fields:
            return
        self.size += len(fields)
        if self.fd is None:
            self.buffer[self.data_start:self.data_start] = fields
            return
        # The data is partly in the file: copy it behind the fields into a new one.
        old_fd, old_path = self.fd, self.path
        suffix = ".new" if old_path is not None and old_path.suffix == DATA_SUFFIX else DATA_SUFFIX
        self.fd, self.path = self.spool._open_tmp(self.queue_id, suffix)
        try:
            _write_all(self.fd, os.pread(old_fd, self.data_start, 0))
            _write_all(self.fd, fields)
            offset, end = self.data_start, os.fstat(old_fd).st_size
            while offset < end:
                chunk = os.pread(old_fd, min(end - offset, 1 << 20), offset)
                if not chunk:
                    break
                _write_all(self.fd, chunk)
                offset += len(chunk)
        except BaseException:
            os.close(self.fd)
            if self.path is not None:
                _unlink(self.path)
            self.fd, self.path = old_fd, old_path
            self.size -= len(fields)
            raise
        os.close(old_fd)
        if old_path is not None:
            _unlink(old_path)

    def abort(self) -> None:
        """Forget the message: close and drop its file, if it has one (idempotent)."""
        self.uncount()
        if self.done:
            return
        self.done = True
        self.buffer.clear()
        if self.blank is not None:  # never written: still a blank
            self.spool._give_back(self.blank)
            self.blank = None
        if self.fd is not None:
            os.close(self.fd)
            if self.path is not None:
                _unlink(self.path)


    def uncount(self) -> None:
        """No longer open: committed or dropped (idempotent)."""
        if self.counted:
            self.counted = False
            self.spool._closed()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        view.release()


class Spool:
    def __init__(self, root: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self.new_id = _QueueIds(clock)
        self._syncs = {name: _DirectorySync(self.root / name) for name in (QUEUE, HOLD)}
        for name in (TMP, QUEUE, HOLD, CORRUPT, CONTROL):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        # The directories as text, for the per-message paths (pathlib costs more than
        # the system calls there).
        self._dirs = {name: os.path.join(self.root, name, "") for name in (TMP, QUEUE, HOLD)}
        self._unnamed_files: bool | None = None  # found out at the first receive
        self._spares: _SpareFiles | None = None  # keep_spare_files()
        self._blanks: _Blanks | None = None  # keep_spare_files()
        self._open_lock = threading.Lock()
        self._open = 0  # messages received (from `receive`) and not yet committed or dropped

    @property
    def _unnamed(self) -> bool:
        """Whether messages are received as unnamed files (asked once: only a writer asks)."""
        if self._unnamed_files is None:
            self._unnamed_files = _can_link_unnamed_files(self.root / TMP)
        return self._unnamed_files

    # -- receiving --------------------------------------------------------------

    def receive(self, envelope: Envelope) -> Incoming:
        """A new message with `envelope` (its queue id is set here); no file written yet.

        While it is the only message this process has open, it takes a blank when one
        is ready (its queue id is the blank's): one session's commits cannot share a
        directory fsync, and a blank spares it.  Where several are open at once, they
        share the directory fsyncs (the group commit), and blanks did worse: at 20
        sessions 0.88-0.91 of the messages a second [measured on our bench machine];
        they get spare unnamed files instead."""
        blank = None
        with self._open_lock:
            self._open += 1
            alone = self._open == 1
        if alone and self._blanks is not None:
            blank = self._blanks.take()
        envelope.queue_id = blank[0] if blank is not None else self.new_id()
        return Incoming(self, envelope, blank)

    def _closed(self) -> None:
        """A message from `receive` is committed or dropped."""
        with self._open_lock:
            self._open -= 1

    def keep_spare_files(self, count: int = SPARE_FILES) -> None:
        """From now on keep up to `count` unnamed files in ``tmp/`` open ahead of need,
        and up to `count` blanks ready in ``queue/``, made by `top_up_spare_files`
        (`stop_spare_files` ends it).  A receiving process calls it once it runs as
        the user that owns the spool; where the filesystem cannot make unnamed files
        it does nothing."""
        if self._spares is None and self._unnamed:
            self._spares = _SpareFiles(self._dirs[TMP], count)
            self._blanks = _Blanks(self, count)

    def top_up_spare_files(self) -> None:
        """Make spare files and blanks where fewer are ready than wanted (blocking: a
        worker thread calls it between jobs)."""
        spares, blanks = self._spares, self._blanks
        if spares is not None:
            spares.top_up()
        if blanks is not None:
            blanks.top_up()

    def stop_spare_files(self) -> None:
        """Close the spare files and remove the blanks not taken (idempotent); a blank
        taken meanwhile is removed when its message lets it go."""
        spares, self._spares = self._spares, None
        blanks, self._blanks = self._blanks, None
        if spares is not None:
            spares.close()
        if blanks is not None:
            blanks.close()

    def _give_back(self, blank: tuple[str, int]) -> None:
        """A blank whose message ended without a commit, still empty: ready again."""
        blanks = self._blanks
        if blanks is not None:
            blanks.give_back(blank)
        else:
            self._drop_blank(blank)

    def _drop_blank(self, blank: tuple[str, int]) -> None:
        """Close and remove a blank (no directory fsync: if a crash brings it back, it
        is an empty file of a process that is gone, which recovery removes)."""
        queue_id, fd = blank
        os.close(fd)
        _unlink(self._dirs[QUEUE] + queue_id + DATA_SUFFIX)
        _made.discard(queue_id)

    def _maker_runs(self, queue_id: str) -> bool:
        """Whether the process that made `queue_id` (the process id in it) still runs,
        so that a blank of it may be written into at any moment: for this process, a
        blank it made and has not let go; else a process with that id alive."""
        pid = _made_by(queue_id)
        if pid == _pid[0]:
            return queue_id in _made  # else an earlier process's, with our id
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # another user's process: it runs
        return True

    def _open_tmp(self, queue_id: str, suffix: str = DATA_SUFFIX) -> tuple[int, Path | None]:
        """A new file in ``tmp/`` for `queue_id`: unnamed where the filesystem can
        (nothing to clean up after a crash; a spare one when there is one), else
        named after the queue id."""
        if self._unnamed:
            spares = self._spares
            fd = spares.take() if spares is not None else None
            if fd is None:
                fd = os.open(self._dirs[TMP], os.O_TMPFILE | os.O_RDWR, 0o600)
            return fd, None
        path = self.root / TMP / (queue_id + suffix)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), path

    def commit(self, incoming: Incoming) -> str:
        """Make `incoming` durable in ``queue/``; blocking.  Sets the envelope's size.

        On any error the message is dropped and the error re-raised: nothing
        half-committed stays behind.
        """
        try:
            if incoming.blank is not None:
                return self._commit_into_blank(incoming, incoming.blank)
            return self._commit_linked(incoming)
        finally:
            incoming.uncount()

    def _commit_linked(self, incoming: Incoming) -> str:
        """Link (or rename) `incoming`'s file in tmp/ into ``queue/``, with a directory
        fsync (shared with concurrent commits)."""
        target = self._dirs[QUEUE] + incoming.queue_id + DATA_SUFFIX
        try:
            incoming.flush()
            assert incoming.fd is not None
            os.fsync(incoming.fd)
            if incoming.path is None:
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: the unnamed file gets a name.
                os.link(f"/proc/self/fd/{incoming.fd}", target,
                        src_dir_fd=_proc_dir_fd(), follow_symlinks=True)
            else:
                os.rename(incoming.path, target)
            incoming.done = True
            os.close(incoming.fd)
            self._syncs[QUEUE].sync()
        except BaseException:
            if incoming.done:
                _unlink(target)  # in queue/ but not durable: the client hears 451
            else:
                incoming.abort()
            raise
        incoming.envelope.size = incoming.size
        return incoming.queue_id

    def _commit_into_blank(self, incoming: Incoming, blank: tuple[str, int]) -> str:
        """Write `incoming` (all of it in its buffer) into its blank, with the checksum
        in front, and fsync it: durable, under a name that already was."""
        queue_id, fd = blank
        incoming.blank = None
        incoming.done = True
        try:
            with memoryview(incoming.buffer) as view, view[len(HEADER):] as rest:
                _write_all(fd, b"%s%08x %s" % (CHECKED, zlib.crc32(rest), rest))
            os.fsync(fd)
        except BaseException:
            # Half written, maybe: not a blank any more.  The client hears 451.
            self._drop_blank(blank)
            incoming.buffer.clear()
            raise
        os.close(fd)
        _made.discard(queue_id)
        incoming.buffer.clear()
        incoming.envelope.size = incoming.size
        return queue_id

    def inject(self, envelope: Envelope, data: bytes | Iterator[bytes],
               before_commit: Callable[[Incoming], Any] | None = None) -> str:
        """Commit a message we generate ourselves (bounces, `mta sendmail`); blocking.
        `before_commit(incoming)` may put header fields in front of it (`prepend`):
        DKIM signing of our reports."""
        incoming = self.receive(envelope)
        try:
            if isinstance(data, bytes):
                incoming.write(data)
            else:
                for chunk in data:
                    incoming.write(chunk)
            if before_commit is not None:
                before_commit(incoming)
        except BaseException:
            incoming.abort()
            raise
        return self.commit(incoming)

    # -- committed messages -----------------------------------------------------

    def _where(self, queue_id: str) -> str:
        _check_id(queue_id)
        for state in (QUEUE, HOLD):
            if not _blank(self._dirs[state] + queue_id + DATA_SUFFIX):
                return state  # a blank is no message: `mta queue delete` leaves it alone
        raise SpoolError(f"no message {queue_id} in the queue")

    def state_of(self, queue_id: str) -> str:
        """``queue`` or ``hold``; SpoolError if neither."""
        return self._where(queue_id)

    def open_message(self, queue_id: str) -> tuple[Envelope, MessageData]:
        """The envelope as it is now, and where the data is."""
        base = self._dirs[self._where(queue_id)] + queue_id
        path = base + DATA_SUFFIX
        try:
            state = _read_file(base + ENVELOPE_SUFFIX)
        except FileNotFoundError:
            state = None
        with open(path, "rb") as f:
            kind = f.read(len(HEADER))
            first = f.readline() if kind in (HEADER, CHECKED) else b""
            offset = len(HEADER) + len(first) if first else 0
            size = os.fstat(f.fileno()).st_size - offset
        if state is not None:
            envelope = Envelope.from_json(state)
        elif first:
            envelope = Envelope.from_json(first[CHECKED_PREFIX - len(CHECKED):]
                                          if kind == CHECKED else first)
            envelope.size = size
        else:
            raise EnvelopeError("no envelope: neither a header line nor a state file")
        if envelope.queue_id != queue_id:
            raise EnvelopeError("queue id does not match the file name")
        return envelope, MessageData(path, offset)

    def load(self, queue_id: str) -> Envelope:
        return self.open_message(queue_id)[0]

    def unchanged(self, queue_id: str) -> MessageData | None:
        """Where a message's data is, if it is in ``queue/`` with no state beside it (as
        committed: its envelope is the one received); else None.  Two stat calls of
        entries the commit just made: cheap enough for the reactor thread."""
        path = self._dirs[QUEUE] + queue_id
        if not os.path.exists(path + DATA_SUFFIX) or os.path.exists(path + ENVELOPE_SUFFIX):
            return None
        return MessageData(path + DATA_SUFFIX, None)

    def message_data(self, queue_id: str) -> MessageData:
        return self.open_message(queue_id)[1]

    def save(self, envelope: Envelope) -> None:
        """Atomically record the envelope's new state beside its message; blocking."""
        state = self._where(envelope.queue_id)
        directory = self.root / state
        tmp = directory / f".{envelope.queue_id}{ENVELOPE_SUFFIX}.tmp"
        try:
            _write_synced(tmp, envelope.to_json())
            os.rename(tmp, directory / (envelope.queue_id + ENVELOPE_SUFFIX))
        except BaseException:
            _unlink(tmp)  # a full disk must not leave half a state behind
            raise
        self._syncs[state].sync()

    def remove(self, queue_id: str) -> None:
        """Remove a message: the message first, then its state."""
        path = self._dirs[self._where(queue_id)] + queue_id
        os.unlink(path + DATA_SUFFIX)
        _unlink(path + ENVELOPE_SUFFIX)

    def hold(self, queue_id: str) -> None:
        self._move(queue_id, QUEUE, HOLD)

    def release(self, queue_id: str) -> None:
        self._move(queue_id, HOLD, QUEUE)

    def _move(self, queue_id: str, source: str, target: str) -> None:
        if self._where(queue_id) != source:
            raise SpoolError(f"message {queue_id} is not in {source}/")
        # The message first: recovery puts back with it a state a crash left behind.
        src, dst = self.root / source, self.root / target
        os.rename(src / (queue_id + DATA_SUFFIX), dst / (queue_id + DATA_SUFFIX))
        try:
            os.rename(src / (queue_id + ENVELOPE_SUFFIX), dst / (queue_id + ENVELOPE_SUFFIX))
        except FileNotFoundError:
            pass  # never changed since receipt
        fsync_dir(dst)
        fsync_dir(src)

    def scan(self, state: str = QUEUE) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
        """Every message in `state`, oldest first, with its envelope as the JSON object the
        spool keeps (or why it cannot be read), size included; fields that hold their
        defaults are not in it (Envelope.to_json).  For listing a large
        queue: one directory listing, one small read a message, no objects built
        beyond the JSON."""
        directory = os.path.join(self.root, state)
        return _scan_run(directory, self._listed(directory))

    def scan_runs(self, state: str, summarise: Callable[[Iterator[tuple[str, Any]]], T]) -> list[T]:
        """`summarise` applied to runs of consecutive messages of `scan(state)`, in order.

        A large queue is read by up to `SCAN_WORKERS` processes at once, one run each;
        each reads its run a batch of files at a time (`_scan_run`).  `summarise` runs
        in those processes: it must be a module-level function (or a partial of one)
        and return something that pickles, best one small value per run.  A small
        queue is one run, read here; so is every queue where processes cannot be made
        or a reader dies (no /dev/shm for the pool's locks, a reader killed for
        memory): the listing is slower then, never missing.

        With a cold page cache, 100,000 messages on a 2-core machine took 7 s with one
        reader reading file after file.  Two readers with one more process walking the
        files a step ahead of them, asking for each (WILLNEED), took 3.1-3.4 s: most
        of it the kernel's, opening each file twice and sending each advice to the
        disk as a request of its own (a notification of the virtual disk each, 9%
        of them merged).  Two readers reading in batches took 1.9-2.1 s on the same
        spool, alternating with the old way (30-38% of the requests merged).
        """
        directory = os.path.join(self.root, state)
        entries = self._listed(directory)
        workers = min(SCAN_WORKERS, len(entries) // SCAN_RUN)
        if workers < 2:
            return [summarise(_scan_run(directory, entries))]
        import concurrent.futures  # only `mta queue` commands get here: the server never
        import multiprocessing  # reads its queue this way

        size = -(-len(entries) // workers)
        runs = [entries[i:i + size] for i in range(0, len(entries), size)]
        try:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(len(runs), mp_context=context) as pool:
                return list(pool.map(_summarise_run, [summarise] * len(runs),
                                     [directory] * len(runs), runs))
        except (OSError, ValueError, NotImplementedError,
                concurrent.futures.process.BrokenProcessPool) as e:
            log.warn("reading {state}/ with one process ({error})", state=state, error=e)  # noqa: G010
            return [summarise(_scan_run(directory, entries))]

    @staticmethod
    def _listed(directory: str) -> list[tuple[str, bool]]:
        """(queue id, whether it has a state file) of every message in `directory`, sorted."""
        names = os.listdir(directory)
        names.sort()  # the names' common suffix keeps the queue ids' order
        cut = len(DATA_SUFFIX)
        states = {name[:-len(ENVELOPE_SUFFIX)] for name in names if name.endswith(ENVELOPE_SUFFIX)}
        return [(name[:-cut], name[:-cut] in states) for name in names
                if name.endswith(DATA_SUFFIX) and not name.startswith(".")]

    def queue_ids(self, state: str = QUEUE, blanks: bool = False) -> list[str]:
        """Committed queue ids in `state`, oldest first; with `blanks`, every name there
        (blanks among them: `load_committed` tells them apart), without a look at any
        file."""
        ids = sorted(p.name[: -len(DATA_SUFFIX)]
                     for p in (self.root / state).glob("*" + DATA_SUFFIX)
                     if not p.name.startswith("."))
        if blanks or state != QUEUE:  # blanks are made in queue/ only
            return ids
        directory = self._dirs[QUEUE]
        return [queue_id for queue_id in ids if not _blank(directory + queue_id + DATA_SUFFIX)]

    # -- notices between the command line and a running server ---------------------

    def notify(self, action: str, **fields: str) -> Path:
        """Tell a running server that the queue changed (``new``, ``hold``, ``release``,
        ``delete``, ``flush``); it reads ``control/`` and acts on each notice once.
        Returns the notice's file, which is gone once a server has read it."""
        directory = self.root / CONTROL
        name = f"{int(self.clock() * 1_000_000):016d}-{os.getpid()}-{next(self.new_id.counter)}"
        tmp = directory / f".{name}.tmp"
        tmp.write_text(json.dumps({"action": action, **fields}))
        os.rename(tmp, directory / f"{name}.json")
        return directory / f"{name}.json"

    def pending_notices(self) -> int:
        """Notices no running server has read yet."""
        return sum(1 for _ in (self.root / CONTROL).glob("*.json"))

    def take_notices(self) -> list[dict[str, str]]:
        """Notices in the order they were written; each is returned once, then removed."""
        notices = []
        for path in sorted((self.root / CONTROL).glob("*.json")):
            try:
                notice = json.loads(path.read_text())
            except (OSError, ValueError):
                notice = None
            _unlink(path)
            if isinstance(notice, dict) and isinstance(notice.get("action"), str):
                notices.append(notice)
        return notices

    # -- start-up ---------------------------------------------------------------

    def recover(self) -> list[Envelope]:
        """Scan at start: clear tmp/, repair moves, quarantine damage; return queued envelopes."""
        queued = self.recover_files()
        envelopes = self.load_committed(queued)
        self.load_committed(self.queue_ids(HOLD), HOLD)  # quarantines what is damaged there
        return envelopes

    def recover_files(self) -> list[str]:
        """The quick part of recovery, before anything is received: clear tmp/, remove
        half-written states, repair what a crash split; returns the ids in queue/.

        Each directory is listed once (a listing of 100,000 names is a tenth of a
        second or more, with a cold cache more): the server listens only after this."""
        for name in os.listdir(self._dirs[TMP]):
            log.info("spool recovery: removing unaccepted {name}", name=name)
            _unlink(self._dirs[TMP] + name)
        listed: dict[str, set[str]] = {}
        for state in (QUEUE, HOLD):
            names = set(os.listdir(self._dirs[state]))
            for name in [n for n in names if n.startswith(".") and n.endswith(".tmp")]:
                _unlink(self._dirs[state] + name)  # a state whose save a crash cut short
                names.discard(name)
            listed[state] = names
        self._rejoin_split_moves(listed)
        for state in (QUEUE, HOLD):
            names = listed[state]
            for name in [n for n in names if n.endswith(ENVELOPE_SUFFIX)]:
                queue_id = name[: -len(ENVELOPE_SUFFIX)]
                if queue_id + DATA_SUFFIX not in names:
                    # Its message was removed and a crash came before the state went too.
                    log.info("spool recovery: removing the state of removed {queue_id}",
                             queue_id=queue_id)
                    _unlink(self._dirs[state] + name)
        fsync_dir(self.root / QUEUE)
        cut = len(DATA_SUFFIX)
        return sorted(name[:-cut] for name in listed[QUEUE]
                      if name.endswith(DATA_SUFFIX) and not name.startswith("."))

    def load_committed(self, queue_ids: list[str], state: str = QUEUE) -> list[Envelope]:
        """The envelopes of `queue_ids` in `state`; an unreadable message goes to corrupt/,
        as does one whose checksum does not match (a commit into a blank cut short, or
        damage).  Ids no longer there (delivered or moved meanwhile) are skipped; so are
        blanks, and those of a process that no longer runs are removed.  What cannot be
        read while the process that made it runs is left alone: a blank being written
        into (the relayer's look for unreported messages runs beside receiving
        processes).  Read as a
        scan reads (`_scan_run`: a batch of files asked for at a time)."""
        directory = self._dirs[state]
        entries = [(queue_id, os.path.exists(directory + queue_id + ENVELOPE_SUFFIX))
                   for queue_id in queue_ids if _QUEUE_ID.fullmatch(queue_id)]
        envelopes = []
        blanks: list[str] = []
        with_state = {queue_id for queue_id, has_state in entries if has_state}
        for queue_id, found in _scan_run(directory, entries, verify=True, blanks=blanks):
            try:
                if isinstance(found, Exception):
                    raise found
                envelope = Envelope.from_checked(found)
                if envelope.queue_id != queue_id:
                    raise EnvelopeError("queue id does not match the file name")
            except (OSError, ValueError) as e:  # EnvelopeError is a ValueError
                # Read while its maker was writing it, maybe: a maker that runs reports it
                # when done, and one of ours that is done now reads whole a second time.
                if self._maker_runs(queue_id) or (
                        _made_by(queue_id) == _pid[0] and queue_id not in with_state
                        and _reads_whole(directory, queue_id)):
                    continue
                if os.path.exists(directory + queue_id + DATA_SUFFIX):
                    self._quarantine(self.root / state, queue_id, str(e))
                continue
            envelopes.append(envelope)
        for queue_id in blanks:
            # Its maker first, then the file: one of ours leaves `_made` only once it
            # is written into (or removed), so empty now and not ours means never ours.
            if not self._maker_runs(queue_id) and _blank(directory + queue_id + DATA_SUFFIX):
                _unlink(directory + queue_id + DATA_SUFFIX)
        return envelopes

    def _rejoin_split_moves(self, listed: dict[str, set[str]]) -> None:
        """A state left behind in one directory by a crash in the middle of a hold or a
        release goes to its message in the other; `listed` (each state's names) follows."""
        for source, target in ((QUEUE, HOLD), (HOLD, QUEUE)):
            for name in [n for n in listed[source] if n.endswith(ENVELOPE_SUFFIX)]:
                data_name = name[: -len(ENVELOPE_SUFFIX)] + DATA_SUFFIX
                if data_name not in listed[source] and data_name in listed[target]:
                    os.rename(self._dirs[source] + name, self._dirs[target] + name)
                    listed[source].discard(name)
                    listed[target].add(name)

    def _quarantine(self, directory: Path, queue_id: str, why: str) -> None:
        log.error("spool recovery: {queue_id} moved to corrupt/: {why}", queue_id=queue_id, why=why)
        for suffix in (ENVELOPE_SUFFIX, DATA_SUFFIX):
            path = directory / (queue_id + suffix)
            if path.exists():
                os.rename(path, self.root / CORRUPT / path.name)
        fsync_dir(self.root / CORRUPT)


class _SpareFiles:
    """Unnamed files opened ahead of need: a committing thread takes one instead of
    making one.  Making an inode can be the dearest system call a message costs:
    ext4 without a journal walks past every inode freed in the last minute or more
    before it picks one (recently_deleted() in find_inode_bit()), so with mail
    flowing through, an open(O_TMPFILE) took 0.04-1 ms of kernel time [measured on
    our bench machine].  The worker threads make them between jobs (`top_up`), after
    handing over a result: the cost stays in the thread that paid it before, off the
    path to the 250.  (A thread of their own cost more at 20 sessions than it saved:
    its wake-ups were rounds of the interpreter's lock with the committing threads.)

    A spare file is an unnamed file like any other: if the process dies, the kernel
    frees it; nothing of it is ever in the queue."""

    def __init__(self, directory: str, count: int) -> None:
        self._directory = directory
        self._count = count
        self._files: list[int] = []  # list.append and list.pop are atomic: no lock
        self._closed = False

    def take(self) -> int | None:
        """A spare file's descriptor, or None when there is none left (make one)."""
        try:
            return self._files.pop()
        except IndexError:
            return None

    def top_up(self) -> None:
        """Make up to two spare files while there are fewer than wanted (one for the
        file a commit took, one towards the stock); blocking.  An error is left for
        the committing thread to meet, and report, when it makes its own."""
        for _ in range(2):
            if self._closed or len(self._files) >= self._count:
                return
            try:
                fd = os.open(self._directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError:
                return
            self._files.append(fd)
            if self._closed:
                self.close()  # closed while it was being made

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                fd = self._files.pop()
            except IndexError:
                return
            os.close(fd)


class _Blanks:
    """Blanks made ahead of need: empty files in ``queue/``, each named after a queue id
    of its own, made `BLANK_BATCH` at a time and made durable with one directory fsync
    before any of them is handed out.  A message committed into one needs one fsync,
    of its own file, where a new name needs a second one, of the directory: at one
    session, 300-350 against 160 µs of the disk's time a message [measured on our bench
    machine, 5.5 KB messages].

    Making an inode can be the dearest system call a message costs, too: ext4 without
    a journal walks past every inode freed in the last minute or more before it
    picks one (recently_deleted() in find_inode_bit()), 0.04-1 ms of kernel time.
    The worker threads make blanks between jobs (`top_up`), after handing over a
    result, off the path to the 250; one of them at a time.

    A blank's queue id tells when it was made, not when its message came: blanks
    are taken oldest first, and one that waited more than `BLANK_MAX_AGE` seconds
    (a quiet spell) is not taken but removed and made again, so that queue ids keep
    to the order of arrival within that.  A process that dies leaves its blanks behind: empty files, which listings leave
    out and recovery removes once their maker (the process id in the queue id) has
    gone."""

    def __init__(self, spool: Spool, count: int) -> None:
        self._spool = spool
        self._count = count
        self._ready: deque[tuple[str, int]] = deque()  # append and popleft are atomic
        self._stale: deque[tuple[str, int]] = deque()  # too old to take: to be removed
        self._making = threading.Lock()
        self._closed = False

    def take(self) -> tuple[str, int] | None:
        """A blank (queue id, open descriptor), or None when none is ready.  Blanks too
        old to take are left for `top_up` to remove (it runs in a worker thread)."""
        oldest = int((self._spool.clock() - BLANK_MAX_AGE) * 1_000_000)
        while True:
            try:
                blank = self._ready.popleft()
            except IndexError:
                return None
            if int(blank[0][:13], 16) >= oldest:
                return blank
            self._stale.append(blank)

    def give_back(self, blank: tuple[str, int]) -> None:
        self._ready.appendleft(blank)
        if self._closed:
            self.close()  # closed meanwhile

    def top_up(self) -> None:
        """Make a batch of blanks unless that would make more than `count`; blocking.
        An error (a full disk) is left for the messages to meet, without blanks."""
        batch = min(BLANK_BATCH, self._count)
        if self._closed or (len(self._ready) > self._count - batch and not self._stale):
            return
        if not self._making.acquire(blocking=False):
            return  # another worker is at it
        try:
            spool = self._spool
            self._drop_all(self._stale)
            if self._closed or len(self._ready) > self._count - batch:
                return
            directory, tmp = spool._dirs[QUEUE], spool._dirs[TMP]
            made: list[tuple[str, int]] = []
            try:
                for _ in range(batch):
                    queue_id = spool.new_id()
                    fd = os.open(tmp, os.O_TMPFILE | os.O_RDWR, 0o600)
                    _made.add(queue_id)  # before it has a name: recovery keeps off
                    try:
                        os.link(f"/proc/self/fd/{fd}", directory + queue_id + DATA_SUFFIX,
                                src_dir_fd=_proc_dir_fd(), follow_symlinks=True)
                    except BaseException:
                        _made.discard(queue_id)
                        os.close(fd)
                        raise
                    made.append((queue_id, fd))
                spool._syncs[QUEUE].sync()
            except OSError:
                for blank in made:
                    spool._drop_blank(blank)
                return
            self._ready.extend(made)
            if self._closed:
                self.close()  # closed while they were being made
        finally:
            self._making.release()

    def _drop_all(self, blanks: deque[tuple[str, int]]) -> None:
        """Remove every blank in `blanks` (popleft: safe beside other threads)."""
        while True:
            try:
                blank = blanks.popleft()
            except IndexError:
                return
            self._spool._drop_blank(blank)

    def close(self) -> None:
        self._closed = True
        self._drop_all(self._stale)
        self._drop_all(self._ready)


class _DirectorySync:
    """Group commit for one directory: a directory fsync that began after a link or
    rename covers it, so concurrent commits share one [the spool's promise]."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # one fsync at a time
        self._ticket_lock = threading.Lock()
        self._tickets = 0  # changes made so far
        self._synced = 0  # changes the last finished fsync covers
        self._fd: int | None = None  # the directory, opened at the first sync and kept

    def sync(self) -> None:
        """Blocking: returns once every change made before the call is durable."""
        with self._ticket_lock:
            self._tickets += 1
            ticket = self._tickets
        with self._lock:
            if self._synced >= ticket:
                return
            with self._ticket_lock:
                upto = self._tickets
            if self._fd is None:
                # Kept open: an open and a close fewer per fsync, each a round of the
                # interpreter's lock for the committing thread.
                self._fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                weakref.finalize(self, os.close, self._fd)
            os.fsync(self._fd)
            self._synced = upto


def _scan_run(directory: str, entries: list[tuple[str, bool]], verify: bool = False,
              blanks: list[str] | None = None,
              ) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """The envelope of each of `entries` (or why it cannot be read), in order; a message
    gone meanwhile (delivered, moved) is left out, and so is a blank (its queue id
    added to `blanks`).  With `verify`, a file committed into a blank is read whole
    and its checksum checked (recovery: listings trust it, and read less).

    The files are taken `SCAN_BATCH` at a time: all of a batch are opened, and the kernel
    asked to start reading each one's start (posix_fadvise WILLNEED), before the first
    is read.  The disk then has a batch of reads at once, mostly of neighbouring
    blocks, and merges them; read one by one, each file waits for the last, and
    every read is a request of its own."""
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    batch: list[tuple[str, bool, int | OSError]] = []
    read = 0  # of `batch`, the files read and closed
    try:
        start = 0
        while start < len(entries):
            batch, start = _open_batch(directory_fd, entries, start,
                                       WRITE_BUFFER if verify else SCAN_ADVICE)
            for read, (queue_id, has_state, fd) in enumerate(batch, 1):
                if isinstance(fd, OSError):
                    yield queue_id, fd
                    continue
                try:
                    found: dict[str, Any] | Exception | None = _envelope_from(
                        fd, has_state, verify)
                except (OSError, ValueError) as e:
                    found = e
                finally:
                    os.close(fd)
                if found is None:
                    if blanks is not None:
                        blanks.append(queue_id)
                    continue
                yield queue_id, found
    finally:
        for _, _, fd in batch[read:]:  # what a reader that stopped early left open
            if isinstance(fd, int):
                os.close(fd)
        os.close(directory_fd)


def _open_batch(directory_fd: int, entries: list[tuple[str, bool]], start: int,
                advice: int = SCAN_ADVICE) -> tuple[list[tuple[str, bool, int | OSError]], int]:
    """From `entries[start]` on, up to `SCAN_BATCH` of the files `_scan_run` reads (each
    message's state file if it has one, else its data file), open and asked for, or
    why one cannot be opened; gone ones left out.  Returns them and where the next
    batch starts: sooner where the process may not open that many files (EMFILE)."""
    opened: list[tuple[str, bool, int | OSError]] = []
    end = min(len(entries), start + SCAN_BATCH)
    try:
        for position in range(start, end):
            queue_id, has_state = entries[position]
            name = queue_id + (ENVELOPE_SUFFIX if has_state else DATA_SUFFIX)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory_fd)
            except FileNotFoundError:
                continue  # delivered or moved while we looked
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and any(
                        isinstance(other, int) for _, _, other in opened):
                    return opened, position  # read these first, and try it again after
                opened.append((queue_id, has_state, e))
                continue
            opened.append((queue_id, has_state, fd))
            try:
                os.posix_fadvise(fd, 0, advice, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only a hint
    except BaseException:
        for _, _, fd in opened:
            if isinstance(fd, int):
                os.close(fd)
        raise
    return opened, end


def _summarise_run(summarise: Callable[[Iterator[tuple[str, Any]]], T], directory: str,
                   entries: list[tuple[str, bool]]) -> T:
    """One reader process's share of `Spool.scan_runs`."""
    return summarise(_scan_run(directory, entries))


def _envelope_from(fd: int, has_state: bool, verify: bool = False) -> dict[str, Any] | None:
    """A message's envelope as a JSON object, read from `fd`: its state file if it has
    one, else its data file's first line; with "size" set.  None for a blank (an
    empty data file).  ValueError if it cannot be read, or, with `verify`, if the
    checksum of a file committed into a blank does not match."""
    if has_state:
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        data = _as_envelope(json.loads(raw.decode("utf-8")))
        data.setdefault("size", 0)  # left out when 0, as every field at its default
        return data
    head = os.read(fd, 4096)
    if not head:
        return None
    whole = len(head) < 4096  # a short read of a file is its end: no fstat needed
    checked = head.startswith(CHECKED)
    if checked and verify:
        # Such a file held in memory once (WRITE_BUFFER and the fields put in front):
        # read it whole, with a bound for a file that is something else.
        while not whole and len(head) < 16 * 1024 * 1024:
            more = os.read(fd, 65536)
            whole = not more
            head += more
        try:
            crc = int(head[len(CHECKED):CHECKED_PREFIX - 1], 16)
        except ValueError:
            raise ValueError("no checksum") from None
        if not whole or zlib.crc32(memoryview(head)[CHECKED_PREFIX:]) != crc:
            raise ValueError("the checksum does not match: a commit that a crash cut "
                             "short (never acknowledged), or a damaged file")
    end = head.find(b"\n")
    while end < 0 and not whole and len(head) < 16 * 1024 * 1024:  # a long envelope line
        more = os.read(fd, 65536)
        whole = not more
        head += more
        end = head.find(b"\n")
    size = len(head) if whole else os.fstat(fd).st_size
    start = CHECKED_PREFIX if checked else len(HEADER)
    if not (checked or head.startswith(HEADER)) or end < start:
        raise ValueError("no envelope")
    data = _as_envelope(json.loads(head[start:end].decode("utf-8")))
    data["size"] = size - end - 1
    return data


def _as_envelope(data: Any) -> dict[str, Any]:
    validate(data)  # EnvelopeError is a ValueError, which callers catch
    return data


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_QUEUE_ID = re.compile(r"[0-9A-F]+")


def _check_id(queue_id: str) -> None:
    if type(queue_id) is not str or not _QUEUE_ID.fullmatch(queue_id):
        raise SpoolError(f"not a queue id: {queue_id!r}")


def _made_by(queue_id: str) -> int:
    """The process id in `queue_id` (its lower 24 bits); -1 if there is none."""
    try:
        return int(queue_id[13:19], 16)
    except ValueError:
        return -1


def _reads_whole(directory: str, queue_id: str) -> bool:
    """Whether the message file of `queue_id` is one committed into a blank that reads
    whole now: its checksum matches, and so does its queue id.  (Other message files
    are whole before they have a name.)"""
    fd = None
    try:
        fd = os.open(directory + queue_id + DATA_SUFFIX, os.O_RDONLY)
        if os.pread(fd, len(CHECKED), 0) != CHECKED:
            return False
        found = _envelope_from(fd, False, verify=True)
        return found is not None and found.get("queue_id") == queue_id
    except (OSError, ValueError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _blank(path: str) -> bool:
    """Whether the message file `path` is a blank (empty, with no state beside it: a
    spool of the earlier format kept an empty message's envelope there); a file that
    is not there counts as one."""
    try:
        if os.stat(path).st_size:
            return False
    except FileNotFoundError:
        return True
    return not os.path.exists(path[: -len(DATA_SUFFIX)] + ENVELOPE_SUFFIX)


def _unlink(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_synced(path: Path, raw: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


_PROC_DIR_FD: int | None = None


def _proc_dir_fd() -> int:
    """A directory descriptor whose only use is to make os.link call linkat(2), which
    follows /proc/self/fd/N to the file (plain link(2) would not) [open(2) O_TMPFILE]."""
    global _PROC_DIR_FD
    if _PROC_DIR_FD is None:
        _PROC_DIR_FD = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    return _PROC_DIR_FD


def _can_link_unnamed_files(directory: Path) -> bool:
    """Whether this filesystem makes O_TMPFILE files and /proc lets us link them."""
    if not hasattr(os, "O_TMPFILE"):
        return False
    probe = directory / f".probe-{os.getpid()}-{random.randrange(1 << 30)}"
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return False
        raise
    try:
        os.link(f"/proc/self/fd/{fd}", probe, src_dir_fd=_proc_dir_fd(), follow_symlinks=True)
    except OSError:
        return False
    finally:
        os.close(fd)
    _unlink(probe)
    return True
