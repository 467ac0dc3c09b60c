"""Every command of the server, its ordering rules and its replies (DESIGN.md section 4)."""

from __future__ import annotations

import pytest

from tests.protocol.dialog import Server, body_of, reply_codes

EHLO = "EHLO client.test\r\n"
MAIL = "MAIL FROM:<sender@client.test>\r\n"
RCPT = "RCPT TO:<alice@example.org>\r\n"


@pytest.fixture
def server(tmp_path):
    return Server(tmp_path)


def greeted(tmp_path, **sections) -> Server:
    s = Server(tmp_path, **sections)
    s.take()
    s.send(EHLO)
    return s


def test_greeting_is_220_with_hostname(server):
    assert server.take() == b"220 mx.test ESMTP mta ready\r\n"


def test_ehlo_advertises_implemented_extensions_only(tmp_path):
    s = Server(tmp_path)
    s.take()
    out = s.send(EHLO).decode()
    lines = out.split("\r\n")[:-1]
    assert lines[0] == "250-mx.test hello client.test [127.0.0.1]"
    keywords = [line[4:] for line in lines[1:]]
    for expected in ("PIPELINING", "SIZE 25000000", "8BITMIME", "SMTPUTF8",
                     "ENHANCEDSTATUSCODES", "DSN", "CHUNKING", "HELP", "SEND", "SOML", "SAML"):
        assert expected in keywords
    # Later-stage commands are neither advertised nor accepted.
    for absent in ("STARTTLS", "ETRN", "ATRN", "TURN"):
        assert absent not in keywords
    assert not any(k.startswith("AUTH") for k in keywords)
    assert lines[-1].startswith("250 ")


def test_helo_has_no_extensions_and_no_enhanced_codes(tmp_path):
    s = Server(tmp_path)
    s.take()
    assert s.send("HELO client.test\r\n") == b"250 mx.test hello client.test\r\n"
    assert s.send(MAIL) == b"250 sender OK\r\n"
    # ESMTP parameters are not for HELO sessions.
    assert s.codes("RSET\r\nMAIL FROM:<a@b.test> SIZE=10\r\n") == ["250", "555"]


@pytest.mark.parametrize("cmd", ["EHLO", "HELO", "EHLO  "])
def test_helo_ehlo_need_argument(server, cmd):
    server.take()
    # No enhanced codes before ENHANCEDSTATUSCODES was offered [RFC 2034 3].
    assert server.codes(cmd + "\r\n") == ["501"]


