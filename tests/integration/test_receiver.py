"""``[server] receiver_process``: SMTP sessions in a second process, the queue in the main one.

Each test waits for a positive sign (a log line, a file, a reply) before it
looks at anything else.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.integration.harness import (
    DEFAULT_CONFIG,
    MTA,
    MtaServer,
    WireTap,
    free_port,
    greets,
    need,
    need_root,
    source_env,
    twistd_as_nobody,
    wait_for,
)
from tests.integration.test_receive import kill_while_sending

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"
postmaster = "postmaster@example.org"
receiver_process = true

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "smtp"

[relay]
mynetworks = ["127.0.0.1/32"]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"
retry_min = "1h"
retry_max = "1h"

[etrn]
clients = ["127.0.0.1/32"]

[domains."example.org"]
route = "maildir:mail/example.org"
users = ["alice"]

[domains."held.test"]
route = "hold"
etrn_route = "smtp:[127.0.0.1]:9"

[metrics]
endpoint = "tcp:METRICS:interface=127.0.0.1"

[log]
json_file = "mta.json"
"""

SERVES = re.compile(r"the receiving process \(pid (\d+)\) serves smtp\[")


def start(start_mta) -> MtaServer:
    server = start_mta(CONFIG.replace("METRICS", str(free_port())))
    wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
    return server


