"""Property-based tests (hypothesis): the server and the parsers against random input.

- The server protocol, fed streams of commands, message data and random
  bytes (CR, LF, NUL, long lines, bare dots, 8-bit), split at random points:
  every reply is a well-formed reply line, nothing raises out of
  `dataReceived`, nothing is logged as a failure, and the unanswered input
  it keeps stays bounded.
- The address parser against the RFC 5321 4.1.2 grammar: what it accepts is
  a valid Mailbox within the length limits, parsing its own output gives the
  same Mailbox (one spelling per mailbox), and what it refuses is refused with
  AddressError only.
- ESMTP parameters: duplicates refused, keywords case-insensitive.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from mta.address import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    AddressError,
    parse_mailbox,
    parse_params,
    parse_path,
)
from mta.server.protocol import MAX_BUFFERED
from tests.protocol.dialog import Server

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*\Z")
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

COMMANDS = [
    b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<a@client.test>",
    b"MAIL FROM:<> BODY=8BITMIME SIZE=100", b"RCPT TO:<alice@example.org>",
    b"RCPT TO:<nobody@elsewhere.test>", b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS", b"DATA",
    b"BDAT 10", b"BDAT 0 LAST", b"RSET", b"NOOP", b"HELP", b"VRFY alice", b"EXPN list",
    b"ETRN example.org", b"STARTTLS", b"AUTH PLAIN", b"QUIT", b".", b"..",
    b"Subject: x", b"", b"MAIL FROM:<a@b.test> SIZE=99999999999999999999",
    b"RCPT TO:<\"quoted\\\"x\"@example.org>", b"MAIL FROM:<a@[IPv6:::1]>",
]
pieces = st.one_of(
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b".\r\n", b"\r\n.\r\n", b"\xff\xfe"]),
    st.binary(max_size=40),
    st.integers(min_value=500, max_value=20_000).map(lambda n: b"x" * n),
)
streams = st.lists(pieces, max_size=40).map(b"".join)


class FailuresLogged(list):
    """Log events with a traceback or at level critical, while it is installed."""

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if "log_failure" in event or (level is not None and level.name == "critical"):
            self.append(event)


@PROPERTY
@given(stream=streams, cuts=st.lists(st.integers(min_value=0, max_value=50_000), max_size=12),
       client=st.sampled_from(["127.0.0.1", "198.51.100.7"]))
def test_any_stream_split_anywhere_gets_well_formed_replies(tmp_path_factory, stream, cuts,
                                                             client):
    tmp = tmp_path_factory.mktemp("prop")
    server = Server(tmp, client=client, limits={"greeting_delay": 0})
    logged = FailuresLogged()
    globalLogPublisher.addObserver(logged)
    try:
        out = server.take()
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for start, end in itertools.pairwise(points):
            if server.closed:
                break
            server.protocol.dataReceived(stream[start:end])
            assert len(server.protocol._buffer) <= MAX_BUFFERED + (end - start)
            out += server.take()
    finally:
        globalLogPublisher.removeObserver(logged)
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line
    assert not logged, logged


# -- the address grammar [RFC 5321 4.1.2, RFC 6531 3.3] --------------------------------------

atext = st.sampled_from(list("abcxyzABC0189!#$%&'*+/=?^_`{|}~-"))
atom = st.text(atext, min_size=1, max_size=12)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join)
quoted = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=15).map(
    lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)
literal = st.one_of(st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
                    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"))
mailboxes = st.tuples(st.one_of(dot_string, quoted), st.one_of(domain, literal)).map(
    lambda parts: f"{parts[0]}@{parts[1]}")


@PROPERTY
@given(text=mailboxes)
def test_what_the_grammar_makes_parses_and_has_one_spelling(text):
    try:
        mailbox = parse_mailbox(text)
    except AddressError:
        # Only the length limits may refuse what the grammar builds.
        local = text.rsplit("@", 1)[0]
        assert len(local.encode()) > MAX_LOCAL_PART or len(text) > MAX_DOMAIN
        return
    assert len(mailbox.local.encode()) <= MAX_LOCAL_PART or mailbox.local.startswith('"')
    again = parse_mailbox(str(mailbox))
    assert again == mailbox  # normalising twice changes nothing


@PROPERTY
@given(text=st.text(max_size=80), utf8=st.booleans())
def test_anything_else_is_a_mailbox_or_an_address_error(text, utf8):
    try:
        mailbox = parse_mailbox(text, utf8=utf8)
    except AddressError:
        return
    assert "@" in str(mailbox)
    assert not any(c in str(mailbox) for c in "\r\n\x00")
    assert not mailbox.domain.endswith("..")


@PROPERTY
@given(path=st.text(max_size=80))
def test_paths_parse_or_raise_address_error(path):
    try:
        parse_path(path, utf8=True, null_ok=True)
    except AddressError:
        pass


def test_quoted_and_unquoted_spellings_are_one_mailbox():
    assert parse_mailbox('"bob"@example.org') == parse_mailbox("bob@example.org")
    assert str(parse_mailbox('"b\\ob"@example.org')) == "bob@example.org"
    assert str(parse_mailbox('"b o"@example.org')) == '"b o"@example.org'  # needs its quotes


@pytest.mark.parametrize("text", ["u@example.org..", "u@example..org", "u@.example.org",
                                  "u@.", "u@example.org..."])
def test_extra_dots_in_a_domain_are_refused(text):
    with pytest.raises(AddressError):
        parse_mailbox(text)


def test_one_trailing_dot_is_the_same_domain():
    assert parse_mailbox("u@example.org.").domain_key == "example.org"


@PROPERTY
@given(keyword=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True),
       value=st.from_regex(r"[\x21-\x3c\x3e-\x7e]{1,10}", fullmatch=True))
def test_a_parameter_given_twice_is_refused_whatever_its_case(keyword, value):
    assert parse_params(f"{keyword}={value}") == {keyword.upper(): value}
    with pytest.raises(AddressError):
        parse_params(f"{keyword}={value} {keyword.lower()}={value}")


@given(st.text(alphabet=st.sampled_from("ab.-[]:()\\ é\x00\x7f\t"), max_size=300), st.booleans())
def test_received_header_text_is_printable_with_no_comment_delimiters(text: str,
                                                                     utf8: bool) -> None:
    from mta.server.session import _header_safe
    safe = _header_safe(text, utf8)
    # What the rules keep, written plainly (the function takes a short cut for plain text).
    expected = "".join(c if utf8 or c.isascii() else "?" for c in text
                       if c.isprintable() and c not in "()\\")[:200]
    assert safe == expected
    assert safe.isprintable() and not set(safe) & set("()\\") and len(safe) <= 200
