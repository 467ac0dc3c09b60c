"""SASL mechanisms as state machines (mta.server.sasl), fed by a real client's output.

Python's smtplib computes the client side of PLAIN and CRAM-MD5; its
answers are what we feed the mechanisms, so a mistake shared by our client
and our server cannot hide here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import smtplib
from pathlib import Path

import pytest
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mta import reply
from mta.server import auth, sasl

HOST = "mx.example.org"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def smtplib_client(user: str, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP()  # never connected: only its authobject methods are used
    client.user, client.password = user, password
    return client


def cram(clock=lambda: 1700000000.5, nonce=lambda: 424242):
    return sasl.CramMD5(HOST, clock, nonce)


# -- PLAIN [RFC 4616] ---------------------------------------------------------------

def test_plain_initial_response():
    line = b64(smtplib_client("alice", "wonderland").auth_plain().encode())
    step = sasl.Plain().start(line)
    assert isinstance(step, UsernamePassword)
    assert (step.username, step.password) == (b"alice", b"wonderland")


def test_plain_without_initial_response_gets_an_empty_challenge():
    mechanism = sasl.Plain()
    step = mechanism.start(None)
    assert step == sasl.Challenge(b"")
    assert step.reply.render() == b"334 \r\n"  # RFC 4954 4: the SP stays
    assert mechanism.phase is sasl.Phase.WANT_RESPONSE
    done = mechanism.respond(b64(b"\0alice\0wonderland"))
    assert (done.username, done.password) == (b"alice", b"wonderland")
    assert mechanism.phase is sasl.Phase.DONE


def test_plain_authzid_equal_to_authcid_is_fine():
    step = sasl.Plain().start(b64(b"alice\0alice\0pw"))
    assert step.username == b"alice"


def test_plain_authzid_of_someone_else_is_refused():
    with pytest.raises(sasl.AuthorizationRefused) as caught:
        sasl.Plain().start(b64(b"bob\0alice\0pw"))
    assert caught.value.reply == reply.AUTH_FAILED
    assert caught.value.reply.render() == b"535 5.7.8 authentication credentials invalid\r\n"


@pytest.mark.parametrize("message", [b"alice\0pw", b"\0\0pw", b"\0alice\0", b"a\0b\0c\0d",
                                     b"", b"\0al\xffice\0pw"])
def test_plain_malformed(message):
    mechanism = sasl.Plain()
    with pytest.raises(sasl.MalformedResponse) as caught:
        mechanism.start(b64(message) if message else "=")
    assert caught.value.reply.code == 501
    assert caught.value.reply.enhanced == "5.5.2"
    assert mechanism.phase is sasl.Phase.DONE


@pytest.mark.parametrize("garbage", ["not base64!", "AGFsaWNl=AHB3", "YWxp\x00", "é"])
def test_bad_base64_in_initial_response(garbage):
    mechanism = sasl.Plain()
    with pytest.raises(sasl.BadBase64) as caught:
        mechanism.start(garbage)
    assert caught.value.reply == reply.AUTH_BAD_BASE64
    assert caught.value.reply.render() == b"501 5.5.2 cannot decode base64 response\r\n"
    assert mechanism.phase is sasl.Phase.DONE


def test_bad_base64_in_continuation():
    mechanism = sasl.Plain()
    mechanism.start(None)
    with pytest.raises(sasl.BadBase64):
        mechanism.respond("%%%")
    with pytest.raises(RuntimeError):
        mechanism.respond(b64(b"\0a\0b"))  # the exchange is over


def test_star_cancels():
    mechanism = sasl.Plain()
    mechanism.start(None)
    with pytest.raises(sasl.AuthCancelled) as caught:
        mechanism.respond("*")
    assert caught.value.reply.render() == b"501 5.0.0 authentication cancelled\r\n"
    assert mechanism.phase is sasl.Phase.DONE


def test_too_long_response():
    with pytest.raises(sasl.ResponseTooLong) as caught:
        sasl.Plain().start("A" * (sasl.MAX_RESPONSE_LENGTH + 4))
    assert caught.value.reply.render() == \
        b"500 5.5.6 authentication exchange line is too long\r\n"


def test_lines_may_be_bytes():
    mechanism = sasl.Login()
    assert mechanism.start(b"=") == sasl.Challenge(b"Password:")
    assert mechanism.respond(b64(b"pw").encode()).password == b"pw"
    mechanism = sasl.Plain()
    mechanism.start(None)
    with pytest.raises(sasl.AuthCancelled):
        mechanism.respond(b"*")


def test_out_of_order_calls_are_programming_errors():
    mechanism = sasl.Plain()
    with pytest.raises(RuntimeError):
        mechanism.respond("")
    mechanism.start(None)
    with pytest.raises(RuntimeError):
        mechanism.start(None)


# -- LOGIN -----------------------------------------------------------------------------

def test_login_dialog():
    mechanism = sasl.Login()
    step = mechanism.start(None)
    assert step.reply.render() == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
    step = mechanism.respond(b64(b"alice"))
    assert step.reply.render() == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
    assert mechanism.phase is sasl.Phase.WANT_PASSWORD
    done = mechanism.respond(b64(b"wonderland"))
    assert (done.username, done.password) == (b"alice", b"wonderland")


def test_login_initial_response_is_the_user_name():
    mechanism = sasl.Login()
    step = mechanism.start(b64(b"alice"))
    assert step == sasl.Challenge(b"Password:")
    assert mechanism.respond(b64(b"pw")).username == b"alice"


def test_login_empty_initial_response():
    mechanism = sasl.Login()
    assert mechanism.start("=") == sasl.Challenge(b"Password:")
    assert mechanism.respond("").username == b""


def test_login_cancel_at_the_password():
    mechanism = sasl.Login()
    mechanism.start(None)
    mechanism.respond(b64(b"alice"))
    with pytest.raises(sasl.AuthCancelled):
        mechanism.respond(" * ")


def test_login_bad_base64_at_the_user_name():
    mechanism = sasl.Login()
    mechanism.start(None)
    with pytest.raises(sasl.BadBase64):
        mechanism.respond("dXNlcg=x")


# -- CRAM-MD5 [RFC 2195] ---------------------------------------------------------------

def test_cram_md5_challenge_is_a_msg_id():
    step = cram().start(None)
    assert step.data == b"<424242.1700000000@mx.example.org>"
    assert step.reply.render() == b"334 " + base64.b64encode(step.data) + b"\r\n"


def test_cram_md5_challenges_differ():
    assert sasl.CramMD5(HOST).challenge != sasl.CramMD5(HOST).challenge


def test_cram_md5_against_pythons_hmac():
    mechanism = cram()
    challenge = mechanism.start(None).data
    answer = smtplib_client("odmr", "pull-it").auth_cram_md5(challenge)
    assert answer == "odmr " + hmac.new(b"pull-it", challenge, hashlib.md5).hexdigest()
    credentials = mechanism.respond(b64(answer.encode()))
    assert isinstance(credentials, CramMD5Credentials)
    assert credentials.username == b"odmr"
    assert credentials.challenge == challenge
    assert credentials.checkPassword(b"pull-it")  # Twisted's own check agrees
    assert not credentials.checkPassword(b"pull-It")


def test_cram_md5_upper_case_hex_is_accepted():
    mechanism = cram()
    challenge = mechanism.start(None).data
    digest = hmac.new(b"pw", challenge, hashlib.md5).hexdigest().upper()
    credentials = mechanism.respond(b64(b"user " + digest.encode()))
    assert credentials.checkPassword(b"pw")


def test_cram_md5_user_names_with_spaces():
    mechanism = cram()
    challenge = mechanism.start(None).data
    digest = hmac.new(b"pw", challenge, hashlib.md5).hexdigest()
    assert mechanism.respond(b64(b"a b " + digest.encode())).username == b"a b"


def test_cram_md5_refuses_an_initial_response():
    mechanism = cram()
    with pytest.raises(sasl.UnexpectedInitialResponse) as caught:
        mechanism.start(b64(b"odmr 0123456789abcdef0123456789abcdef"))
    assert caught.value.reply.code == 501
    assert mechanism.phase is sasl.Phase.DONE


@pytest.mark.parametrize("answer", [b"odmr", b"odmr 1234", b" " + b"a" * 32,
                                    b"odmr " + b"g" * 32, b"odmr\t" + b"a" * 32])
def test_cram_md5_malformed(answer):
    mechanism = cram()
    mechanism.start(None)
    with pytest.raises(sasl.MalformedResponse):
        mechanism.respond(b64(answer))


def test_cram_md5_through_the_checker(tmp_path: Path):
    passwords = tmp_path / "passwords"
    auth.set_password(passwords, "odmr", "pull-it", cram_md5=True)
    portal = auth.make_portal(auth.PasswordFileChecker(passwords, defer.maybeDeferred))
    for password, expected in (("pull-it", "odmr"), ("wrong", None)):
        mechanism = cram()
        challenge = mechanism.start(None).data
        answer = smtplib_client("odmr", password).auth_cram_md5(challenge)
        d = auth.login(portal, mechanism.respond(b64(answer.encode())))
        results = []
        d.addBoth(results.append)
        if expected:
            assert results == [expected]
        else:
            assert results[0].check(UnauthorizedLogin)


def test_plain_through_the_checker(tmp_path: Path):
    passwords = tmp_path / "passwords"
    auth.set_password(passwords, "alice", "wönderland")
    portal = auth.make_portal(auth.PasswordFileChecker(passwords, defer.maybeDeferred))
    line = b64(smtplib_client("alice", "wönderland").auth_plain().encode())
    results = []
    auth.login(portal, sasl.Plain().start(line)).addBoth(results.append)
    assert results == ["alice"]


# -- what is offered ---------------------------------------------------------------------

@pytest.mark.parametrize("tls, loopback, plaintext_ok, cram_store, expected", [
    (False, False, False, False, []),
    (False, False, False, True, ["CRAM-MD5"]),
    (True, False, False, False, ["PLAIN", "LOGIN"]),
    (True, False, False, True, ["PLAIN", "LOGIN", "CRAM-MD5"]),
    (False, True, False, False, ["PLAIN", "LOGIN"]),
    (False, False, True, False, ["PLAIN", "LOGIN"]),
])
def test_mechanisms_for(tls, loopback, plaintext_ok, cram_store, expected):
    assert sasl.mechanisms_for(tls, loopback, plaintext_ok, cram_store) == expected


def test_digest_md5_is_never_offered():
    for flags in [(a, b, c, d) for a in (0, 1) for b in (0, 1) for c in (0, 1) for d in (0, 1)]:
        assert "DIGEST-MD5" not in sasl.mechanisms_for(*map(bool, flags))
    assert sasl.new_mechanism("DIGEST-MD5", HOST) is None


def test_refusal_for():
    assert sasl.refusal_for("plain", ["PLAIN", "LOGIN"]) is None
    assert sasl.refusal_for("PLAIN", ["CRAM-MD5"]) == reply.AUTH_ENCRYPTION_REQUIRED
    assert sasl.refusal_for("login", []).render() == \
        b"538 5.7.11 encryption required for requested authentication mechanism\r\n"
    assert sasl.refusal_for("CRAM-MD5", ["PLAIN"]) == reply.AUTH_MECH_UNKNOWN
    assert sasl.refusal_for("GSSAPI", ["PLAIN"]) == reply.AUTH_MECH_UNKNOWN


def test_new_mechanism():
    assert isinstance(sasl.new_mechanism("plain", HOST), sasl.Plain)
    assert isinstance(sasl.new_mechanism("Login", HOST), sasl.Login)
    mechanism = sasl.new_mechanism("cram-md5", HOST, clock=lambda: 7)
    assert isinstance(mechanism, sasl.CramMD5)
    assert mechanism.challenge.endswith(b".7@mx.example.org>")
    assert sasl.new_mechanism("XOAUTH2", HOST) is None
