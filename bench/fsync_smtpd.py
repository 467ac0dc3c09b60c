"""aiosmtpd with a durable handler: the Python asyncio peer in the bench.

Each message is written to a temporary file, fsync'd, renamed into the
directory and the directory fsync'd before the 250, as a durable MTA must.
The disk work runs in the loop's default thread pool so that concurrent
sessions overlap their fsyncs (a handler that blocked the loop would
serialise them, and be slower than a fair peer).

    python bench/fsync_smtpd.py PORT DIRECTORY
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.smtp import SMTP, Envelope, Session


class DurableHandler:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.new = os.path.join(directory, "new")
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.new, exist_ok=True)
        self.counter = itertools.count()
        self.pid = os.getpid()

    def _store(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.tmp, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.new, name))
        dfd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{self.pid}.{next(self.counter)}"
        header = (f"X-Envelope-From: <{envelope.mail_from}>\r\n"
                  f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n").encode()
        data = header + (envelope.original_content or b"")
        await asyncio.get_running_loop().run_in_executor(None, self._store, name, data)
        return "250 2.0.0 OK queued"


async def serve(port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32))
    handler = DurableHandler(directory)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", ident="aiosmtpd bench"),
        host="127.0.0.1", port=port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
