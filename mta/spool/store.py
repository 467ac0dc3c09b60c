"""The durable spool: where accepted mail lives until every recipient is final.

Layout under the spool root::

    tmp/       data being received (ID.msg) and envelopes being written
    queue/     committed messages: ID.msg (raw data) and ID.env (JSON envelope)
    hold/      messages an operator put on hold (same two files)
    corrupt/   envelopes we could not read, kept for a human, never deleted
    control/   notices from the command line to a running server (`notify`)

What it promises:

- `commit()` returns only when the data and the envelope are fsync'd, renamed
  into ``queue/`` and the directory entry is fsync'd: only then may the
  server say 250.  The envelope is the commit record; data without an
  envelope was never accepted.
- `save()` rewrites an envelope atomically (temporary file in the same
  directory, fsync, rename, directory fsync), so a crash leaves the old or
  the new version, never a mix.
- `remove()` deletes the envelope first, then the data.
- `recover()` is run once at start: it clears ``tmp/``, removes data files
  that lost their envelope before commit, moves unreadable envelopes to
  ``corrupt/`` and returns every committed envelope.

Every method here blocks on the disk; the server calls them through a thread
pool.  Concurrent commits share directory fsyncs (a group commit): a
directory fsync that started after a rename covers it.

Errors are `OSError` (disk trouble: the caller answers 451 and keeps nothing)
and `SpoolError` (a queue id that is not there).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from twisted.logger import Logger

from mta.safeio import fsync_dir
from mta.spool.envelope import Envelope, EnvelopeError

log = Logger(namespace="mta.spool")

TMP, QUEUE, HOLD, CORRUPT, CONTROL = "tmp", "queue", "hold", "corrupt", "control"
DATA_SUFFIX, ENVELOPE_SUFFIX = ".msg", ".env"


class SpoolError(Exception):
    """A queue id that is not in the state asked for."""


class _QueueIds:
    """Queue ids sort by arrival and are unique without coordination.

    13 hex digits of microseconds since the epoch (good until the year 2112),
    6 of the process id (Linux pids stay below 2**22) and 3 of a per-process
    counter: two processes writing the same spool (the server and `mta
    sendmail`) never collide.  The pid is read at each call, not kept: twistd
    forks to daemonise after the spool is made.  O_EXCL on the data file only
    guards tmp/; a committed message has left it.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.counter = itertools.count(random.randrange(0x1000))

    def __call__(self) -> str:
        usec = int(self.clock() * 1_000_000)
        pid = os.getpid() & 0xFFFFFF
        return f"{usec:013X}{pid:06X}{next(self.counter) & 0xFFF:03X}"


class Incoming:
    """A message being received into ``tmp/``: written as it arrives, never held in memory."""

    def __init__(self, spool: Spool, queue_id: str, file: BinaryIO) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.file = file
        self.size = 0
        self.done = False

    @property
    def path(self) -> Path:
        return self.spool.root / TMP / (self.queue_id + DATA_SUFFIX)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def abort(self) -> None:
        """Forget the message: close and unlink its tmp file (idempotent)."""
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass  # a full disk cannot flush the buffer we are throwing away anyway
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


