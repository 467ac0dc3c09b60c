"""The envelope of a queued message: who sent it, to whom, and how far each recipient got.

An `Envelope` is what the SMTP transaction established (reverse-path,
forward-paths with their DSN parameters, client, body type) plus the
delivery record (per-recipient state, attempts, next attempt, last error).
It is stored as JSON beside the message data; `to_json`/`from_json` are the
only serialisation, and `from_json` raises `EnvelopeError` on anything it
cannot trust, so the spool can move the file to ``corrupt/``.

Recipient states:

- ``pending``: not yet delivered; `status`/`diagnostic` hold the last
  temporary failure if any attempt was made (the message is "deferred").
- ``delivered``: the next hop or the mailbox took it.
- ``failed``: permanently failed (5xx, expiry, null MX...).

`notified` is True once any DSN the recipient asked for (failure, success)
has been injected into the spool, or none was due.  A message whose
recipients are all final and notified is complete and is removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

ENVELOPE_VERSION = 1

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
_STATES = (PENDING, DELIVERED, FAILED)


class EnvelopeError(ValueError):
    """The stored envelope is unreadable or inconsistent."""


# What each stored field may hold: the exact JSON types (a bool is not a number here),
# and for some, the only values allowed.  Checked for every envelope read, so kept cheap.
_NONE = type(None)
_NUMBER = (int, float)
_RECIPIENT_TYPES: dict[str, tuple[type, ...]] = {
    "address": (str,), "orcpt": (str, _NONE), "notify": (list, _NONE), "state": (str,),
    "status": (str, _NONE), "diagnostic": (str, _NONE), "remote_mta": (str, _NONE),
    "updated": (int, float, _NONE), "notified": (bool,), "delay_warned": (bool,),
    "sender": (str, _NONE), "expansion": (bool,),
}
_ENVELOPE_TYPES: dict[str, tuple[type, ...]] = {
    "queue_id": (str,), "reverse_path": (str,), "recipients": (list,), "arrival": _NUMBER,
    "client_address": (str,), "client_helo": (str,), "client_hostname": (str,),
    "protocol": (str,), "auth_identity": (str, _NONE), "ret": (str, _NONE),
    "envid": (str, _NONE), "body": (str,), "smtputf8": (bool,), "size": (int,),
    "attempts": (int,), "next_attempt": _NUMBER, "last_error": (str, _NONE),
    "is_report": (bool,), "extra": (dict,), "version": (int,),
}
_VALUES = {"ret": {None, "FULL", "HDRS"}, "body": {"7BIT", "8BITMIME", "BINARYMIME"},
           "state": set(_STATES)}
_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
_FLOATS = ("arrival", "next_attempt", "updated")  # a float field must be finite
_SHAPES: dict[tuple[str, tuple[str, ...], tuple[type, ...]],
              tuple[tuple[tuple[str, set[Any]], ...], tuple[str, ...]]] = {}


def validate(data: Any) -> None:
    """Check a stored envelope (the JSON object) field by field; EnvelopeError names the
    first field that is missing, unknown, or of the wrong type or value."""
    if type(data) is not dict:
        raise EnvelopeError("not a JSON object")
    _check(data, _ENVELOPE_TYPES, "envelope", ("queue_id", "reverse_path", "recipients",
                                               "arrival"))
    if not data["recipients"]:
        raise EnvelopeError("envelope without recipients")
    for recipient in data["recipients"]:
        if type(recipient) is not dict:
            raise EnvelopeError("recipient: not a JSON object")
        _check(recipient, _RECIPIENT_TYPES, "recipient", ("address",))
        notify = recipient.get("notify")
        if notify is not None and not all(type(n) is str and n in _NOTIFY for n in notify):
            raise EnvelopeError(f"recipient notify: bad value {notify!r:.80}")


def _check(data: dict[str, Any], types: dict[str, tuple[type, ...]], what: str,
           required: tuple[str, ...]) -> None:
    # Envelopes written by us share a few shapes (field names and value types).  A shape
    # is checked field by field once; then only the checks its values still need are
    # made (listing or loading 100,000 messages feels every microsecond here).
    shape = (what, tuple(data), tuple(map(type, data.values())))
    checks = _SHAPES.get(shape)
    if checks is None:
        checks = _learn(data, types, what, required)
        if len(_SHAPES) < 4096:
            _SHAPES[shape] = checks
    values, floats = checks
    for name, allowed in values:
        if data[name] not in allowed:
            raise EnvelopeError(f"{what} {name}: bad value {data[name]!r:.80}")
    for name in floats:
        if not math.isfinite(data[name]):
            raise EnvelopeError(f"{what} {name}: bad value {data[name]!r:.80}")


def _learn(data: dict[str, Any], types: dict[str, tuple[type, ...]], what: str,
           required: tuple[str, ...]) -> tuple[tuple[tuple[str, set[Any]], ...], tuple[str, ...]]:
    """Check a new shape's names and types; return the checks of values it still needs:
    fields with a closed set of values, and floats that must be finite."""
    for name, value in data.items():
        allowed = types.get(name)
        if allowed is None:
            raise EnvelopeError(f"{what}: unknown field {name!r:.80}")
        if type(value) not in allowed:
            raise EnvelopeError(f"{what} {name}: bad value {value!r:.80}")
    for name in required:
        if name not in data:
            raise EnvelopeError(f"{what}: {name} is missing")
    return (tuple((name, _VALUES[name]) for name in data if name in _VALUES),
            tuple(name for name, value in data.items()
                  if name in _FLOATS and type(value) is float))


@dataclass
class Recipient:
    address: str  # the forward-path as given in RCPT (without < >)
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded: "rfc822;user@example.org"
    notify: tuple[str, ...] | None = None  # ("NEVER",) or subset of SUCCESS, FAILURE, DELAY; None = not given
    state: str = PENDING
    status: str | None = None  # last enhanced status code, e.g. "4.4.1"
    diagnostic: str | None = None  # last remote reply or local reason
    remote_mta: str | None = None  # host that gave `diagnostic`
    updated: float | None = None  # time of the last state change
    notified: bool = False
    delay_warned: bool = False
    # The envelope sender for this recipient when it differs from the message's: a
    # list member's is the list's owner, so that its bounces go there [RFC 5321 3.10].
    sender: str | None = None
    # The address as given, kept (delivered) only to send the "expanded" report its
    # NOTIFY=SUCCESS asked for when aliases made several recipients of it.
    expansion: bool = False

    @property
    def is_final(self) -> bool:
        return self.state != PENDING

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")

    def expanded(self, targets: Iterable[Any], null_sender: bool) -> list[Recipient]:
        """This recipient (as given in RCPT) as the recipients its alias targets make.

        Each target has an ``address`` and a ``sender`` (a list's owner, or None).
        The original address is kept as ORCPT [RFC 3461 4.2: the address of the
        RCPT that brought the message here] unless the client gave one.

        RFC 3461 6.2.7: an alias to one address passes NOTIFY on, as a relay
        does.  A list changes the envelope sender of its members, and the
        original NOTIFY does not reach them (6.2.7.2); an alias to several
        addresses passes on all of NOTIFY but SUCCESS (6.2.7.3).  In both cases
        a sender who asked for SUCCESS gets an "expanded" report instead: the
        original address stays in the envelope, delivered and marked `expansion`, so
        that the first attempt sends it.  A message from <> keeps <> for every
        member (a bounce stays a bounce) and earns no report.
        """
        targets = list(targets)
        if len(targets) == 1 and targets[0].address == self.address and targets[0].sender is None:
            return [self]
        kind = "rfc822" if self.address.isascii() else "utf-8"  # RFC 6533 3
        orcpt = self.orcpt or f"{kind};{self.address}"
        lists = not null_sender and any(t.sender is not None for t in targets)
        expansion = len(targets) > 1 or lists
        notify = self.notify
        if expansion and notify is not None and "SUCCESS" in notify:
            notify = tuple(n for n in notify if n != "SUCCESS") or ("NEVER",)
        out = []
        for target in targets:
            is_list = target.sender is not None and not null_sender
            out.append(Recipient(address=target.address, orcpt=orcpt,
                                 notify=None if is_list else notify,
                                 sender=target.sender if is_list else None))
        if expansion and notify is not self.notify and not null_sender:
            out.append(Recipient(address=self.address, orcpt=self.orcpt, notify=self.notify,
                                 state=DELIVERED, status="2.0.0", expansion=True,
                                 diagnostic=f"expanded to {len(targets)} recipient(s)"))
        return out

    def wants(self, event: str) -> bool:
        """Whether a DSN is due for `event` (SUCCESS, FAILURE, DELAY) [RFC 3461 4.1]."""
        if self.notify is None:
            # Absent NOTIFY: FAILURE, and DELAY at the MTA's discretion (we send it).
            return event in ("FAILURE", "DELAY")
        return event in self.notify


def add_recipients(recipients: list[Recipient], new: Iterable[Recipient]) -> None:
    """Append `new` to `recipients`, leaving out addresses already there (de-duplication:
    one delivery per address, whatever aliases led to it twice)."""
    have = {(r.address.lower(), r.expansion) for r in recipients}
    for recipient in new:
        key = (recipient.address.lower(), recipient.expansion)
        if key not in have:
            have.add(key)
            recipients.append(recipient)


@dataclass
class Envelope:
    queue_id: str
    reverse_path: str  # "" for the null path <>
    recipients: list[Recipient]
    arrival: float
    client_address: str = ""
    client_helo: str = ""
    client_hostname: str = ""
    protocol: str = "ESMTP"  # SMTP | ESMTP | ESMTPS | ESMTPA | ESMTPSA | LOCAL
    auth_identity: str | None = None
    ret: str | None = None  # RFC 3461 RET: FULL | HDRS
    envid: str | None = None  # RFC 3461 ENVID, decoded
    body: str = "7BIT"  # 7BIT | 8BITMIME | BINARYMIME
    smtputf8: bool = False
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    is_report: bool = False  # a DSN we generated: never bounced, never warned about
    extra: dict[str, Any] = field(default_factory=dict)

    def sender_for(self, recipient: Recipient) -> str:
        """The reverse-path used for `recipient`: its list's owner, else the message's."""
        return recipient.sender if recipient.sender is not None else self.reverse_path

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def is_complete(self) -> bool:
        return all(r.is_final and r.notified for r in self.recipients)

    def to_json(self) -> bytes:
        """One line of compact JSON, without the fields that hold their defaults: written
        once a message, and read at every load and listing, so it must be cheap (a
        message as received is a third of the full record's length, and reads in less
        than half the time).  `from_json` puts the defaults back."""
        data = {name: value for name, value in self.__dict__.items()  # in order
                if _ENVELOPE_DEFAULTS.get(name, _NO_DEFAULT) != value}
        data["recipients"] = [  # json writes tuples as lists
            {name: value for name, value in r.__dict__.items()
             if _RECIPIENT_DEFAULTS.get(name, _NO_DEFAULT) != value}
            for r in self.recipients]
        data["version"] = ENVELOPE_VERSION
        return _COMPACT.encode(data).encode("utf-8") + b"\n"

    def as_record(self) -> dict[str, Any]:
        """Every field, defaults too, as JSON types: for people (`mta queue show`)."""
        record = dict(self.__dict__)
        record["recipients"] = [r.__dict__ for r in self.recipients]
        record["version"] = ENVELOPE_VERSION
        return json.loads(json.dumps(record))  # tuples become lists, as stored

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EnvelopeError(f"not JSON: {e}") from None
        validate(data)
        return cls.from_checked(data)

    @classmethod
    def from_checked(cls, data: dict[str, Any]) -> Envelope:
        """The envelope of a stored JSON object that has been through `validate`
        (`data` is used up)."""
        if data.pop("version", None) != ENVELOPE_VERSION:
            raise EnvelopeError("unknown envelope version")
        recipients = []
        for r in data.pop("recipients"):
            if r.get("notify") is not None:
                r["notify"] = tuple(r["notify"])
            recipients.append(Recipient(**r))
        envelope = cls(recipients=recipients, **data)
        return envelope


# The fields `to_json` leaves out when they hold these; `extra` is a dict, empty by default.
_NO_DEFAULT = object()
# json.dumps makes an encoder at every call when given options: this one is made once.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ENVELOPE_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Envelope) if f.default is not MISSING}
_ENVELOPE_DEFAULTS["extra"] = {}
_RECIPIENT_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Recipient) if f.default is not MISSING}
