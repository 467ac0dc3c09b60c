"""`mta sendmail` as cron and scripts call it: sendmail(1) options, bare user names."""

from __future__ import annotations

import io
import json

from mta import cli
from mta.spool.store import Spool


def run(tmp_path, monkeypatch, stdin: bytes, *args: str) -> int:
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nhostname = "host.test"\nspool = "{tmp_path / "spool"}"\n')
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
    assert envelope["recipients"][0]["address"] == "root@host.test"
    assert b"\r\nFrom: CronDaemon <" in data and data.endswith(b"\r\n\r\noutput\r\n")


def test_comma_separated_recipients_and_quoted_name(tmp_path, monkeypatch):
    assert run(tmp_path, monkeypatch, b"Subject: x\n\ny\n",
               "-f", "me", "-F", 'Jo "x" Smith', "a@b.test, c@d.test") == 0
    (envelope, data), = queued(tmp_path)
    assert envelope["reverse_path"] == "me@host.test"
    assert [r["address"] for r in envelope["recipients"]] == ["a@b.test", "c@d.test"]
    assert b'From: "Jo \\"x\\" Smith" <me@host.test>\r\n' in data