def child_pid(server: MtaServer, nth: int = 0) -> int:
    return int(SERVES.findall(server.log_text())[nth])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def spare_files(pid: int) -> list[str]:
    """The unnamed files in the spool's tmp/ that process `pid` holds open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if "/spool/tmp/#" in target and target.endswith("(deleted)"):
            found.append(target)
    return found


def blanks(server: MtaServer, pid: int) -> list[str]:
    """The blanks process `pid` made: empty message files in queue/ named after queue
    ids that carry its process id."""
    found = []
    for path in (server.directory / "spool" / "queue").glob("*.msg"):
        try:
            if path.name[13:19] == f"{pid & 0xFFFFFF:06X}" and path.stat().st_size == 0:
                found.append(path.name[:-4])
        except FileNotFoundError:
            continue  # delivered and removed meanwhile
    return sorted(found)


def send(port: int, to: str, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        code, _ = client.rcpt(to)
        assert code == 250
        code, text = client.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def delivered(server: MtaServer) -> list[bytes]:
    new = server.directory / "mail/example.org/alice/new"
    return [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []


def metric(server: MtaServer, name: str) -> float:
    port = int(re.search(r'endpoint = "tcp:(\d+)', server.config_path.read_text()
                         .split("[metrics]")[1]).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_sessions_run_in_the_child_and_the_main_process_delivers(start_mta) -> None:
    server = start(start_mta)
    pid = child_pid(server)
    assert pid != server.pid and alive(pid)
    assert "mta.receiver" in Path(f"/proc/{pid}/cmdline").read_text()
    queue_id = send(server.port, "alice@example.org", "through the child")
    wait_for("the Maildir delivery", lambda: delivered(server))
    assert b"Subject: through the child" in delivered(server)[0]
    log = server.log_text()
    # The child's lines are in the one log, with the main process's delivery.
    assert f"{queue_id}: client=unknown[127.0.0.1]" in log
    assert re.search(rf"{queue_id}: to=<alice@example.org>, relay=maildir.*status=sent", log)
    assert "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1" in log
    # The JSON log (main process) has the child's events, with their fields.
    records = [json.loads(line) for line in
               (server.directory / "mta.json").read_text().splitlines()]
    received = [r for r in records if r.get("queue_id") == queue_id and r["event"] == "received"]
    assert received and received[0]["client"] == "127.0.0.1"
    assert received[0]["text"].startswith(f"{queue_id}: client=unknown[127.0.0.1]")
    # The metrics endpoint (main process) counts the child's sessions.
    wait_for("the session counted", lambda: metric(server, "mta_messages_received_total") >= 1)
    assert metric(server, "mta_connections_total") >= 1
    # The process that receives keeps files ready for the next messages; the main
    # process, which serves no listener here, keeps none.
    wait_for("the receiving process's spare files", lambda: len(spare_files(pid)) >= 1)
    assert spare_files(server.pid) == []
    # And blanks in queue/: the next message, alone, is committed into the oldest.
    wait_for("the receiving process's blanks", lambda: blanks(server, pid))
    ready = blanks(server, pid)
    assert send(server.port, "alice@example.org", "into a blank") == ready[0]
    wait_for("the second delivery", lambda: len(delivered(server)) == 2)
    assert any(b"Subject: into a blank" in m for m in delivered(server))
    assert blanks(server, server.pid) == []


def test_one_process_keeps_spare_files_for_what_it_receives(start_mta) -> None:
    server = start_mta(CONFIG.replace("receiver_process = true", "receiver_process = false")
                       .replace("METRICS", str(free_port())))
    send(server.port, "alice@example.org", "in one process")
    wait_for("the Maildir delivery", lambda: delivered(server))
    wait_for("the spare files", lambda: len(spare_files(server.pid)) >= 1)
    wait_for("the session ended", lambda: metric(server, "mta_sessions_total") >= 1)
    assert metric(server, "mta_connections_active") == 0


def test_etrn_is_answered_by_the_queue_and_turn_is_refused(start_mta) -> None:
    server = start(start_mta)
    send(server.port, "bob@held.test", "held")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        code, text = client.ehlo("client.test")
        assert b"ETRN" in text
        code, text = client.docmd("ETRN", "held.test")
        assert (code, text) == (253, b"2.0.0 OK, 1 pending messages for node held.test started")
        code, text = client.docmd("TURN")
        assert code == 502 and b"not available" in text
    wait_for("the ETRN in the log", lambda: "ETRN held.test from [127.0.0.1]: 1 messages "
                                            "started" in server.log_text())


def test_a_dead_child_is_replaced_and_what_it_left_is_delivered(start_mta) -> None:
    server = start(start_mta)
    first = child_pid(server)
    send(server.port, "alice@example.org", "before the death")
    wait_for("the first delivery", lambda: delivered(server))
    wait_for("the child's blanks", lambda: blanks(server, first))
    # A message the child committed without a word to the main process: what a
    # child killed between a commit and its report leaves in queue/.
    from mta.spool.envelope import Envelope, Recipient
    envelope = Envelope("", "sender@client.test", [Recipient("alice@example.org")],
                        arrival=time.time())
    server.spool.inject(envelope, b"Subject: left behind\r\n\r\nhello\r\n")
    os.kill(first, signal.SIGKILL)
    wait_for("the death in the log", lambda: f"(pid {first}) ended (signal 9)"
             in server.log_text())
    wait_for("the unreported message delivered", lambda: any(
        b"Subject: left behind" in m for m in delivered(server)))
    assert "found 1 queued message(s) the relayer did not know" in server.log_text()
    assert blanks(server, first) == []  # the dead child's blanks: removed when it was
    # Meanwhile, and after, clients are served: by the main process, then by a new child.
    assert greets(server.port, timeout=5)
    wait_for("a new receiving process", lambda: len(SERVES.findall(server.log_text())) == 2)
    second = child_pid(server, 1)
    assert second != first and alive(second)
    send(server.port, "alice@example.org", "after the restart")
    wait_for("the third delivery", lambda: len(delivered(server)) == 3)


def test_the_child_ends_with_the_main_process(start_mta) -> None:
    server = start(start_mta)
    pid = child_pid(server)
    server.kill()  # SIGKILL: no stopService, no goodbye
    wait_for("the child to end", lambda: not alive(pid))
    # The port is free at once: a new server starts on it.
    again = MtaServer(server.directory, server.config_path.read_text().replace("{", "{{")
                      .replace("}", "}}"), port=server.port)
    again.start()
    try:
        wait_for("its receiving process", lambda: len(SERVES.findall(again.log_text())) == 2)
    finally:
        again.stop()
    wait_for("the second child to end with SIGTERM", lambda: not alive(child_pid(again, 1)))


def test_the_childs_last_lines_reach_the_log_when_it_stops(start_mta) -> None:
    # The child gathers its frames for up to Channel.GATHER seconds; a stop right after
    # a message must still bring its lines (and its commit) to the main process.
    server = start(start_mta)
    queue_id = send(server.port, "alice@example.org", "just before the stop")
    server.stop()
    log = server.log_text()
    assert f"{queue_id}: client=unknown[127.0.0.1], from=<sender@client.test>" in log
    assert re.search(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=1 data=1 "
                     r"quit=1 commands=5", log)


def test_a_reload_reaches_the_child(start_mta) -> None:
    server = start(start_mta)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        assert b"mx.test" in s.recv(1000)
    server.config_path.write_text(server.config_path.read_text()
                                  .replace('hostname = "mx.test"', 'hostname = "mx2.test"'))
    os.kill(server.pid, signal.SIGHUP)
    wait_for("the reload", lambda: "reload #1" in server.log_text())

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            return s.recv(1000)
    wait_for("the child's greeting with the new name", lambda: b"mx2.test" in greeting())


def test_a_child_that_cannot_start_leaves_the_main_process_serving(start_mta) -> None:
    # The child reads the config file again when it starts; one it cannot use (here:
    # the listener changed behind the main process's back, which takes a restart) is
    # said in the log, and the main process serves the listener itself.
    server = start(start_mta)
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace(f"tcp:{server.port}:", f"tcp:{free_port()}:"))
    os.kill(child_pid(server), signal.SIGKILL)
    wait_for("the failure in the log", lambda: "the receiving process cannot start" in
             server.log_text())
    assert "has no listener smtp[tcp:" in server.log_text()
    send(server.port, "alice@example.org", "served by the main process")
    wait_for("the delivery", lambda: any(b"served by the main process" in m
                                         for m in delivered(server)))


# -- durability and privileges, as for the one-process server (test_receive.py) ----------

MAILDIR_CONFIG = DEFAULT_CONFIG.replace(
    'postmaster = "postmaster@example.org"',
    'postmaster = "postmaster@example.org"\nreceiver_process = true').replace(
    'route = "hold"', 'route = "maildir:mail/example.org"\nusers = ["alice"]')


def test_kill_9_of_the_main_process_under_load_loses_nothing_acknowledged(start_mta) -> None:
    server = start_mta(MAILDIR_CONFIG.replace('route = "maildir:mail/example.org"\n'
                                              'users = ["alice"]', 'route = "hold"'))
    wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
    pid = child_pid(server)
    acknowledged = kill_while_sending(server)  # SIGKILL to the main process
    assert acknowledged
    wait_for("the child to end", lambda: not alive(pid))
    server.start()
    for queue_id in acknowledged:
        assert server.envelope(queue_id)["recipients"][0]["address"] == "alice@example.org"
    assert list((server.directory / "spool" / "corrupt").iterdir()) == []


def test_kill_9_of_the_child_under_load_delivers_every_acknowledged_message(start_mta) -> None:
    server = start_mta(MAILDIR_CONFIG)
    wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
    pid = child_pid(server)
    tap = WireTap(server.port)
    source = subprocess.Popen(
        [need("smtp-source"), "-c", "-d", "-s", "5", "-m", "100000", "-l", "2048",
         "-f", "carol@client.test", "-t", "alice@example.org", f"127.0.0.1:{tap.port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("some messages accepted", lambda: len(tap.acknowledged()) >= 200, timeout=60)
        os.kill(pid, signal.SIGKILL)
        wait_for("the death noticed", lambda: f"(pid {pid}) ended" in server.log_text())
        source.wait(30)  # its sessions broke with the child
    finally:
        source.kill()
        source.wait()
        tap.close()
    acknowledged = tap.acknowledged()
    wait_for("every acknowledged message delivered", lambda: all(
        f"{queue_id}: to=<alice@example.org>, relay=maildir" in server.log_text()
        for queue_id in acknowledged), timeout=60)


def test_the_child_gives_up_root_like_twistd() -> None:
    need_root("this test starts as root and gives it up")
    with twistd_as_nobody(MAILDIR_CONFIG) as (work, port, nobody_uid):
        wait_for("the receiving process", lambda: SERVES.search((work / "log").read_text()))
        pid = int(SERVES.search((work / "log").read_text()).group(1))
        uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text()
                    .splitlines() if line.startswith("Uid:"))
        assert uids == [str(nobody_uid)] * 4
        send(port, "alice@example.org", "received as nobody")
        new = work / "mail/example.org/alice/new"
        wait_for("the delivery", lambda: new.is_dir() and any(new.iterdir()))


def test_starttls_auth_and_implicit_tls_in_the_child(start_mta, tmp_path: Path) -> None:
    import ssl

    from mta.server import auth
    from tests.testca import TestCA
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("mx", "mx.test")
    passwords = tmp_path / "passwords"
    passwords.write_text(f"alice:{auth.hash_password('secret')}\n")
    smtps = free_port()
    config = CONFIG.replace("METRICS", str(free_port())).replace(
        'role = "smtp"\n', f'role = "smtp"\ntls = "starttls"\n\n[[listeners]]\n'
        f'endpoint = "tcp:{smtps}:interface=127.0.0.1"\nrole = "smtps"\n', 1) + (
        f'\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n\n[auth]\npasswords = "{passwords}"\n')
    server = start_mta(config)
    wait_for("the receiving process", lambda: re.search(
        r"the receiving process \(pid \d+\) serves smtp\[.*, submission\[", server.log_text()))
    context = ssl.create_default_context(cafile=str(ca.directory / "ca.pem"))
    context.check_hostname = False  # 127.0.0.1; the chain is still checked against our CA
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert client.sendmail("s@client.test", ["alice@example.org"],
                               b"Subject: over STARTTLS\r\n\r\nhi\r\n") == {}
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=30, context=context) as client:
        client.login("alice", "secret")
        assert client.sendmail("alice@example.org", ["bob@far.test"],
                               b"Subject: over implicit TLS\r\n\r\nhi\r\n") == {}
    wait_for("the delivery", lambda: any(b"over STARTTLS" in m for m in delivered(server)))
    wait_for("the line of the message over implicit TLS", lambda: re.search(
        r"client=unknown\[127\.0\.0\.1\], tls=TLSv1\.3.*sasl_username=alice", server.log_text()))


def reload_with(server: MtaServer, old: str, new: str) -> None:
    """`old` replaced by `new` in the server's config file, then a reload (SIGHUP),
    waited for."""
    server.config_path.write_text(server.config_path.read_text().replace(old, new))
    os.kill(server.pid, signal.SIGHUP)
    wait_for("the reload", lambda: "reload #1" in server.log_text())


def test_turning_receiver_process_off_takes_a_restart(start_mta) -> None:
    server = start(start_mta)
    pid = child_pid(server)
    reload_with(server, "receiver_process = true", "receiver_process = false")
    assert "[server] receiver_process changed: that takes a restart" in server.log_text()
    assert alive(pid)
    send(server.port, "alice@example.org", "still through the child")
    wait_for("the delivery", lambda: delivered(server))
    assert f"(pid {pid}) ended" not in server.log_text()


def nice_values(pid: int) -> set[int]:
    """The nice value of each thread of process `pid` (Linux keeps one per thread)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            values.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except OSError:
            continue  # a thread that ended meanwhile
    return values