def test_full_transaction_and_queued_reply(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(MAIL) == ["250 2.1.0"]
    assert s.codes(RCPT) == ["250 2.1.5"]
    assert s.codes("DATA\r\n") == ["354"]
    out = s.send("Subject: x\r\n\r\nbody\r\n.\r\n").decode()
    envelope = s.queued[0]
    assert out == f"250 2.0.0 OK queued as {envelope.queue_id}\r\n"
    assert envelope.reverse_path == "sender@client.test"
    assert [r.address for r in envelope.recipients] == ["alice@example.org"]
    assert body_of(s.queued_data()) == b"Subject: x\r\n\r\nbody\r\n"
    stored = s.spool.load(envelope.queue_id)
    assert stored.recipients[0].state == "pending" and stored.size == envelope.size


def test_received_header(tmp_path):
    s = greeted(tmp_path)
    s.send(MAIL + RCPT + "DATA\r\n")
    s.send("Subject: x\r\n\r\nbody\r\n.\r\n")
    queue_id = s.queued[0].queue_id
    header = s.queued_data().split(b"\r\n\r\n")[0].decode()
    assert header.startswith("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (mta) "
                             f"with ESMTP id {queue_id}\r\n\tfor <alice@example.org>;\r\n\t")
    assert "2027" in header or "+0000" in header or "-" in header  # an RFC 5322 date


def test_received_header_tags_an_ipv6_client_literal(tmp_path):
    s = Server(tmp_path, client="2001:db8::25")
    s.take()
    s.send(EHLO + MAIL + RCPT + "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert s.queued_data().startswith(b"Received: from client.test ([IPv6:2001:db8::25])\r\n")


def test_body_without_a_value_is_501(tmp_path):
    s = greeted(tmp_path)
    out = s.send("MAIL FROM:<a@b.test> BODY\r\n")
    assert reply_codes(out) == ["501 5.5.4"] and b"None" not in out


def test_rset_clears_transaction(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(MAIL + RCPT + "RSET\r\n" + RCPT) == ["250 2.1.0", "250 2.1.5", "250 2.0.0",
                                                        "503 5.5.1"]
    assert s.codes("RSET extra\r\n") == ["501 5.5.4"]


def test_new_ehlo_clears_transaction(tmp_path):
    s = greeted(tmp_path)
    s.send(MAIL + RCPT)
    out = s.send(EHLO + "DATA\r\n")
    assert reply_codes(out)[-1] == "503 5.5.1"


def test_quit_closes(tmp_path):
    s = greeted(tmp_path)
    assert s.send("QUIT\r\n") == b"221 2.0.0 mx.test closing connection\r\n"
    assert s.closed
    # Nothing after QUIT is answered.
    assert s.send("NOOP\r\n") == b""


def test_quit_after_data_does_not_lose_the_message(tmp_path):
    s = greeted(tmp_path)
    out = s.send(MAIL + RCPT + "DATA\r\n")
    out += s.send("x\r\n.\r\nQUIT\r\n")
    assert reply_codes(out) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert len(s.queued) == 1


def test_noop_vrfy_expn_help(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("NOOP\r\nNOOP anything\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert s.codes("VRFY alice\r\n") == ["252 2.5.2"]
    assert s.codes("VRFY\r\n") == ["501 5.5.4"]
    assert s.codes("EXPN staff\r\n") == ["502 5.5.1"]
    help_all = s.send("HELP\r\n").decode()
    assert help_all.startswith("214-2.0.0 Commands: ") and "MAIL" in help_all
    help_mail = s.send("HELP mail\r\n").decode()
    assert help_mail.startswith("214-2.0.0 MAIL FROM:<reverse-path>")
    assert s.codes("HELP FOO\r\n") == ["504 5.5.1"]


@pytest.mark.parametrize("verb", ["STARTTLS", "AUTH PLAIN", "ETRN example.org", "ATRN", "TURN"])
def test_unoffered_commands_are_502(tmp_path, verb):
    s = greeted(tmp_path)
    assert s.codes(verb + "\r\n") == ["502 5.5.1"]


@pytest.mark.parametrize("verb", ["SEND", "SOML", "SAML"])
def test_send_soml_saml_are_mail(tmp_path, verb):
    s = greeted(tmp_path)
    assert s.codes(f"{verb} FROM:<a@client.test>\r\n" + RCPT + "DATA\r\n") == \
        ["250 2.1.0", "250 2.1.5", "354"]
    s.send("hi\r\n.\r\n")
    assert len(s.queued) == 1
    assert s.codes(f"{verb} FROM:<a@client.test>\r\n{verb} FROM:<a@client.test>\r\n") == \
        ["250 2.1.0", "503 5.5.1"]


def test_commands_are_case_insensitive(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("mail from:<a@client.test>\r\nrcpt to:<alice@example.org>\r\nrSeT\r\n") == \
        ["250 2.1.0", "250 2.1.5", "250 2.0.0"]


# -- ordering [RFC 5321 4.1.4] ----------------------------------------------------

def test_mail_before_greeting_is_503(server):
    server.take()
    assert server.codes(MAIL) == ["503"]
    assert server.codes(RCPT) == ["503"]
    assert server.codes("DATA\r\n") == ["503"]


def test_rcpt_before_mail_is_503(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(RCPT) == ["503 5.5.1"]


def test_data_before_rcpt_is_503(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("DATA\r\n") == ["503 5.5.1"]
    assert s.codes(MAIL + "DATA\r\n") == ["250 2.1.0", "503 5.5.1"]


def test_data_after_only_failed_rcpts_is_554(tmp_path):
    # RFC 2920 3.1: a pipelined DATA after refused RCPTs gets 554, not 354.
    s = greeted(tmp_path)
    out = s.codes(MAIL + "RCPT TO:<nobody@example.org>\r\nDATA\r\n")
    assert out == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]


def test_nested_mail_is_503(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(MAIL + MAIL) == ["250 2.1.0", "503 5.5.1"]


def test_unknown_command_is_500(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("FOO bar\r\n") == ["500 5.5.1"]
    assert s.codes("\r\n") == ["500 5.5.1"]


@pytest.mark.parametrize("line", [
    "MAIL <a@b.test>", "MAIL FROM:a@b@c", "MAIL FROM:<a@b.test", "MAIL FROM:<a@-b.test>",
    "MAIL FROM:<a@b.test> SIZE=abc", "MAIL FROM:<a@b.test> SIZE", "MAIL FROM:<a@b.test> RET=ALL",
    "MAIL FROM:<a@b.test> ENVID=a+zz", "MAIL FROM:<a@b.test> SMTPUTF8=yes",
    "MAIL FROM:<a@b.test> SIZE=1 SIZE=2",
])
def test_bad_mail_arguments_are_501(tmp_path, line):
    s = greeted(tmp_path)
    assert s.codes(line + "\r\n")[0].startswith("501")


@pytest.mark.parametrize("line", [
    "RCPT alice@example.org", "RCPT TO:<>", "RCPT TO:<alice@>",
    "RCPT TO:<alice@example.org> NOTIFY=NEVER,SUCCESS", "RCPT TO:<alice@example.org> NOTIFY=SOMETIMES",
    "RCPT TO:<alice@example.org> ORCPT=rfc822", "RCPT TO:<alice@example.org> ORCPT=rfc822;a+Zb",
])
def test_bad_rcpt_arguments_are_refused(tmp_path, line):
    s = greeted(tmp_path)
    s.send(MAIL)
    assert s.codes(line + "\r\n")[0][:1] == "5"


def test_unknown_parameters_are_555(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM:<a@b.test> FOO=bar\r\n") == ["555 5.5.4"]
    s.send(MAIL)
    assert s.codes(RCPT.replace("\r\n", " XYZ\r\n")) == ["555 5.5.4"]


def test_body_binarymime_is_not_offered(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n") == ["504 5.5.4"]


def test_null_sender_and_postmaster(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n") == \
        ["250 2.1.0", "250 2.1.5", "354"]
    s.send("x\r\n.\r\n")
    envelope = s.queued[0]
    assert envelope.reverse_path == ""
    assert envelope.recipients[0].address == "postmaster@example.org"


def test_source_route_is_stripped(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM:<@relay.test,@other.test:a@b.test>\r\n") == ["250 2.1.0"]


def test_tolerated_space_and_missing_brackets(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM: <a@b.test>\r\nRCPT TO:alice@example.org\r\n") == \
        ["250 2.1.0", "250 2.1.5"]


# -- parameters kept in the envelope ------------------------------------------------

def test_dsn_and_body_parameters_are_stored(tmp_path):
    s = greeted(tmp_path)
    s.send("MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME SIZE=100\r\n")
    s.send("RCPT TO:<alice@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;alice+2Bx@example.org\r\n")
    s.send("RCPT TO:<bob@example.org> NOTIFY=NEVER\r\nDATA\r\n")
    s.send("8bit \xe9\r\n.\r\n".encode("latin-1"))
    envelope = s.queued[0]
    assert (envelope.ret, envelope.envid, envelope.body) == ("HDRS", "QQ+1", "8BITMIME")
    alice, bob = envelope.recipients
    assert alice.notify == ("SUCCESS", "DELAY")
    assert alice.orcpt == "rfc822;alice+x@example.org"
    assert bob.notify == ("NEVER",)
    reloaded = s.spool.load(envelope.queue_id)
    assert reloaded.recipients[0].notify == ("SUCCESS", "DELAY")
    assert reloaded.envid == "QQ+1"


def test_smtputf8(tmp_path):
    s = greeted(tmp_path)
    assert s.codes("MAIL FROM:<jörg@b.test>\r\n".encode()) == ["553 5.6.7"]
    assert s.codes("MAIL FROM:<jörg@bücher.test> SMTPUTF8\r\n".encode()) == ["250 2.1.0"]
    assert s.codes("RCPT TO:<alice@example.org>\r\nDATA\r\n") == ["250 2.1.5", "354"]
    s.send("Subject: \xfcber\r\n\r\n.\r\n".encode())
    envelope = s.queued[0]
    assert envelope.smtputf8 and envelope.reverse_path == "jörg@bücher.test"
    assert b"with UTF8SMTP id" in s.queued_data()


def test_invalid_utf8_and_nul_in_command(tmp_path):
    s = greeted(tmp_path)
    assert s.codes(b"NOOP \xff\xfe\r\n") == ["500 5.5.2"]
    assert s.codes(b"NO\x00OP\r\n") == ["500 5.5.2"]


# -- relay control -------------------------------------------------------------------

def test_relay_refused_for_untrusted_client(tmp_path):
    s = Server(tmp_path, client="198.51.100.7")
    s.take()
    s.send(EHLO + MAIL)
    assert s.codes("RCPT TO:<someone@elsewhere.test>\r\n") == ["554 5.7.1"]
    assert s.codes(RCPT) == ["250 2.1.5"]


def test_relay_allowed_for_mynetworks(tmp_path):
    s = greeted(tmp_path)
    s.send(MAIL)
    assert s.codes("RCPT TO:<someone@elsewhere.test>\r\n") == ["250 2.1.5"]


def test_unknown_local_user_is_550(tmp_path):
    s = greeted(tmp_path)
    s.send(MAIL)
    assert s.codes("RCPT TO:<carol@example.org>\r\n") == ["550 5.1.1"]


def test_received_header_stays_ascii_for_a_7bit_message(tmp_path):
    s = Server(tmp_path)
    s.take()
    s.send("EHLO bücher.test\r\n".encode())
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\n")
    header = s.queued_data().split(b"\r\n\r\n")[0]
    assert header.isascii() and b"from b?cher.test (" in header