class Spool:
    def __init__(self, root: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self.new_id = _QueueIds(clock)
        self._dir_lock = threading.Lock()
        self._ticket_lock = threading.Lock()
        self._tickets = 0
        self._synced = 0
        for name in (TMP, QUEUE, HOLD, CORRUPT, CONTROL):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # -- receiving --------------------------------------------------------------

    def receive(self) -> Incoming:
        """Open a new message in ``tmp/`` (non-blocking apart from the open)."""
        for _ in range(100):
            queue_id = self.new_id()
            path = self.root / TMP / (queue_id + DATA_SUFFIX)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            return Incoming(self, queue_id, os.fdopen(fd, "wb", buffering=256 * 1024))
        raise OSError("cannot allocate a queue id")

    def commit(self, incoming: Incoming, envelope: Envelope) -> str:
        """Make `incoming` durable in ``queue/`` with `envelope`; blocking.

        On any error the message is aborted and the error re-raised: nothing
        half-committed stays behind.
        """
        envelope.queue_id = incoming.queue_id
        envelope.size = incoming.size
        try:
            incoming.file.flush()
            os.fsync(incoming.file.fileno())
            incoming.file.close()
            env_tmp = self._write_tmp_envelope(envelope)
            queue = self.root / QUEUE
            os.rename(incoming.path, queue / (incoming.queue_id + DATA_SUFFIX))
            os.rename(env_tmp, queue / (incoming.queue_id + ENVELOPE_SUFFIX))
            incoming.done = True
            self._sync_queue_dir(queue)
        except BaseException:
            self._discard(incoming)
            raise
        return incoming.queue_id

    def inject(self, envelope: Envelope, data: bytes | Iterator[bytes]) -> str:
        """Commit a message we generate ourselves (bounces, `mta sendmail`); blocking."""
        incoming = self.receive()
        try:
            if isinstance(data, bytes):
                incoming.write(data)
            else:
                for chunk in data:
                    incoming.write(chunk)
        except BaseException:
            incoming.abort()
            raise
        return self.commit(incoming, envelope)

    def _discard(self, incoming: Incoming) -> None:
        incoming.abort()
        # The envelope (the commit record) before the data: the caller answers 451.
        for path in (self.root / QUEUE / (incoming.queue_id + ENVELOPE_SUFFIX),
                     self.root / QUEUE / (incoming.queue_id + DATA_SUFFIX),
                     self.root / TMP / (incoming.queue_id + ENVELOPE_SUFFIX)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _write_tmp_envelope(self, envelope: Envelope) -> Path:
        path = self.root / TMP / (envelope.queue_id + ENVELOPE_SUFFIX)
        self._write_synced(path, envelope.to_json())
        return path

    @staticmethod
    def _write_synced(path: Path, raw: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_queue_dir(self, directory: Path) -> None:
        """Group commit: one directory fsync covers every rename made before it began."""
        with self._ticket_lock:
            self._tickets += 1
            ticket = self._tickets
        with self._dir_lock:
            if self._synced >= ticket:
                return
            with self._ticket_lock:
                upto = self._tickets
            fsync_dir(directory)
            self._synced = upto

    # -- committed messages -----------------------------------------------------

    def _where(self, queue_id: str) -> str:
        _check_id(queue_id)
        for state in (QUEUE, HOLD):
            if (self.root / state / (queue_id + ENVELOPE_SUFFIX)).exists():
                return state
        raise SpoolError(f"no message {queue_id} in the queue")

    def state_of(self, queue_id: str) -> str:
        """``queue`` or ``hold``; SpoolError if neither."""
        return self._where(queue_id)

    def data_path(self, queue_id: str) -> Path:
        return self.root / self._where(queue_id) / (queue_id + DATA_SUFFIX)

    def open_data(self, queue_id: str) -> BinaryIO:
        return self.data_path(queue_id).open("rb")

    def load(self, queue_id: str) -> Envelope:
        path = self.root / self._where(queue_id) / (queue_id + ENVELOPE_SUFFIX)
        return Envelope.from_json(path.read_bytes())

    def save(self, envelope: Envelope) -> None:
        """Atomically rewrite the envelope of a committed message; blocking."""
        state = self._where(envelope.queue_id)
        directory = self.root / state
        tmp = directory / f".{envelope.queue_id}{ENVELOPE_SUFFIX}.tmp"
        self._write_synced(tmp, envelope.to_json())
        os.rename(tmp, directory / (envelope.queue_id + ENVELOPE_SUFFIX))
        self._sync_queue_dir(directory)

    def remove(self, queue_id: str) -> None:
        """Remove a message: envelope first (the commit record), then data."""
        state = self._where(queue_id)
        directory = self.root / state
        (directory / (queue_id + ENVELOPE_SUFFIX)).unlink()
        self._sync_queue_dir(directory)
        try:
            (directory / (queue_id + DATA_SUFFIX)).unlink()
        except FileNotFoundError:
            pass

    def hold(self, queue_id: str) -> None:
        self._move(queue_id, QUEUE, HOLD)

    def release(self, queue_id: str) -> None:
        self._move(queue_id, HOLD, QUEUE)

    def _move(self, queue_id: str, source: str, target: str) -> None:
        if self._where(queue_id) != source:
            raise SpoolError(f"message {queue_id} is not in {source}/")
        # Data first: an envelope is never without its data.  Recovery puts
        # back together a message a crash left split between the two.
        src, dst = self.root / source, self.root / target
        os.rename(src / (queue_id + DATA_SUFFIX), dst / (queue_id + DATA_SUFFIX))
        os.rename(src / (queue_id + ENVELOPE_SUFFIX), dst / (queue_id + ENVELOPE_SUFFIX))
        fsync_dir(dst)
        fsync_dir(src)

    def queue_ids(self, state: str = QUEUE) -> list[str]:
        """Committed queue ids in `state`, oldest first."""
        return sorted(p.name[: -len(ENVELOPE_SUFFIX)]
                      for p in (self.root / state).glob("*" + ENVELOPE_SUFFIX)
                      if not p.name.startswith("."))

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
        for path in (self.root / TMP).iterdir():
            log.info("spool recovery: removing unaccepted {name}", name=path.name)
            _unlink(path)
        for state in (QUEUE, HOLD):
            for path in (self.root / state).glob(".*.tmp"):
                _unlink(path)
        self._rejoin_split_moves()
        envelopes = []
        for state in (QUEUE, HOLD):
            directory = self.root / state
            for data in directory.glob("*" + DATA_SUFFIX):
                queue_id = data.name[: -len(DATA_SUFFIX)]
                if not (directory / (queue_id + ENVELOPE_SUFFIX)).exists():
                    # Renamed into place but the envelope never followed: no 250 was sent.
                    log.info("spool recovery: removing uncommitted {queue_id}", queue_id=queue_id)
                    _unlink(data)
            for env_path in sorted(directory.glob("*" + ENVELOPE_SUFFIX)):
                queue_id = env_path.name[: -len(ENVELOPE_SUFFIX)]
                try:
                    envelope = Envelope.from_json(env_path.read_bytes())
                    if envelope.queue_id != queue_id:
                        raise EnvelopeError("queue id does not match the file name")
                    if not (directory / (queue_id + DATA_SUFFIX)).exists():
                        raise EnvelopeError("message data is missing")
                except (OSError, EnvelopeError) as e:
                    self._quarantine(directory, queue_id, str(e))
                    continue
                if state == QUEUE:
                    envelopes.append(envelope)
        fsync_dir(self.root / QUEUE)
        return envelopes

    def _rejoin_split_moves(self) -> None:
        for source, target in ((QUEUE, HOLD), (HOLD, QUEUE)):
            for env_path in (self.root / source).glob("*" + ENVELOPE_SUFFIX):
                queue_id = env_path.name[: -len(ENVELOPE_SUFFIX)]
                data_name = queue_id + DATA_SUFFIX
                if not (self.root / source / data_name).exists() and \
                        (self.root / target / data_name).exists():
                    os.rename(self.root / target / data_name, self.root / source / data_name)

    def _quarantine(self, directory: Path, queue_id: str, why: str) -> None:
        log.error("spool recovery: {queue_id} moved to corrupt/: {why}", queue_id=queue_id, why=why)
        for suffix in (ENVELOPE_SUFFIX, DATA_SUFFIX):
            path = directory / (queue_id + suffix)
            if path.exists():
                os.rename(path, self.root / CORRUPT / path.name)
        fsync_dir(self.root / CORRUPT)


def _check_id(queue_id: str) -> None:
    if not queue_id or not all(c in "0123456789ABCDEF" for c in queue_id):
        raise SpoolError(f"not a queue id: {queue_id!r}")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _write_all(fd: int, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        view = view[os.write(fd, view):]