def test_the_main_process_yields_its_priority_to_the_sessions(start_mta) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the server inherits from us
    lowered = min(base + 10, 19)
    server = start(start_mta)
    assert f"the main process runs at nice {lowered} ([server] main_process_nice = 10)" in \
        server.log_text()
    send(server.port, "alice@example.org", "worker threads start")  # they inherit it
    wait_for("the delivery", lambda: delivered(server))
    assert len(list(Path(f"/proc/{server.pid}/task").iterdir())) > 1
    assert nice_values(server.pid) == {lowered}
    first = child_pid(server)
    assert nice_values(first) == {base}
    # A child started again inherits the lowered priority and goes back to its own:
    # as root always; otherwise where the main process could raise RLIMIT_NICE for it.
    os.kill(first, signal.SIGKILL)
    wait_for("a new receiving process", lambda: len(SERVES.findall(server.log_text())) == 2)
    second = child_pid(server, 1)
    wait_for("the new child's own priority, or why not", lambda: nice_values(second) == {base}
             or "runs at the main process's priority" in server.log_text())
    limit = next(int(line.split()[3]) for line in Path(f"/proc/{server.pid}/limits")
                 .read_text().splitlines() if line.startswith("Max nice priority"))
    if os.geteuid() == 0 or limit >= 20 - base:
        assert nice_values(second) == {base}
    else:
        assert nice_values(second) == {lowered}
    send(server.port, "alice@example.org", "after the restart")
    wait_for("the second delivery", lambda: len(delivered(server)) == 2)


