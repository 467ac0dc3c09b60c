"""Local delivery into Maildirs: ``PATH/<user>/{tmp,new,cur}``, one Maildir per user.

`deliver(hop, deliveries, data, hostname)` writes one copy per `Delivery`
(address, mailbox name from aliases.py, return path) and returns one
outcome each, in order.  It blocks on the disk: the
scheduler calls it in a thread.

What it promises:

- A message appears in ``new/`` complete or not at all: it is written to
  ``tmp/`` under a unique name, fsync'd, renamed into ``new/`` and the
  directory is fsync'd, the usual Maildir protocol made durable.
- It is streamed from the spool file, never read whole into memory; line
  endings become LF, as Maildir readers expect, and ``Return-Path:`` and
  ``Delivered-To:`` are prepended [RFC 5321 4.4].
- A delivery without a mailbox (no such user: aliases.py decides) fails
  with 5.1.1; a mailbox name that cannot be a directory name (``/``,
  leading dot) fails with 5.1.3;
  disk trouble is an `OSError`, which `outcome.classify` defers.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mta.delivery.outcome import Delivered, Failed, Outcome, classify
from mta.delivery.router import NextHop
from mta.safeio import fsync_dir
from mta.spool.store import MessageData

_counter = itertools.count()


@dataclass(frozen=True)
class Delivery:
    address: str  # the recipient, for Delivered-To
    mailbox: str | None  # the user's Maildir name (aliases.Addresses.mailbox); None: no such user
    return_path: str  # the envelope sender for this recipient ("" for <>)


def deliver(hop: NextHop, deliveries: list[Delivery], data: MessageData,
            hostname: str) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for delivery in deliveries:
        user = delivery.mailbox
        if user is None:
            outcomes.append(Failed("5.1.1", f"no such user here: <{delivery.address}>"))
        elif not _safe_name(user):
            outcomes.append(Failed("5.1.3", f"cannot deliver to local part of "
                                            f"<{delivery.address}>"))
        else:
            outcomes.append(_deliver_one(hop, delivery, user, data, hostname))
    return outcomes


def _safe_name(user: str) -> bool:
    return bool(user) and "/" not in user and "\0" not in user and not user.startswith(".")


def _deliver_one(hop: NextHop, delivery: Delivery, user: str, data: MessageData,
                 hostname: str) -> Outcome:
    assert hop.path is not None
    maildir = hop.path / user
    try:
        _make_maildir(maildir)
        name = _unique_name(hostname)
        tmp = maildir / "tmp" / name
        with data.open("rb") as source:
            _write_message(tmp, delivery.return_path, delivery.address, source)
        os.rename(tmp, maildir / "new" / name)
        fsync_dir(maildir / "new")
    except OSError as e:
        return classify(e)
    # Reports go to outside senders: they name the recipient, never our files.
    return Delivered("2.0.0", "delivered to mailbox")


def _make_maildir(maildir: Path) -> None:
    """Create what is missing of ``maildir/{tmp,new,cur}``, each new directory durable.

    The message is fsync'd into ``new/``; a crash must not then lose ``new/``
    itself, or the user's fresh Maildir, or the domain's root, with it.
    """
    parents: set[Path] = set()
    for directory in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if not directory.is_dir():
            if directory == maildir.parent:
                directory.mkdir(parents=True, exist_ok=True)
            else:
                directory.mkdir(exist_ok=True, mode=0o700)
            parents.add(directory.parent)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(parent)


def _unique_name(hostname: str) -> str:
    """time.MusecPpidQn.host, unique per delivery [the Maildir naming convention]."""
    now = time.time()
    host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(_counter)}.{host}"


def _write_message(path: Path, reverse_path: str, address: str, source: BinaryIO) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=256 * 1024, closefd=False) as out:
            out.write(f"Return-Path: <{reverse_path}>\nDelivered-To: {address}\n".encode())
            for line in iter(lambda: source.readline(65536), b""):
                if line.endswith(b"\r\n"):
                    line = line[:-2] + b"\n"
                out.write(line)
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)

