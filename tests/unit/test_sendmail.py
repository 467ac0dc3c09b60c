"""`mta sendmail` as cron and scripts call it: sendmail(1) options, bare user names."""

from __future__ import annotations

import io
import json

from mta import cli
from mta.spool.store import Spool


def run(tmp_path, monkeypatch, stdin: bytes, *args: str, aliases: str = "root: alice@b.test\n"
        ) -> int:
    config = tmp_path / "mta.toml"
    (tmp_path / "aliases").write_text(aliases)
    config.write_text(f'[server]\nhostname = "host.test"\nspool = "{tmp_path / "spool"}"\n'
                      f'aliases = "{tmp_path / "aliases"}"\n')
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return cli.main(["sendmail", "--config", str(config), *args])


def queued(tmp_path) -> list[tuple[dict, bytes]]:
    spool = Spool(tmp_path / "spool")
    return [(json.loads(spool.load(q).to_json()), spool.message_data(q).read_bytes())
            for q in spool.queue_ids()]


def test_cron_style_call(tmp_path, monkeypatch):
    assert run(tmp_path, monkeypatch, b"Subject: cron\n\noutput\n",
               "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root") == 0
    (envelope, data), = queued(tmp_path)
    # root@host.test is aliased to a person: expanded once, here, the original kept as ORCPT.
    (recipient,) = envelope["recipients"]
    assert (recipient["address"], recipient["orcpt"]) == ("alice@b.test", "rfc822;root@host.test")
    assert b"\r\nFrom: CronDaemon <" in data and data.endswith(b"\r\n\r\noutput\r\n")


def test_unknown_local_recipient_is_refused(tmp_path, monkeypatch, capsys):
    # Our hostname has no mailboxes: a name there that is no alias goes nowhere.
    assert run(tmp_path, monkeypatch, b"Subject: x\n\ny\n", "nobody", aliases="x: y@b.test\n") == 1
    assert "no such local address: nobody@host.test" in capsys.readouterr().err
    assert queued(tmp_path) == []


def test_comma_separated_recipients_and_quoted_name(tmp_path, monkeypatch):
    assert run(tmp_path, monkeypatch, b"Subject: x\n\ny\n",
               "-f", "me", "-F", 'Jo "x" Smith', "a@b.test, c@d.test") == 0
    (envelope, data), = queued(tmp_path)
    assert envelope["reverse_path"] == "me@host.test"
    assert [r["address"] for r in envelope["recipients"]] == ["a@b.test", "c@d.test"]
    assert b'From: "Jo \\"x\\" Smith" <me@host.test>\r\n' in data
