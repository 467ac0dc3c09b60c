"""The date of a Date: or Received: field [RFC 5322 3.3], in local time.

Local time means asking for the time zone, which is slow (the C library looks
at /etc/localtime again every time); the field names seconds only, so each
second's text is made once and reused: every received message needs one.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import format_datetime

_last: tuple[int, str] = (-1, "")


def mail_date(when: float) -> str:
    """``Tue, 01 Dec 2026 05:00:00 +0100`` for the Unix time `when`."""
    global _last
    second = math.floor(when)
    if _last[0] != second:
        _last = (second, format_datetime(datetime.fromtimestamp(second, UTC).astimezone()))
    return _last[1]
