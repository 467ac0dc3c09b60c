"""`sendmail` as cron, scripts and mail programs call it: options, names, the message."""

from __future__ import annotations

import io

import pytest

from mta import cli, sendmail
from mta.address import AddressError
from mta.sendmail import UsageError, parse, prepare


def test_cron_style_call_is_parsed_and_ignored_options_do_nothing():
    options = parse(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "-bm", "root"])
    assert options.full_name == "CronDaemon" and options.ignore_dots
    assert options.mode == "deliver" and options.recipients == ["root"]


@pytest.mark.parametrize("argv, field, value", [
    (["-t", "-i"], "from_headers", True),
    (["-ti"], "ignore_dots", True),
    (["-oi"], "ignore_dots", True),
    (["-f", "me@x.test"], "sender", "me@x.test"),
    (["-fme@x.test"], "sender", "me@x.test"),
    (["-r", "me@x.test"], "sender", "me@x.test"),
    (["-C", "/etc/other.toml"], "config", "/etc/other.toml"),
    (["--config=/etc/other.toml"], "config", "/etc/other.toml"),
    (["-bp"], "mode", "list"),
    (["-q"], "mode", "flush"),
    (["-qRexample.org"], "flush_domain", "example.org"),
    (["-bi"], "mode", "newaliases"),
    (["-N", "success,failure"], "notify", "SUCCESS,FAILURE"),
    (["-R", "hdrs"], "ret", "HDRS"),
    (["-V", "abc"], "envid", "abc"),
    (["--", "-odd@x.test"], "recipients", ["-odd@x.test"]),
])
def test_options(argv, field, value):
    assert getattr(parse(argv), field) == value


@pytest.mark.parametrize("name, mode", [("mailq", "list"), ("newaliases", "newaliases"),
                                        ("sendmail", "deliver")])
def test_the_name_decides_the_mode(name, mode):
    assert parse([], name).mode == mode


@pytest.mark.parametrize("argv", [["-bs"], ["-bd"], ["-q30m"], ["-Z"], ["-f"], ["-N", "maybe"]])
def test_what_we_cannot_do_is_a_usage_error(argv):
    with pytest.raises(UsageError):
        parse(argv)


def test_a_usage_error_exits_64(capsys):
    assert sendmail.main(["-bs"]) == sendmail.EX_USAGE
    assert "-bs is not supported" in capsys.readouterr().err


def test_recipients_from_headers_bcc_removed_bare_names_qualified():
    options = parse(["-t", "extra"])
    message = (b"To: Bob <bob@x.test>, carol@x.test\nCc: dave\nBcc: eve@y.test,\n"
               b" frank@y.test\nSubject: hi\n\nBcc: stays in the body\n")
    done = prepare(options, message, "host.test", "alice")
    assert done.sender == "alice@host.test"
    assert done.recipients == ["extra@host.test", "bob@x.test", "carol@x.test",
                               "dave@host.test", "eve@y.test", "frank@y.test"]
    assert b"frank" not in done.data.partition(b"\r\n\r\n")[0]
    assert done.data.endswith(b"\r\n\r\nBcc: stays in the body\r\n")


@pytest.mark.parametrize("sender, stored", [("<>", ""), ("", ""), ("<a@b.test>", "a@b.test"),
                                            ("me", "me@host.test")])
def test_f_takes_the_null_path_brackets_and_bare_names(sender, stored):
    assert prepare(parse(["-f", sender, "r@x.test"]), b"x\n", "host.test", "u").sender == stored


def test_full_name_makes_a_quoted_from_only_when_there_is_none():
    done = prepare(parse(["-f", "me", "-F", 'Jo "x" Smith', "a@b.test, c@d.test"]),
                   b"Subject: x\n\ny\n", "host.test", "u")
    assert done.recipients == ["a@b.test", "c@d.test"]
    assert done.data.startswith(b'From: "Jo \\"x\\" Smith" <me@host.test>\r\n')
    kept = prepare(parse(["-F", "Jo", "a@b.test"]), b"From: x@y.test\n\nb\n", "h.test", "u")
    assert kept.data == b"From: x@y.test\r\n\r\nb\r\n"


def test_no_recipients_and_bad_addresses():
    with pytest.raises(UsageError):
        prepare(parse(["-t"]), b"Subject: nobody\n\nx\n", "h.test", "u")
    with pytest.raises(AddressError):
        prepare(parse(["a b@x.test"]), b"x\n", "h.test", "u")


def test_a_lone_dot_ends_the_message_unless_i():
    text = b"Subject: x\n\nfirst\n.\nafter\n"
    assert sendmail.read_message(io.BytesIO(text), ignore_dots=False) == b"Subject: x\n\nfirst\n"
    assert sendmail.read_message(io.BytesIO(text), ignore_dots=True) == text


def test_no_running_server_is_a_clear_temporary_failure(tmp_path, monkeypatch, capsys):
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nhostname = "host.test"\nspool = "{tmp_path / "spool"}"\n'
                      '[tls]\ncertificate = "/nonexistent/cert.pem"\n')
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Subject: x\n\ny\n")))
    # The certificate an ordinary user may not see does not matter to sendmail.
    assert cli.main(["--config", str(config), "sendmail", "root"]) == sendmail.EX_TEMPFAIL
    err = capsys.readouterr().err
    assert "no mta server answers on" in err and "the message was not sent" in err
    assert not (tmp_path / "spool" / "queue").exists() or \
        not list((tmp_path / "spool" / "queue").iterdir())


def test_a_disabled_socket_says_so(tmp_path, monkeypatch, capsys):
    config = tmp_path / "mta.toml"
    config.write_text('[server]\nsendmail_socket = "off"\n')
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x\n")))
    assert sendmail.main(["-C", str(config), "root"]) == sendmail.EX_UNAVAILABLE
    assert "sendmail_socket is off" in capsys.readouterr().err


def test_called_by_the_name_sendmail(monkeypatch):
    seen = []
    monkeypatch.setattr(sendmail, "main", lambda argv, name, *rest: seen.append((argv, name)) or 0)
    monkeypatch.setattr("sys.argv", ["/usr/sbin/sendmail", "-t", "-i"])
    assert cli.main() == 0
    monkeypatch.setattr("sys.argv", ["/usr/bin/mailq"])
    assert cli.main() == 0
    assert seen == [(["-t", "-i"], "sendmail"), ([], "mailq")]