def test_main_process_nice_0_leaves_the_priority_alone(start_mta) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    server = start_mta(CONFIG.replace("METRICS", str(free_port())).replace(
        "receiver_process = true", "receiver_process = true\nmain_process_nice = 0"))
    # The main process decides before it hands the listeners over.
    wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
    assert "the main process runs at nice" not in server.log_text()
    assert nice_values(server.pid) == {base}
    assert nice_values(child_pid(server)) == {base}


def test_changing_main_process_nice_takes_a_restart(start_mta) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    server = start(start_mta)
    reload_with(server, "receiver_process = true",
                "receiver_process = true\nmain_process_nice = 0")
    assert "[server] main_process_nice changed: that takes a restart" in server.log_text()
    assert nice_values(server.pid) == {min(base + 10, 19)}


AUTO_CONFIG = CONFIG.replace("receiver_process = true\n", "")  # the default: "auto"
PULLED_CONFIG = AUTO_CONFIG.replace('etrn_route = "smtp:[127.0.0.1]:9"\n',
                                    'etrn_route = "smtp:[127.0.0.1]:9"\npull_users = ["cust"]\n')


def test_auto_takes_a_receiving_process_with_two_cores_and_none_where_turn_may_pull(
        start_mta) -> None:
    from mta.config import cores
    two = cores() >= 2  # the server inherits this process's CPU affinity
    server = start_mta(AUTO_CONFIG.replace("METRICS", str(free_port())))
    said = wait_for("where the sessions run", lambda: re.search(
        r"sessions in (a receiving|the main) process \(receiver_process \"auto\": ([^)]*)\)",
        server.log_text()))
    assert (said[1] == "a receiving") is two, said[0]
    checked = subprocess.run([str(MTA), "check-config", "--config", str(server.config_path)],
                             cwd=server.directory, capture_output=True, env=source_env(),
                             timeout=60, check=True).stdout.decode()
    assert said[0].startswith(checked.rstrip().rsplit("; ", 1)[1]), checked
    if two:
        wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
        pid = child_pid(server)
        send(server.port, "alice@example.org", "through the child, by default")
        wait_for("the delivery", lambda: delivered(server))
        # A customer who may pull with TURN: "auto" would now mean one process; the
        # reload says so, and the running arrangement stays until a restart.
        server.config_path.write_text(server.config_path.read_text().replace(
            'etrn_route = "smtp:[127.0.0.1]:9"\n',
            'etrn_route = "smtp:[127.0.0.1]:9"\npull_users = ["cust"]\n'))
        os.kill(server.pid, signal.SIGHUP)
        wait_for("the reload", lambda: "reload #1" in server.log_text())
        assert ('[server] receiver_process = "auto", which now gives sessions in the main '
                'process (receiver_process "auto": a domain has pull_users, who may pull with '
                "TURN) changed: that takes a restart" in server.log_text())
        assert alive(pid)
    pulled = start_mta(PULLED_CONFIG.replace("METRICS", str(free_port())), name="pulled")
    wait_for("where the sessions run", lambda: "sessions in the main process" in pulled.log_text())
    assert ("sessions in the main process (receiver_process \"auto\": "
            + ("a domain has pull_users, who may pull with TURN)" if two else "one core)")
            in pulled.log_text())
    # TURN is served here, so it is not refused as a receiving process refuses it.
    with socket.create_connection(("127.0.0.1", pulled.port), timeout=10) as s:
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"220")
        s.sendall(b"EHLO held.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        s.sendall(b"TURN\r\n")
        turned = reader.readline()
    assert turned.startswith(b"502 5.7.0"), turned
    assert "receiving process (pid" not in pulled.log_text()


def test_a_second_sigterm_while_stopping_is_no_critical_error(start_mta) -> None:
    # systemd's stop or `kill -- -PGID` signals both processes, and the main process
    # signals its child again as it stops; an impatient operator signals twice.
    server = start(start_mta)
    os.kill(server.pid, signal.SIGTERM)
    time.sleep(0.02)
    try:
        os.kill(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    server.process.wait(30)
    wait_for("the end of the log", lambda: "Server Shut Down" in server.log_text())
    assert "Traceback" not in server.log_text()
    assert "#critical]" not in server.log_text()


def test_the_first_connections_wait_for_the_child_and_count_there(tmp_path: Path) -> None:
    # Served by the main process until the child served, the first connections were
    # counted apart from the child's: a client had its limit twice over at start.
    from tests.integration.harness import TWISTD
    from tests.integration.test_trust import connect, read_reply
    config = CONFIG.replace("METRICS", str(free_port())).replace(
        "[etrn]", "[limits]\nconnections_per_client = 2\n\n[etrn]")
    server = MtaServer(tmp_path / "mta", config)
    server.log = server.log_path.open("ab")
    server.process = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "mta", "--config", str(server.config_path)],
        cwd=server.directory, stdout=server.log, stderr=subprocess.STDOUT, env=source_env())
    sockets = []
    try:
        def bound() -> bool:
            try:
                sockets.append(connect(server.port, "127.0.0.10"))
            except OSError:
                return False
            return True

        wait_for("the listening socket", bound)  # taken by the kernel, served by nobody yet
        sockets.append(connect(server.port, "127.0.0.10"))
        wait_for("the receiving process", lambda: SERVES.search(server.log_text()))
        with connect(server.port, "127.0.0.10") as third:
            assert read_reply(third).startswith(b"421 4.7.0"), server.log_text()
        for sock in sockets:
            assert read_reply(sock).startswith(b"220 ")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
