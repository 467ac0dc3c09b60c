"""Fill an mta spool with N messages directly, without SMTP (run with this tree on PYTHONPATH).

    python bench/fill_spool.py SPOOL COUNT RECIPIENT [SIZE]

It uses the spool's own API (Spool.inject: each message committed and
fsync'd as the server would), so it keeps working when the file layout
changes.  Several threads inject at once: their directory fsyncs are shared.
Prints the number of messages now queued.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mta.spool.envelope import Envelope, Recipient
from mta.spool.store import Spool

THREADS = 16


def message(i: int, size: int) -> bytes:
    head = (f"From: <bench@client.test>\r\nTo: <user@held.test>\r\n"
            f"Subject: queued message {i}\r\nMessage-ID: <{i}.fill@client.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def main() -> None:
    root, count, recipient = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    spool = Spool(root)

    def one(i: int) -> str:
        envelope = Envelope(queue_id="", reverse_path="bench@client.test",
                            recipients=[Recipient(address=recipient)], arrival=time.time(),
                            client_address="127.0.0.1", client_helo="client.test")
        return spool.inject(envelope, message(i, size))

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(one, range(count), chunksize=256):
            pass
    print(len(spool.queue_ids()))


if __name__ == "__main__":
    main()
