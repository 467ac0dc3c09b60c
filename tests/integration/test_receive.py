"""The server end to end: `twistd -n mta` on loopback, fed by independent clients.

swaks (plain and pipelined), Python's smtplib, curl's SMTP client and
Postfix's smtp-source send mail; the spool is then read directly.  A
recording proxy (WireTap) shows what a client really sent, so each stored
message is compared byte for byte with it (plus our Received header), and
which messages got their 250 before a `kill -9`.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.harness import (
    DEFAULT_CONFIG,
    MTA,
    MtaServer,
    WireTap,
    free_port,
    greets,
    need,
    source_env,
    stop_process,
    strip_received,
    wait_for,
)

MESSAGE = (b"From: Carol <carol@client.test>\r\nTo: alice@example.org\r\n"
           b"Subject: integration\r\n\r\nfirst line\r\n.leading dot\r\n\r\nlast line\r\n")


def only_message(server: MtaServer) -> tuple[str, bytes]:
    queued = server.queued()
    assert len(queued) == 1, queued.keys()
    return next(iter(queued.items()))


def envelope(server: MtaServer, queue_id: str) -> dict:
    return server.envelope(queue_id)


def test_swaks_plain(mta: MtaServer, tmp_path) -> None:
    swaks = need("swaks")
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    tap = WireTap(mta.port)
    done = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{tap.port}", "--from", "carol@client.test",
         "--to", "alice@example.org", "--data", str(tmp_path / "msg.eml"), "--helo", "client.test"],
        capture_output=True, timeout=60, check=False)
    tap.close()
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    queue_id, stored = only_message(mta)
    assert f"queued as {queue_id}".encode() in done.stdout
    # Byte for byte what swaks sent (it ends the file's last line with one more CRLF).
    assert tap.sent_messages() == [strip_received(stored)]
    assert strip_received(stored).startswith(MESSAGE)
    assert stored.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (mta) "
                             b"with ESMTP id " + queue_id.encode())
    env = envelope(mta, queue_id)
    assert env["reverse_path"] == "carol@client.test"
    assert [r["address"] for r in env["recipients"]] == ["alice@example.org"]


def test_swaks_pipelined_many_recipients(mta: MtaServer) -> None:
    swaks = need("swaks")
    done = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{mta.port}", "--pipeline", "--from", "carol@client.test",
         "--to", "a@example.org,b@example.org,c@example.org", "--body", "pipelined body"],
        capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"PIPELINING" in done.stdout
    queue_id, stored = only_message(mta)
    assert b"pipelined body" in stored
    assert [r["address"] for r in envelope(mta, queue_id)["recipients"]] == \
        ["a@example.org", "b@example.org", "c@example.org"]


def test_swaks_sees_refusals(mta: MtaServer) -> None:
    swaks = need("swaks")
    # A non-trusted source address may not relay: swaks reports the 554 and exits non-zero.
    done = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{mta.port}", "--local-interface", "127.0.0.9",
         "--from", "x@client.test", "--to", "someone@elsewhere.test"],
        capture_output=True, timeout=60, check=False)
    assert done.returncode != 0
    assert b"554 5.7.1" in done.stdout
    assert mta.queued() == {}


def test_smtplib_recipients_8bit_and_smtputf8(mta: MtaServer) -> None:
    body = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu, 8-bit \u00fc\r\n".encode()
    with smtplib.SMTP("127.0.0.1", mta.port, local_hostname="client.test") as client:
        refused = client.sendmail("carol@client.test",
                                  ["a@example.org", "b@example.org", "c@example.org"], body,
                                  mail_options=["BODY=8BITMIME"])
        assert refused == {}
        refused = client.sendmail("j\u00f6rg@client.test", ["\u00fcser@example.org"], body,
                                  mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    queued = mta.queued()
    assert len(queued) == 2
    first, second = sorted(queued)
    assert strip_received(queued[first]) == body
    assert strip_received(queued[second]) == body
    env = envelope(mta, second)
    assert env["smtputf8"] is True and env["body"] == "8BITMIME"
    assert env["reverse_path"] == "j\u00f6rg@client.test"
    assert env["recipients"][0]["address"] == "\u00fcser@example.org"
    assert len(envelope(mta, first)["recipients"]) == 3


def test_smtplib_refusals_keep_session(mta: MtaServer) -> None:
    with smtplib.SMTP("127.0.0.1", mta.port) as client:
        client.ehlo()
        assert client.docmd("RCPT TO:<a@example.org>")[0] == 503
        assert client.docmd("MAIL FROM:<bad address>")[0] == 501
        assert client.docmd("FROB")[0] == 500
        assert client.noop()[0] == 250
        assert client.sendmail("c@client.test", ["a@example.org"], MESSAGE) == {}
    assert len(mta.queued()) == 1


def test_half_close_after_the_final_dot_still_gets_its_250(mta: MtaServer) -> None:
    """A client that shuts down its side right after the dot (`nc -N` does) must hear
    the 250, or it would send the message again: a duplicate."""
    with socket.create_connection(("127.0.0.1", mta.port), timeout=30) as s:
        s.sendall(b"EHLO client.test\r\nMAIL FROM:<c@client.test>\r\n"
                  b"RCPT TO:<a@example.org>\r\nDATA\r\n")
        got = b""
        while b"354" not in got:
            got += s.recv(4096)
        s.sendall(MESSAGE + b".\r\n")
        s.shutdown(socket.SHUT_WR)
        while True:
            data = s.recv(4096)
            if not data:
                break  # closed by the server once it had answered
            got += data
    queue_id, _ = only_message(mta)
    assert f"250 2.0.0 OK queued as {queue_id}".encode() in got, got


def test_curl(mta: MtaServer, tmp_path) -> None:
    curl = need("curl")
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    done = subprocess.run(
        [curl, "-sS", f"smtp://127.0.0.1:{mta.port}/client.test", "--mail-from", "carol@client.test",
         "--mail-rcpt", "alice@example.org", "--mail-rcpt", "bob@example.org",
         "--upload-file", str(tmp_path / "msg.eml")],
        capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    queue_id, stored = only_message(mta)
    assert strip_received(stored) == MESSAGE
    assert b"from client.test" in stored.split(b"\r\n")[0]
    assert len(envelope(mta, queue_id)["recipients"]) == 2


def test_smtp_source_1000_messages_over_10_sessions(mta: MtaServer) -> None:
    smtp_source = need("smtp-source")
    tap = WireTap(mta.port)
    try:
        done = subprocess.run(
            [smtp_source, "-c", "-d", "-s", "10", "-m", "1000", "-l", "4096",
             "-f", "carol@client.test", "-t", "alice@example.org", f"127.0.0.1:{tap.port}"],
            capture_output=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr.decode()
        wait_for("all replies recorded", lambda: len(tap.acknowledged()) == 1000, timeout=30)
        sent = tap.sent_messages()
        acknowledged = tap.acknowledged()
    finally:
        tap.close()
    assert len(tap.sessions) == 10
    assert len(sent) == 1000
    queued = mta.queued()
    assert sorted(acknowledged) == sorted(queued)
    stored = sorted(strip_received(data) for data in queued.values())
    assert stored == sorted(sent)


def kill_while_sending(server: MtaServer, at_least: int = 200) -> list[str]:
    """Send with smtp-source through a WireTap, kill -9 the server after `at_least`
    250s; return the queue ids whose 250 reached the client."""
    smtp_source = need("smtp-source")
    tap = WireTap(server.port)
    source = subprocess.Popen(
        [smtp_source, "-c", "-d", "-s", "5", "-m", "100000", "-l", "2048",
         "-f", "carol@client.test", "-t", "alice@example.org", f"127.0.0.1:{tap.port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("some messages accepted", lambda: len(tap.acknowledged()) >= at_least,
                 timeout=60)
        server.kill()
        source.wait(30)
    finally:
        if source.poll() is None:
            source.kill()
            source.wait()
        tap.close()
    return tap.acknowledged()


def test_kill_9_while_sending_loses_nothing_acknowledged(start_mta) -> None:
    server = start_mta()
    acknowledged = kill_while_sending(server)
    assert acknowledged
    server.start()  # recovery runs before the listener accepts
    for queue_id in acknowledged:
        env = server.envelope(queue_id)
        assert env["queue_id"] == queue_id
        assert env["recipients"][0]["address"] == "alice@example.org"
        assert server.spool.message_data(queue_id).read_bytes().startswith(b"Received: ")
    assert list((server.directory / "spool" / "tmp").iterdir()) == []
    assert list((server.directory / "spool" / "corrupt").iterdir()) == []
    # Every committed message is whole: an envelope, and data that ends as smtp-source's do.
    for queue_id, data in server.queued().items():
        assert data.endswith(b"\r\n")
    # And the restarted server takes mail again.
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        assert client.sendmail("c@client.test", ["a@example.org"], MESSAGE) == {}


def test_kill_9_while_relaying_then_restart_delivers_every_acknowledged_message(
        start_mta) -> None:
    # smtp-sink writes its dumps as nobody: outside pytest's private tmp tree.
    sink_dir = Path(tempfile.mkdtemp(prefix="mta-sink-"))
    sink_dir.chmod(0o777)
    sink_port = free_port()
    sink = subprocess.Popen([need("smtp-sink"), "-u", "nobody", "-d", f"{sink_dir}/%M.",
                             "-c", f"127.0.0.1:{sink_port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = DEFAULT_CONFIG.replace(
            'route = "hold"', f'route = "smtp:[127.0.0.1]:{sink_port}"').replace(
            'retry_min = "1h"', 'retry_min = "1s"')
        server = start_mta(config)
        acknowledged = kill_while_sending(server)
        # What each acknowledged message is, by its Message-Id, read from the spool
        # (or, for those already delivered and removed, known to be in the sink).
        spool_ids = {qid: re.search(rb"Message-Id: (<[^>]+>)", data).group(1)
                     for qid, data in server.queued().items()}
        server.start()
        wait_for("the queue to drain", lambda: not server.spool.queue_ids(), timeout=120)
    finally:
        stop_process(sink)
    delivered = b"".join(p.read_bytes() for p in sink_dir.iterdir())
    shutil.rmtree(sink_dir)
    for queue_id in acknowledged:
        if queue_id in spool_ids:
            assert spool_ids[queue_id] in delivered, queue_id
    assert delivered.count(b"\r\nMessage-Id: ") + delivered.count(b"\nMessage-Id: ") >= \
        len(acknowledged)
    assert "status=sent" in server.log_text()


def test_big_message_is_streamed_not_held_in_memory(start_mta) -> None:
    server = start_mta(message_size="300MB")

    def rss_kb() -> int:
        with open(f"/proc/{server.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    line = b"x" * 98 + b"\r\n"
    size = 200 * 1000 * 1000
    before = rss_kb()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.test\r\nMAIL FROM:<c@client.test> SIZE=%d\r\n"
                  b"RCPT TO:<a@example.org>\r\nDATA\r\n" % size)
        while not f.readline().startswith(b"354"):
            pass
        block = line * 10000
        for _ in range(size // len(block)):
            s.sendall(block)
        s.sendall(b".\r\nQUIT\r\n")
        reply = f.readline()
    assert reply.startswith(b"250 2.0.0 OK queued as"), reply
    grown_mb = (rss_kb() - before) / 1024
    assert grown_mb < 16, f"server RSS grew by {grown_mb:.1f} MB for a 200 MB message"
    queue_id, = server.queued().keys()
    assert (server.directory / "spool" / "queue" / f"{queue_id}.msg").stat().st_size > size


def test_check_config_and_bad_config(tmp_path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nhostname = "mx.test"\n[limits]\nrecipients = 5\n')
    done = subprocess.run([str(MTA), "check-config", str(good)], capture_output=True, text=True,
                          env=source_env(), check=False)
    assert done.returncode == 0 and "OK" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nrecipients = "many"\n')
    done = subprocess.run([str(MTA), "check-config", str(bad)], capture_output=True, text=True,
                          env=source_env(), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"mta: {bad}: [limits] recipients: expected an integer, "
                                   "got 'many'")
    # The server refuses to start on it, with the same line.
    from tests.integration.harness import TWISTD
    started = subprocess.run([str(TWISTD), "-n", "--pidfile=", "mta", "--config", str(bad)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path,
                             env=source_env(), check=False)
    assert started.returncode != 0
    assert "[limits] recipients: expected an integer, got 'many'" in started.stderr + started.stdout


def test_installed_plugin_is_listed_by_twistd(tmp_path) -> None:
    # No PYTHONPATH, not in the source tree: what a user of the installed package sees.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    from tests.integration.harness import TWISTD
    done = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0
    assert any(line.split()[:1] == ["mta"] for line in done.stdout.splitlines()), done.stdout


def test_twistd_daemonises_with_pidfile_and_stops_on_kill(tmp_path) -> None:
    from tests.integration.harness import DEFAULT_CONFIG, TWISTD, free_port
    port = free_port()
    (tmp_path / "mta.toml").write_text(DEFAULT_CONFIG.format(port=port, message_size="1MB"))
    done = subprocess.run([str(TWISTD), "--pidfile", "mta.pid", "--logfile", "mta.log",
                           "mta", "--config", "mta.toml"], cwd=tmp_path, timeout=30,
                          env=source_env(), check=False)
    assert done.returncode == 0
    pid = int(wait_for("pid file", lambda: (tmp_path / "mta.pid").exists() and
                       (tmp_path / "mta.pid").read_text().strip()))
    try:
        wait_for("daemon listening", lambda: greets(port))
    finally:
        subprocess.run(["kill", str(pid)], check=False)
    wait_for("daemon gone", lambda: not (tmp_path / "mta.pid").exists())
    time.sleep(0.2)
    assert "Main loop terminated" in (tmp_path / "mta.log").read_text()


def test_port_in_use_is_one_line(mta: MtaServer) -> None:
    from tests.integration.harness import TWISTD
    second = subprocess.run([str(TWISTD), "-n", "--pidfile=", "mta", "--config",
                             str(mta.config_path)], capture_output=True, text=True, timeout=30,
                            cwd=mta.directory, env=source_env(), check=False)
    assert second.returncode == 1
    output = second.stdout + second.stderr
    assert "mta: cannot listen on smtp[tcp:" in output and "Address already in use" in output
    assert "Traceback" not in output
    # The running server and its spool were not touched.
    with smtplib.SMTP("127.0.0.1", mta.port) as client:
        assert client.noop()[0] == 250


def test_twistd_uid_gives_the_spool_to_that_user(tmp_path) -> None:
    from tests.integration.harness import DEFAULT_CONFIG, twistd_as_nobody
    with twistd_as_nobody(DEFAULT_CONFIG) as (work, port, nobody_uid):
        wait_for("mta running as nobody", lambda: greets(port))
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.sendmail("c@client.test", ["a@example.org"], MESSAGE) == {}
        queue = work / "spool" / "queue"
        # The message, and maybe blanks (empty files made ahead of need): nobody's too.
        assert len([p for p in queue.glob("*.msg") if p.stat().st_size]) == 1
        assert all(p.stat().st_uid == nobody_uid for p in queue.iterdir())
