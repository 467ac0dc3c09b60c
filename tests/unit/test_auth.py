"""The password file, the twisted.cred checker and the failure counter (mta.server.auth)."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mta.server import auth
from mta.server.ratelimit import WindowCounter


def synchronous(f, *args):
    """Stands in for deferToThread: runs scrypt at once so results are synchronous."""
    return defer.maybeDeferred(f, *args)


# -- entries ---------------------------------------------------------------------

def test_hash_password_round_trip():
    text = auth.hash_password("correct horse")
    entry = auth.parse_entry("alice:" + text)
    assert entry.user == "alice"
    assert (entry.scrypt.n, entry.scrypt.r, entry.scrypt.p) == (2**14, 8, 1)
    assert entry.cram_md5 is None
    assert str(entry) == "alice:" + text
    assert auth.verify_password(entry, b"correct horse")
    assert not auth.verify_password(entry, b"correct horsE")


def test_hash_password_salts_every_hash():
    assert auth.hash_password("same") != auth.hash_password("same")


def test_hash_password_with_cram_md5():
    text = auth.hash_password("pw", cram_md5=True)
    assert text.count(":") == 1
    entry = auth.parse_entry("bob:" + text)
    assert entry.cram_md5 is not None
    challenge = b"<1896.697170952@postoffice.example.net>"
    expected = hmac.new(b"pw", challenge, hashlib.md5).hexdigest()
    assert auth.verify_cram_md5(entry, challenge, expected)
    assert auth.verify_cram_md5(entry, challenge, expected.upper())
    assert not auth.verify_cram_md5(entry, challenge, "0" * 32)


@pytest.mark.parametrize("secret", [b"", b"x", b"tanstaaftanstaaf", b"k" * 64, b"k" * 65,
                                    "pässwörd".encode(), os.urandom(200)])
@pytest.mark.parametrize("challenge", [b"", b"<1.2@h>", b"c" * 55, b"c" * 56, b"c" * 64,
                                       b"c" * 119, b"c" * 300])
def test_cram_contexts_give_hmac_md5(secret, challenge):
    # Every padding boundary of the resumed MD5, and keys longer than a block.
    contexts = auth.cram_contexts(secret)
    assert auth.cram_md5_digest(contexts, challenge) == \
        hmac.new(secret, challenge, hashlib.md5).hexdigest()


def test_cram_contexts_use_dovecots_layout():
    # `doveadm pw -s CRAM-MD5` prints this for the password "password"
    # (a value quoted in public documentation): outer state, then inner.
    assert str(auth.cram_contexts(b"password")) == \
        "cram-md5$9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740"


def test_rfc2195_example():
    # RFC 2195 2: user tim, secret tanstaaftanstaaf.
    entry = auth.parse_entry("tim:" + auth.hash_password("tanstaaftanstaaf", cram_md5=True))
    assert auth.verify_cram_md5(entry, b"<1896.697170952@postoffice.reston.mci.net>",
                                "b913a602c7eda7a495b4e6e7334d3890")


GOOD_SCRYPT = auth.hash_password("x")


@pytest.mark.parametrize("line", [
    "alice",
    "alice:",
    "alice:plain$x",
    ":" + GOOD_SCRYPT,
    "al ice:" + GOOD_SCRYPT,
    "alice:" + GOOD_SCRYPT + ":cram-md5$abcd",
    "alice:" + GOOD_SCRYPT + ":md5$" + "0" * 64,
    "alice:" + GOOD_SCRYPT + ":cram-md5$" + "0" * 64 + ":extra",
    "alice:scrypt$16383$8$1$c2FsdA==$" + "A" * 44,  # N not a power of two
    "alice:scrypt$1048576$8$1$c2FsdA==$" + "A" * 44,  # 1 GiB per login
    "alice:scrypt$16384$0$1$c2FsdA==$" + "A" * 44,
    "alice:scrypt$16384$8$1$not*base64$" + "A" * 44,
    "alice:scrypt$16384$8$1$c2FsdA==$QUJD",  # hash too short
])
def test_parse_entry_rejects(line):
    with pytest.raises(auth.PasswordFileError):
        auth.parse_entry(line)


@pytest.mark.parametrize("user", ["", "a b", "a:b", "#a", "a\tb", "a\x00", "x" * 256])
def test_bad_user_names(user):
    with pytest.raises(auth.PasswordFileError):
        auth.check_user_name(user)


def test_user_names_may_be_addresses():
    assert auth.check_user_name("alice@example.org") == "alice@example.org"
    assert auth.check_user_name("jörg") == "jörg"


# -- writing the file ----------------------------------------------------------------

def test_set_password_creates_file_mode_0600(tmp_path):
    path = tmp_path / "passwords"
    auth.set_password(path, "alice", "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = auth.read_password_file(path)
    assert list(entries) == ["alice"]
    assert auth.verify_password(entries["alice"], b"s3cret")
    assert [p.name for p in tmp_path.iterdir()] == ["passwords"]  # no temporary left


def test_set_password_replaces_and_keeps_the_rest(tmp_path):
    path = tmp_path / "passwords"
    path.write_text("# users\n\nalice:" + GOOD_SCRYPT + "\nbob:" + GOOD_SCRYPT)
    path.chmod(0o644)
    auth.set_password(path, "alice", "new", cram_md5=True)
    auth.set_password(path, "carol", "c")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# users", ""]
    assert [line.split(":")[0] for line in lines[2:]] == ["alice", "bob", "carol"]
    assert lines[3] == "bob:" + GOOD_SCRYPT
    entries = auth.read_password_file(path)
    assert auth.verify_password(entries["alice"], b"new")
    assert entries["alice"].cram_md5 is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_set_password_refuses_empty_password_and_bad_user(tmp_path):
    with pytest.raises(auth.PasswordFileError):
        auth.set_password(tmp_path / "p", "alice", "")
    with pytest.raises(auth.PasswordFileError):
        auth.set_password(tmp_path / "p", "ali:ce", "x")
    assert not (tmp_path / "p").exists()


def test_read_password_file_skips_bad_lines(tmp_path):
    path = tmp_path / "passwords"
    path.write_text("garbage\nalice:" + GOOD_SCRYPT + "\n  # indented comment\n")
    assert list(auth.read_password_file(path)) == ["alice"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_passwd_main_reads_first_line_of_stdin(tmp_path):
    path = tmp_path / "passwords"
    stdin = io.StringIO("from a script\r\nignored\n")
    assert auth.passwd_main(path, "odmr", cram_md5=True, stdin=stdin, stderr=io.StringIO()) == 0
    entry = auth.read_password_file(path)["odmr"]
    assert auth.verify_password(entry, b"from a script")
    assert entry.cram_md5 is not None


def test_passwd_main_asks_twice_on_a_terminal(tmp_path):
    path = tmp_path / "passwords"
    answers = iter(["typed", "typed"])
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)

    assert auth.passwd_main(path, "alice", stdin=FakeTerminal(), ask=ask) == 0
    assert len(prompts) == 2 and "alice" in prompts[0]
    assert auth.verify_password(auth.read_password_file(path)["alice"], b"typed")


def test_passwd_main_mismatch_and_errors(tmp_path):
    path = tmp_path / "passwords"
    answers = iter(["one", "two"])
    err = io.StringIO()
    assert auth.passwd_main(path, "alice", stdin=FakeTerminal(),
                            ask=lambda _: next(answers), stderr=err) == 1
    assert "do not match" in err.getvalue()
    err = io.StringIO()
    assert auth.passwd_main(path, "alice", stdin=io.StringIO(""), stderr=err) == 1
    assert "empty password" in err.getvalue()
    assert not path.exists()


@implementer(IUsernameHashedPassword)
class SomeHashedPassword:
    """A hashed-password credential that is not CRAM-MD5 (APOP, say)."""

    username = b"alice"

    def checkPassword(self, password):
        return True


# -- the checker ------------------------------------------------------------------------

class CheckerTests(SynchronousTestCase):
    def mktemp(self):
        """A fresh path in a temporary directory (trial's would land in the working tree)."""
        directory = tempfile.mkdtemp(prefix="mta-test-auth-")
        self.addCleanup(shutil.rmtree, directory, True)
        return os.path.join(directory, "passwords")

    def setUp(self):
        self.path = Path(self.mktemp())
        auth.set_password(self.path, "alice", "wonderland")
        auth.set_password(self.path, "odmr", "pull-it", cram_md5=True)
        self.threaded = []

        def run_in_thread(f, *args):
            self.threaded.append(f)
            return synchronous(f, *args)

        self.checker = auth.PasswordFileChecker(self.path, run_in_thread)

    def check(self, credentials):
        return self.checker.requestAvatarId(credentials)

    def test_right_password(self):
        d = self.check(UsernamePassword(b"alice", b"wonderland"))
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertEqual(self.threaded, [auth.verify_password])

    def test_wrong_password(self):
        self.failureResultOf(self.check(UsernamePassword(b"alice", b"Wonderland")),
                             UnauthorizedLogin)

    def test_unknown_user_does_the_same_work(self):
        d = self.check(UsernamePassword(b"mallory", b"wonderland"))
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.threaded, [auth.verify_password])

    def test_undecodable_user(self):
        self.failureResultOf(self.check(UsernamePassword(b"\xff", b"x")), UnauthorizedLogin)

    def cram(self, user, password, challenge=b"<42.1700000000@mx.example.org>"):
        credentials = CramMD5Credentials()
        credentials.challenge = challenge
        credentials.username = user
        credentials.response = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
        return credentials

    def test_cram_md5(self):
        d = self.check(self.cram(b"odmr", b"pull-it"))
        self.assertEqual(self.successResultOf(d), "odmr")
        self.assertEqual(self.threaded, [])  # a few MD5 blocks: no thread needed

    def test_cram_md5_wrong_password(self):
        self.failureResultOf(self.check(self.cram(b"odmr", b"pull-It")), UnauthorizedLogin)

    def test_cram_md5_user_without_cram_entry(self):
        self.failureResultOf(self.check(self.cram(b"alice", b"wonderland")), UnauthorizedLogin)

    def test_cram_md5_unknown_user(self):
        self.failureResultOf(self.check(self.cram(b"nobody", b"pull-it")), UnauthorizedLogin)

    def test_other_hashed_credentials_unhandled(self):
        self.failureResultOf(self.check(SomeHashedPassword()),
                             UnhandledCredentials)

    def test_has_cram_md5(self):
        self.assertTrue(self.checker.has_cram_md5())
        only_plain = Path(self.mktemp())
        auth.set_password(only_plain, "alice", "x")
        self.assertFalse(auth.PasswordFileChecker(only_plain, synchronous).has_cram_md5())

    def test_reloads_when_the_file_changes(self):
        auth.set_password(self.path, "alice", "looking-glass")
        self.failureResultOf(self.check(UsernamePassword(b"alice", b"wonderland")),
                             UnauthorizedLogin)
        d = self.check(UsernamePassword(b"alice", b"looking-glass"))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_reload_picks_up_in_place_edits(self):
        with open(self.path, "a") as f:
            f.write("carol:" + auth.hash_password("c") + "\n")
        self.assertIn("carol", self.checker.users)

    def test_missing_file_means_no_users(self):
        self.path.unlink()
        self.assertEqual(self.checker.users, frozenset())
        self.failureResultOf(self.check(UsernamePassword(b"alice", b"wonderland")),
                             UnauthorizedLogin)
        auth.set_password(self.path, "alice", "back")
        self.assertEqual(self.checker.users, frozenset({"alice"}))

    def test_no_password_file_configured(self):
        checker = auth.PasswordFileChecker(None, synchronous)
        self.assertEqual(checker.users, frozenset())
        self.assertFalse(checker.has_cram_md5())
        self.failureResultOf(checker.requestAvatarId(UsernamePassword(b"a", b"b")),
                             UnauthorizedLogin)

    def test_portal_login_gives_the_user_name(self):
        portal = auth.make_portal(self.checker)
        d = auth.login(portal, UsernamePassword(b"alice", b"wonderland"))
        self.assertEqual(self.successResultOf(d), "alice")
        d = auth.login(portal, UsernamePassword(b"alice", b"nope"))
        self.failureResultOf(d, UnauthorizedLogin)


