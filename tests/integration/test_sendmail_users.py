"""`sendmail` for any local user while the server runs as a user of its own.

The server is started as root with ``twistd --uid nobody --gid nogroup``;
an ordinary user (made with useradd) pipes a message into `sendmail`,
called through a symlink named sendmail and through the console script,
from a directory with ``etc/mta.toml`` and no $MTA_CONFIG.  The message
reaches the server over its local socket, so the spool file is the
server's own, and it is delivered.  Needs root (CI runs the suite as
root); elsewhere it skips.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.integration import harness
from tests.integration.harness import MtaServer, need, need_root, source_env, wait_for

USER = "mta-sendmail-test"
NOBODY = pwd.getpwnam("nobody")

CONFIG = """
[server]
hostname = "mx.test"
spool = "spool"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[relay]
nameservers = ["127.0.0.1:9"]
dns_timeout = "1s"

[domains."local.test"]
route = "maildir:mail"
"""


@pytest.fixture
def ordinary_user():
    need_root("this test switches users")
    made = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run([need("useradd"), "--system", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", USER], check=True)
        made = True
    yield pwd.getpwnam(USER)
    if made:
        subprocess.run([need("userdel"), USER], check=False)


def reachable_by_all(path: Path) -> bool:
    """Whether users other than root can get to `path` (o+x on every directory above)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in Path(path).resolve().parents)


def scripts_for_everyone(directory: Path) -> Path:
    """A bin/ with mta, sendmail and twistd that any user can run.

    The test venv's interpreter may live where only root can go (pyenv under
    /root): then a venv of the system's Python of the same version gets this
    venv's packages through a .pth file, and the scripts pip made are copied
    with its interpreter in their #! line, as pip itself would write them.
    """
    bin_dir = Path(sys.executable).parent
    if reachable_by_all(Path(sys.executable)):
        return bin_dir
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists() or not reachable_by_all(system):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {version} that other users can run")
        pytest.skip(f"no {version} that other users can run")
    venv = directory / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / version / "site-packages"
    (site / "mta-tests.pth").write_text(f"{harness.REPO}\n{sysconfig.get_paths()['purelib']}\n")
    for name in ("mta", "sendmail", "twistd"):
        text = (bin_dir / name).read_text().split("\n", 1)[1]
        (venv / "bin" / name).write_text(f"#!{venv / 'bin' / 'python3'}\n{text}")
        (venv / "bin" / name).chmod(0o755)
    return venv / "bin"


@pytest.fixture
def server_as_nobody(monkeypatch):
    # pytest's tmp_path is 0700 root: nobody and the user could not get in.
    directory = Path(tempfile.mkdtemp(prefix="mta-sendmail-"))
    directory.chmod(0o755)
    bin_dir = scripts_for_everyone(directory)
    monkeypatch.setattr(harness, "TWISTD", bin_dir / "twistd")
    server = MtaServer(directory / "server", CONFIG)
    server.bin = bin_dir
    server.directory.chmod(0o755)
    (server.directory / "etc").mkdir(mode=0o755)
    (server.directory / "etc" / "mta.toml").write_text(server.config_path.read_text())
    server.start(("--uid", str(NOBODY.pw_uid), "--gid", str(NOBODY.pw_gid)))
    yield server
    server.stop()
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def as_user(user, argv: list[str], stdin: bytes, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in source_env().items() if k != "MTA_CONFIG"}
    env.update(HOME="/", USER=user.pw_name, LOGNAME=user.pw_name)
    return subprocess.run(argv, input=stdin, cwd=cwd, env=env, capture_output=True,
                          user=user.pw_uid, group=user.pw_gid, extra_groups=[], timeout=60,
                          check=False)


def delivered(server: MtaServer, user: str) -> list[Path]:
    new = server.directory / "mail" / user / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_an_ordinary_user_sends_through_the_sendmail_name(ordinary_user, server_as_nobody):
    server = server_as_nobody
    link = server.directory / "sendmail"
    link.symlink_to(server.bin / "mta")  # /usr/sbin/sendmail -> mta, as README's install does
    message = b"To: bob@local.test\nSubject: from a user\n\nhello from a plain user\n"
    done = as_user(ordinary_user, [str(link), "-t", "-i"], message, server.directory)
    assert done.returncode == 0, done.stderr.decode()
    uid = ordinary_user.pw_uid
    wait_for("the local submission in the log", lambda:
             f"client=local uid={uid} ({USER}), from=<{USER}@mx.test>" in server.log_text())
    (path,) = wait_for("delivery to bob", lambda: delivered(server, "bob"))
    assert path.stat().st_uid == NOBODY.pw_uid  # written by the server, as its own user
    text = path.read_bytes()
    assert f"Received: by mx.test (mta, from userid {uid} {USER})".encode() in text
    assert f"\nFrom: <{USER}@mx.test>\n".encode() in text  # completed, RFC 6409 8
    assert b"\nDate: " in text and b"\nMessage-ID: <" in text
    assert text.endswith(b"\n\nhello from a plain user\n")


