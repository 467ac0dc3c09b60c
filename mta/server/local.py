"""Local submission: the `sendmail` command hands messages to the running server.

Any local user may send mail, while the server runs as its own user
(``twistd --uid``) and owns the spool.  Rather than a setgid drop directory
(Postfix's postdrop), `sendmail` connects to a UNIX socket of the running
server (``[server] sendmail_socket``, by default ``SPOOL/public/sendmail.sock``,
mode 0666 in a 0755 directory) and speaks SMTP over it, so that:

- the server writes every spool file itself: ownership and permissions are
  always its own, whoever submitted, and no setgid program or world-writable
  spool directory is needed;
- the message takes exactly the path of mail received over the network
  (session, policy, header completion, spool commit, scheduling, the mail
  log): there is no second way into the queue;
- the kernel tells us who is on the other end (``SO_PEERCRED``): the user is
  named in the Received header and the mail log, and is trusted as an
  authenticated user is (relaying allowed; RFC 6409 completion of bare
  messages), without a password.

When the server is not running, `sendmail` says so and exits with
EX_TEMPFAIL (75), as sendmail(8) does when it cannot queue: the caller
(cron, a script) keeps the message or reports the failure.

A socket left behind by a server that was killed is removed at start; a
socket that still answers means another server runs on this spool, and
start-up stops with one line saying so.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from mta.config import Listener

log = Logger(namespace="mta.local")

SOCKET_MODE = 0o666  # every local user may connect: that is the point
DIRECTORY_MODE = 0o755

# The listener the local sessions run under: no TLS, no AUTH (the kernel told us who it is).
LOCAL_LISTENER = Listener(endpoint="unix", role="local", tls="off", require_auth=False,
                          plaintext_auth=False, auth_mechanisms=(), atrn=False)


@dataclass(frozen=True)
class LocalUser:
    """Who is on the other end of a local connection (SO_PEERCRED)."""

    uid: int
    name: str
    pid: int = 0

    def __str__(self) -> str:
        return f"uid={self.uid} ({self.name})"


def peer_user(transport: Any) -> LocalUser | None:
    """The user of the process at the other end of a UNIX socket transport; None when
    the kernel cannot say (not Linux, not a UNIX socket)."""
    try:
        handle = transport.getHandle()
        raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, _gid = struct.unpack("3i", raw)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return LocalUser(uid, name, pid)


def reachable_by_others(path: Path) -> str | None:
    """Why users other than the server's cannot reach the socket at `path`, or None:
    every directory above it must let them through (o+x)."""
    directory = path.absolute().parent
    for parent in [directory, *directory.parents]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue  # not made yet: start-up makes it (0755)
        if not mode & stat.S_IXOTH:
            return (f"{parent} is mode {stat.S_IMODE(mode):o}: local users other than the "
                    f"server's cannot reach the sendmail socket {path} (chmod o+x {parent})")
    return None


def prepare_directory(path: Path) -> Path | None:
    """Make the socket's directory (0755) before privileges are dropped; returns it
    when we made it (so that it is given to the runtime user), else None."""
    directory = path.parent
    if directory.is_dir():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, DIRECTORY_MODE)
    return directory


def _clear_stale(path: Path) -> None:
    """Remove a socket a killed server left; refuse to start beside a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CannotListenError(None, str(path), "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise CannotListenError(None, str(path), e) from None
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise CannotListenError(None, str(path), "another server answers on it")


class LocalSubmission(service.Service):
    """Listens on the sendmail socket, as the runtime user (after twistd's --uid)."""

    name = "local-submission"

    def __init__(self, path: Path, factory: Any, reactor: Any) -> None:
        self.path = path
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale(self.path)
            self.port = self.reactor.listenUNIX(str(self.path), self.factory, mode=SOCKET_MODE)
        except (CannotListenError, OSError) as e:
            why = getattr(e, "socketError", None) or getattr(e, "strerror", None) or e
            sys.stderr.write(f"mta: cannot listen on the sendmail socket {self.path}: {why}\n")
            raise SystemExit(1) from None
        log.info("local submission (sendmail) on {path}", path=str(self.path))

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # removes the socket file
        return None
