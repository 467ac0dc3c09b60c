"""A latency load generator: raw SMTP over asyncio, a new connection per message.

    python bench/loadgen.py PORT MESSAGES SESSIONS [SIZE]

`SESSIONS` clients in parallel, each connecting, sending EHLO, MAIL, RCPT,
DATA and a SIZE-byte message, then QUIT, like smtp-source without -d.  For
each message it records the time from writing the final "\\r\\n.\\r\\n" to
reading the complete 250 reply.  Prints one JSON object: seconds, messages,
errors, p50_ms, p90_ms, p99_ms, max_ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

SENDER = b"bench@client.test"
RECIPIENT = b"user@example.org"


def body(size: int) -> bytes:
    """A message of about `size` bytes, without its last CRLF (the end marker adds it)."""
    head = (b"From: <" + SENDER + b">\r\nTo: <" + RECIPIENT + b">\r\n"
            b"Subject: latency\r\nMessage-ID: <loadgen@client.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    text = head + line * max(1, (size - len(head)) // len(line))
    return text[:-2]


async def reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) reply; its code."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"connection closed or short reply: {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


async def one(port: int, data: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if await reply(reader) != 220:
            raise ConnectionError("no 220")
        for command, expect in ((b"EHLO loadgen.client.test\r\n", 250),
                                (b"MAIL FROM:<" + SENDER + b">\r\n", 250),
                                (b"RCPT TO:<" + RECIPIENT + b">\r\n", 250),
                                (b"DATA\r\n", 354)):
            writer.write(command)
            code = await reply(reader)
            if code != expect:
                raise ConnectionError(f"{command.split()[0].decode()}: {code}")
        writer.write(data)
        await writer.drain()
        start = time.perf_counter()
        writer.write(b"\r\n.\r\n")
        code = await reply(reader)
        latency = time.perf_counter() - start
        if code != 250:
            raise ConnectionError(f"end of data: {code}")
        writer.write(b"QUIT\r\n")
        await reply(reader)
        return latency
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def run(port: int, messages: int, sessions: int, size: int) -> dict[str, float]:
    data = body(size)
    latencies: list[float] = []
    errors: list[str] = []
    remaining = iter(range(messages))

    async def worker() -> None:
        for _ in remaining:
            try:
                latencies.append(await one(port, data))
            except (OSError, ConnectionError) as e:
                errors.append(str(e))
                if len(errors) > messages // 10 + 10:
                    return

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    seconds = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {"seconds": seconds, "messages": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": latencies[-1] * 1000 if latencies else float("nan")}


if __name__ == "__main__":
    port, messages, sessions = (int(a) for a in sys.argv[1:4])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 5000
    print(json.dumps(asyncio.run(run(port, messages, sessions, size))))