def test_checker_uses_a_thread_by_default():
    from twisted.internet.threads import deferToThread
    checker = auth.PasswordFileChecker(None)
    assert checker._run_in_thread is deferToThread


# -- failures per client ------------------------------------------------------------------

def test_failure_counter_blocks_within_the_window():
    clock = task.Clock()
    counter = WindowCounter(limit=3, window=60, clock=clock)
    assert not counter.blocked("192.0.2.1")
    assert counter.record("192.0.2.1") == 1
    clock.advance(10)
    counter.record("192.0.2.1")
    assert not counter.blocked("192.0.2.1")
    counter.record("192.0.2.1")
    assert counter.blocked("192.0.2.1")
    assert not counter.blocked("192.0.2.2")
    clock.advance(50)  # the first failure leaves the window
    assert counter.count("192.0.2.1") == 2
    assert not counter.blocked("192.0.2.1")


def test_failure_counter_forgets_old_addresses():
    clock = task.Clock()
    counter = WindowCounter(limit=3, window=60, clock=clock)
    for i in range(100):
        counter.record(f"192.0.2.{i}")
    clock.advance(61)
    counter.record("198.51.100.1")
    assert list(counter._events) == ["198.51.100.1"]


def test_failure_counter_from_config():
    from mta.config import from_dict
    from mta.server.trust import Trust
    config = from_dict({"auth": {"failures_per_client": 5, "failure_window": "10m"}}, "<test>")
    counter = Trust.from_config(config, task.Clock()).failures
    assert (counter.limit, counter.window) == (5, 600)
