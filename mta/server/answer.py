"""What a command answers: the reply to send, and what the connection does next.

Every command of a session (session.py) ends in one `Answer`: a `Reply` (or
None when nothing is said yet: a BDAT chunk is read before its reply) and
the next step for the Twisted adapter (protocol.py), as one value:

- `CONTINUE`: read the next command;
- `CLOSE`: send the reply, then close the connection;
- `START_TLS`: send the reply in plain text, then hand the transport to TLS
  [RFC 3207 4];
- `ReadBody(reader)`: the bytes that follow are a message body (DATA, BDAT)
  for `reader`, until it says it has them all;
- `TurnRound(successor)`: send the reply, then give the live connection to
  `successor`, a client protocol that delivers our held mail to the other
  side (ATRN, TURN: reversal.py).

An Answer may also carry `then`: bookkeeping that the client need not wait
for, run once the reply is written (the log line and the scheduling of a
message just committed: the client has its 250 while they run).

Nothing here does I/O: these are values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.reply import Reply


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class StartTLS:
    pass


@dataclass(frozen=True)
class ReadBody:
    reader: Any  # a dataread.BodyReader


@dataclass(frozen=True)
class TurnRound:
    successor: Any  # an IProtocol: makeConnection(transport), dataReceived, connectionLost


Next = Continue | Close | StartTLS | ReadBody | TurnRound

CONTINUE = Continue()
CLOSE = Close()
START_TLS = StartTLS()


@dataclass(frozen=True)
class Answer:
    reply: Reply | None
    next: Next = CONTINUE
    then: Callable[[], None] | None = None  # run after the reply is written


def answer(result: Reply | Answer) -> Answer:
    """A handler's result as an Answer: a bare Reply means "send it and go on"."""
    return result if isinstance(result, Answer) else Answer(result)