def test_root_and_the_console_script_too_and_the_spool_stays_the_servers(
        ordinary_user, server_as_nobody):
    server = server_as_nobody
    console = server.bin / "sendmail"
    done = as_user(ordinary_user, [str(console), "-v", "-F", "Plain User", "carol@local.test"],
                   b"Subject: cron-ish\n\nbody\n", server.directory)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"queued as ")
    # root, with its own umask and files, hands over the same way.
    root = subprocess.run([str(harness.MTA), "sendmail", "-f", "root", "carol@local.test"],
                          input=b"Subject: from root\n\nx\n", cwd=server.directory,
                          env={k: v for k, v in source_env().items() if k != "MTA_CONFIG"},
                          capture_output=True, timeout=60, check=False)
    assert root.returncode == 0, root.stderr.decode()
    messages = wait_for("both for carol", lambda: len(delivered(server, "carol")) == 2
                        and delivered(server, "carol"))
    texts = [p.read_bytes() for p in messages]
    assert any(b"\nFrom: Plain User <mta-sendmail-test@mx.test>\n" in t for t in texts)
    assert any(b"(mta, from userid 0 root)" in t for t in texts)
    for directory, _, files in os.walk(server.directory / "spool"):
        for name in files:
            assert os.stat(os.path.join(directory, name)).st_uid == NOBODY.pw_uid, name
    assert "Permission denied" not in server.log_text()


def test_mailq_for_an_ordinary_user_says_who_may(ordinary_user, server_as_nobody):
    server = server_as_nobody
    link = server.directory / "mailq"
    link.symlink_to(server.bin / "mta")
    done = as_user(ordinary_user, [str(link)], b"", server.directory)
    assert done.returncode == 77  # EX_NOPERM
    assert b"belongs to the mail server's user" in done.stderr
    root = subprocess.run([str(harness.MTA), "sendmail", "-bp"], cwd=server.directory,
                          env={k: v for k, v in source_env().items() if k != "MTA_CONFIG"},
                          capture_output=True, timeout=60, check=False)
    assert root.returncode == 0 and b"-- 0 message(s)" in root.stdout


def test_without_a_running_server_the_user_hears_so(ordinary_user, server_as_nobody):
    server = server_as_nobody
    server.stop()
    done = as_user(ordinary_user, [str(server.bin / "sendmail"), "bob@local.test"],
                   b"Subject: x\n\ny\n", server.directory)
    assert done.returncode == 75  # EX_TEMPFAIL: the caller keeps or reports the message
    assert b"no mta server answers on" in done.stderr


def test_a_second_server_on_the_same_spool_refuses_to_start(start_mta) -> None:
    first = start_mta(CONFIG)
    second = first.directory / "second.toml"  # the same spool, another port
    second.write_text(CONFIG.format(port=harness.free_port()))
    done = subprocess.run([str(harness.TWISTD), "-n", "--pidfile=", "mta", "--config",
                           str(second)], cwd=first.directory, capture_output=True,
                          env=source_env(), timeout=60, check=False)
    assert done.returncode == 1
    assert b"cannot listen on the sendmail socket spool/public/sendmail.sock: another server " \
           b"answers on it" in done.stdout + done.stderr
    # The first one's socket is untouched: local submission still reaches it.
    sent = subprocess.run([str(harness.MTA), "sendmail", "--config", str(first.config_path),
                           "bob@local.test"], input=b"Subject: x\n\ny\n", cwd=first.directory,
                          env=source_env(), capture_output=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr


def test_a_socket_directory_that_cannot_be_made_stops_start_up(tmp_path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nspool = "{tmp_path / "spool"}"\n'
                      'sendmail_socket = "/proc/mta/sendmail.sock"\n'
                      f'[[listeners]]\nendpoint = "tcp:{harness.free_port()}:interface=127.0.0.1"\n')
    done = subprocess.run([str(harness.TWISTD), "-n", "--pidfile=", "mta", "--config",
                           str(config)], cwd=tmp_path, capture_output=True, env=source_env(),
                          timeout=60, check=False)
    assert done.returncode == 1
    assert b"mta: [server] sendmail_socket: cannot make /proc/mta" in done.stdout + done.stderr
