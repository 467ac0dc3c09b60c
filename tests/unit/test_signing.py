"""DKIM signing (signing.py): keys, the [dkim] config, the header list, signatures that
dkimpy verifies, and signing in front of a spool `Incoming` (in memory and on disk)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import config as config_module
from mta import signing
from mta.spool.envelope import Envelope, Recipient
from mta.spool.store import WRITE_BUFFER, Spool

MESSAGE = (b"Received: from client.test ([192.0.2.7])\r\n\tby mx.test (mta); "
           b"Mon, 1 Dec 2025 10:00:00 +0000\r\n"
           b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
           b"Subject: signed\r\nList-Id: <news.example.test>\r\nX-Other: not signed\r\n"
           b"\r\nHello,\r\n\r\nthis is signed.\r\n")


def write_key(path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(pem)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dkim")
    write_key(root / "rsa.key", signing.generate("rsa", 1024)[1])
    write_key(root / "ed.key", signing.generate("ed25519")[1])
    return root


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> signing.SigningKey:
    return signing.load_key(keydir / "rsa.key", "example.test", "s1")


@pytest.fixture(scope="module")
def ed_key(keydir: Path) -> signing.SigningKey:
    return signing.load_key(keydir / "ed.key", "example.test", "e1")


def dns_of(*keys: signing.SigningKey):
    """A dkimpy dnsfunc publishing the records of `keys`."""
    records = {key.record_name.encode(): key.record.encode() for key in keys}
    return lambda name, timeout=5: records.get(name)


def verify(message: bytes, *keys: signing.SigningKey, index: int = 0) -> bool:
    try:
        return dkim.DKIM(message).verify(idx=index, dnsfunc=dns_of(*keys))
    except dkim.ValidationError:  # dkimpy's way of saying "body hash mismatch"
        return False


def tags(field: bytes) -> dict[str, str]:
    value = re.sub(rb"\s+", b"", field.split(b":", 1)[1]).decode()
    return dict(item.split("=", 1) for item in value.split(";") if item)


# -- keys -----------------------------------------------------------------------------

def test_rsa_and_ed25519_keys_load_with_their_records(rsa_key, ed_key) -> None:
    assert (rsa_key.algorithm, rsa_key.bits, rsa_key.key_type) == ("rsa-sha256", 1024, "rsa")
    assert rsa_key.record.startswith("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA")  # SPKI
    assert rsa_key.record_name == "s1._domainkey.example.test."
    assert (ed_key.algorithm, ed_key.key_type) == ("ed25519-sha256", "ed25519")
    # RFC 8463 4.2: the raw 32-octet public key.
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed_key.record)


def test_a_pkcs1_rsa_key_as_openssl_and_opendkim_write_it_loads(tmp_path: Path) -> None:
    path = tmp_path / "pkcs1.key"
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(path), "1024"],
                   check=True, capture_output=True)
    path.chmod(0o600)
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert signing.load_key(path, "example.test", "s1").bits == 1024


def test_a_missing_key_is_met_with_the_command_that_makes_it(tmp_path, monkeypatch) -> None:
    """At its default path, the plain command; an Ed25519 slot asks for that type."""
    monkeypatch.chdir(tmp_path)
    default = Path("etc/dkim/example.test.s1.key")
    with pytest.raises(signing.DKIMKeyError) as caught:
        signing.load_key(default, "example.test", "s1")
    assert str(caught.value).endswith("(make one with: mta dkim keygen example.test s1)")
    with pytest.raises(signing.DKIMKeyError) as caught:
        signing.load_key(Path("elsewhere/e1.key"), "example.test", "e1", "ed25519")
    assert str(caught.value).endswith("(make one with: mta dkim keygen example.test e1 "
                                      "--type ed25519 --output elsewhere/e1.key)")


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: None, ("no such file: {path} (make one with: mta dkim keygen example.test s1 "
                      "--output {path})")),
    (lambda p: write_key(p, signing.generate("rsa", 1024)[1], 0o644),
     "{path} is mode 0644: others than its owner may open this private key (chmod 600 {path})"),
    (lambda p: write_key(p, signing.generate("rsa", 1024)[1], 0o640),
     "{path} is mode 0640: others than its owner may open"),
    (lambda p: write_key(p, b"not a key\n"), "{path}: not a PEM private key"),
    (lambda p: p.mkdir(), "{path} is not a regular file"),
])
def test_unusable_key_files_are_named(tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "k.key"
    make(path)
    with pytest.raises(signing.DKIMKeyError) as caught:
        signing.load_key(path, "example.test", "s1")
    assert str(caught.value).startswith(expected.format(path=path))


def test_small_rsa_keys_and_other_kinds_of_key_are_refused(tmp_path: Path) -> None:
    small = tmp_path / "small.key"
    subprocess.run(["openssl", "genrsa", "-out", str(small), "768"], check=True,
                   capture_output=True)
    small.chmod(0o600)
    with pytest.raises(signing.DKIMKeyError, match=r"768 bits; DKIM needs at least 1024"):
        signing.load_key(small, "example.test", "s1")
    ec = tmp_path / "ec.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(ec)], check=True, capture_output=True)
    ec.chmod(0o600)
    with pytest.raises(signing.DKIMKeyError, match=r"an elliptic-curve \(ECDSA\) key; DKIM "
                                                   r"signs with RSA .* or Ed25519"):
        signing.load_key(ec, "example.test", "s1")


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-aes256", "-pass",
                    "pass:secret", "-out", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    with pytest.raises(signing.DKIMKeyError, match="encrypted"):
        signing.load_key(path, "example.test", "s1")


def test_zone_lines_cut_the_value_into_strings_of_at_most_255_octets(tmp_path: Path) -> None:
    key = signing.signing_key(signing.generate("rsa", 4096)[0], "example.test", "big",
                              tmp_path / "k")
    text = signing.zone_lines(key)
    strings = re.findall(r'"([^"]*)"', text)
    assert len(strings) == 3 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == key.record
    assert text.startswith("big._domainkey.example.test. IN TXT (")


def test_selectors_are_dns_labels() -> None:
    assert signing.valid_selector("s1") and signing.valid_selector("2025-01.mail")
    for bad in ("", "-s", "s_1", "s 1", "s1.", "a" * 64):
        assert not signing.valid_selector(bad), bad


# -- config ------------------------------------------------------------------------------

def dkim_config(tmp_path: Path, table: dict, relay: dict | None = None,
                check_files: bool = True) -> config_module.Config:
    path = tmp_path / "mta.toml"
    lines = [f'[relay]\n{k} = "{v}"' for k, v in (relay or {}).items()]
    for domain, values in table.items():
        lines.append(f'[dkim."{domain}"]')
        lines += [f'{k} = "{v}"' for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return config_module.load(path, check_files=check_files)


def test_config_reads_the_keys_of_each_domain_in_signing_order(tmp_path, keydir) -> None:
    config = dkim_config(tmp_path, {"Example.TEST": {
        "selector": "s1", "key": keydir / "rsa.key",
        "ed25519_selector": "e1", "ed25519_key": keydir / "ed.key"}})
    table = config.dkim["example.test"]
    assert (table.selector, table.key, table.ed25519_selector) == ("s1", keydir / "rsa.key", "e1")
    assert [(k.selector, k.algorithm, k.domain) for k in table.keys] == [
        ("s1", "rsa-sha256", "example.test"), ("e1", "ed25519-sha256", "example.test")]
    assert config.relay.dkim_domain == "from"


def test_a_reload_reads_the_key_again(tmp_path, keydir) -> None:
    path = write_key(tmp_path / "k.key", (keydir / "rsa.key").read_bytes())
    first = dkim_config(tmp_path, {"example.test": {"selector": "s1", "key": path}})
    write_key(path, (keydir / "ed.key").read_bytes())
    second = dkim_config(tmp_path, {"example.test": {"selector": "s1", "key": path}})
    assert first.dkim["example.test"].keys[0].algorithm == "rsa-sha256"
    assert second.dkim["example.test"].keys[0].algorithm == "ed25519-sha256"


@pytest.mark.parametrize(("table", "relay", "expected"), [
    ({"selector": "s1"}, {}, ('[dkim."example.test"] key: required: the private key file, '
                             'e.g. "etc/dkim/example.test.s1.key"')),
    ({"key": "{rsa}"}, {}, '[dkim."example.test"] selector: required beside key'),
    ({"selector": "s_1", "key": "{rsa}"}, {}, "selector: not a valid selector"),
    ({"selector": "s1", "key": "{rsa}", "ed25519_key": "{ed}"}, {},
     "ed25519_selector: required beside ed25519_key"),
    ({"selector": "s1", "key": "{rsa}", "ed25519_selector": "e1", "ed25519_key": "{rsa}"}, {},
     "ed25519_key: {rsa} is an RSA key; ed25519_key takes an Ed25519 one"),
    ({"selector": "s1", "key": "{ed}", "ed25519_selector": "e1", "ed25519_key": "{ed}"}, {},
     "key: {ed} is an Ed25519 key: with ed25519_key beside it, key must be the RSA one"),
    ({"selector": "s1", "key": "{rsa}", "ed25519_selector": "s1", "ed25519_key": "{ed}"}, {},
     "ed25519_selector: must differ from selector"),
    ({"selector": "s1", "key": "{missing}"}, {},
     '[dkim."example.test"] key: no such file: {missing}'),
    ({"selector": "s1", "key": "{rsa}", "canonicalization": "simple"}, {},
     '[dkim."example.test"] canonicalization: unknown key'),
    ({"selector": "s1", "key": "{rsa}"}, {"dkim_domain": "helo"},
     "[relay] dkim_domain: expected one of from, sender; got 'helo'"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, keydir, table, relay,
                                                 expected) -> None:
    names = {"rsa": keydir / "rsa.key", "ed": keydir / "ed.key",
             "missing": tmp_path / "missing.key"}
    table = {k: str(v).format(**names) for k, v in table.items()}
    with pytest.raises(config_module.ConfigError) as caught:
        dkim_config(tmp_path, {"example.test": table}, relay)
    assert expected.format(**names) in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'mta.toml'}: ")


def test_commands_that_check_no_files_do_not_read_keys(tmp_path: Path) -> None:
    # `sendmail` run by any user loads the config this way: a key it may not read
    # must not stop it (it hands the message to the server, which signs).
    config = dkim_config(tmp_path, {"example.test": {"selector": "s1",
                                                     "key": tmp_path / "none.key"}},
                         check_files=False)
    assert config.dkim["example.test"].keys == ()
    assert signing.domain_keys(config, "example.test") is None


def test_the_closest_configured_domain_signs_for_its_subdomains(tmp_path, keydir) -> None:
    config = dkim_config(tmp_path, {
        "example.test": {"selector": "s1", "key": keydir / "rsa.key"},
        "lists.example.test": {"selector": "l1", "key": keydir / "ed.key"}})
    assert signing.domain_keys(config, "example.test").name == "example.test"
    assert signing.domain_keys(config, "EXAMPLE.test.").name == "example.test"
    assert signing.domain_keys(config, "mx.example.test").name == "example.test"
    assert signing.domain_keys(config, "a.lists.example.test").name == "lists.example.test"
    assert signing.domain_keys(config, "otherexample.test") is None
    assert signing.domain_keys(config, "test") is None
    assert signing.domain_keys(config, "") is None


def test_author_domain() -> None:
    assert signing.author_domain(" Alice <alice@Example.TEST>") == "example.test"
    assert signing.author_domain(" =?utf-8?q?J=C3=B6rg?= <j@example.test>") == "example.test"
    assert signing.author_domain(" a@example.test, b@example.test") == "example.test"
    assert signing.author_domain(" a@example.test, b@other.test") is None
    assert signing.author_domain(" undisclosed") is None


# -- signatures ------------------------------------------------------------------------------

def test_rsa_and_ed25519_signatures_verify(rsa_key, ed_key) -> None:
    signed = signing.signatures(MESSAGE, [rsa_key, ed_key])
    assert signed.errors == [] and signed.keys == [rsa_key, ed_key]
    fields = signed.fields
    assert fields.count(b"DKIM-Signature: ") == 2 and fields.endswith(b"\r\n")
    message = fields + MESSAGE
    assert verify(message, rsa_key, ed_key, index=0)
    assert verify(message, rsa_key, ed_key, index=1)
    rsa_tags, ed_tags = (tags(b"DKIM-Signature:" + f) for f in
                         fields.split(b"DKIM-Signature:")[1:])
    assert (rsa_tags["a"], rsa_tags["s"], rsa_tags["d"]) == ("rsa-sha256", "s1", "example.test")
    assert (ed_tags["a"], ed_tags["s"]) == ("ed25519-sha256", "e1")
    assert rsa_tags["c"] == "relaxed/relaxed" and "l" not in rsa_tags
    # Every present field of the usual set, From over-signed; Received and X- not at all.
    assert rsa_tags["h"] == "from:to:subject:list-id:from"


def test_openssl_makes_the_rsa_signature_dkimpy_would_make(rsa_key, monkeypatch) -> None:
    """The RSA step goes to OpenSSL for our keys (dkimpy's own is pure Python): the same
    message signed at the same second gives the same bytes either way."""
    import hashlib
    import time

    from dkim.crypto import parse_pem_private_key

    parsed = parse_pem_private_key(rsa_key.private)
    digest = hashlib.sha256(b"a header hash")
    calls = []
    monkeypatch.setattr(signing, "_dkimpy_rsa_sign",
                        lambda d, k: calls.append(k) or signing.dkim.crypto.RSASSA_PKCS1_v1_5_sign(
                            d, k))
    assert signing._rsa_sign(digest, parsed) == \
        signing.dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, parsed)
    assert calls == []  # OpenSSL made it
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    fast = signing.signatures(MESSAGE, [rsa_key]).fields
    monkeypatch.setattr(signing.dkim, "RSASSA_PKCS1_v1_5_sign",
                        signing.dkim.crypto.RSASSA_PKCS1_v1_5_sign)
    assert signing.signatures(MESSAGE, [rsa_key]).fields == fast
    # A key we did not load (someone else's use of dkimpy) still takes dkimpy's way.
    other = signing.generate("rsa", 1024)[1]
    assert signing._rsa_sign(digest, parse_pem_private_key(other)) and len(calls) == 1


def test_a_signature_survives_what_relaxed_canonicalisation_forgives(rsa_key) -> None:
    signed = signing.signatures(MESSAGE, [rsa_key]).fields + MESSAGE
    refolded = signed.replace(b"Subject: signed", b"subject:   signed\r\n\t").replace(
        b"this is signed.\r\n", b"this  is signed. \r\n\r\n\r\n")
    assert verify(refolded, rsa_key)


@pytest.mark.parametrize("change", [
    lambda m: m.replace(b"this is signed.", b"this is forged."),
    lambda m: m.replace(b"Subject: signed", b"Subject: forged"),
    # A second From: added on the way: the over-signed From catches it [RFC 6376 8.15].
    lambda m: m.replace(b"\r\n\r\nHello", b"\r\nFrom: mallory@evil.test\r\n\r\nHello"),
])
def test_changes_break_the_signature(rsa_key, change) -> None:
    signed = signing.signatures(MESSAGE, [rsa_key]).fields + MESSAGE
    assert not verify(change(signed), rsa_key)


def test_every_instance_of_a_repeated_field_is_signed(rsa_key) -> None:
    message = MESSAGE.replace(b"To: bob@remote.test\r\n",
                              b"To: bob@remote.test\r\nTo: carol@remote.test\r\n")
    signed = signing.signatures(message, [rsa_key])
    assert tags(signed.fields)["h"] == "from:to:to:subject:list-id:from"


def test_a_message_without_from_is_not_signed_and_says_why(rsa_key) -> None:
    signed = signing.signatures(b"Subject: no author\r\n\r\nbody\r\n", [rsa_key])
    assert (signed.fields, signed.keys) == (b"", [])
    assert signed.errors == ["no From: header field (RFC 6376 5.4 requires signing it)"]


# -- in front of a spool Incoming -------------------------------------------------------------

def incoming_with(spool: Spool, data: bytes):
    incoming = spool.receive(Envelope(queue_id="", reverse_path="alice@example.test",
                                      recipients=[Recipient("bob@remote.test")], arrival=1.0))
    incoming.write(data)
    return incoming


@pytest.mark.parametrize("size", [0, 3 * WRITE_BUFFER])  # in the buffer; partly in the file
def test_sign_and_commit_puts_the_signatures_in_front_of_the_message(
        tmp_path, rsa_key, ed_key, size: int) -> None:
    spool = Spool(tmp_path / "spool")
    data = MESSAGE + b"x" * 70 + b"\r\n" * (size // 72)
    incoming = incoming_with(spool, data)
    table = config_module.DKIMDomain("example.test", "s1", rsa_key.path, "e1", ed_key.path,
                                     keys=(rsa_key, ed_key))
    queue_id, signed = signing.sign_and_commit(spool, incoming, table)
    stored = spool.message_data(queue_id).read_bytes()
    assert stored == signed.fields + data
    assert spool.load(queue_id).size == len(stored)
    assert verify(stored, rsa_key, ed_key, index=0) and verify(stored, rsa_key, ed_key, index=1)


def test_a_spool_error_while_signing_drops_the_message(tmp_path, rsa_key, monkeypatch) -> None:
    spool = Spool(tmp_path / "spool")
    incoming = incoming_with(spool, MESSAGE)
    table = config_module.DKIMDomain("example.test", "s1", rsa_key.path, keys=(rsa_key,))

    def full(fields: bytes) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(incoming, "prepend", full)
    with pytest.raises(OSError):
        signing.sign_and_commit(spool, incoming, table)
    assert incoming.done and spool.queue_ids() == []
    assert os.listdir(tmp_path / "spool" / "tmp") == []


# -- large messages: dkimpy's parse and relaxed body, in pieces ---------------------------

_OCTETS = st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"  \r\n", b"\r\n\r\n"])


@settings(max_examples=300, deadline=None)
@given(head=st.lists(_OCTETS, max_size=20).map(b"".join),
       body=st.lists(_OCTETS, max_size=200).map(b"".join))
def test_pieces_give_dkimpys_own_parse_and_relaxed_body(head: bytes, body: bytes) -> None:
    """What `_split` and `_relaxed_body` make, a few octets at a time, is what dkimpy
    makes of the whole message at once, octet for octet."""
    message = b"From: a@example.test\r\nSubject:" + head + b"\r\n\r\n" + body
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(signing, "BODY_PIECE", 3)
        header, split_body = signing._split(message)
        ours = signing._relaxed_body(split_body)
    try:
        headers, dkimpy_body = dkim.rfc822_parse(message)
    except dkim.MessageFormatError:  # a bad header section: the same, parsed alone
        with pytest.raises(dkim.MessageFormatError):
            dkim.rfc822_parse(header)
        return
    assert dkim.rfc822_parse(header) == (headers, b"")
    assert split_body == dkimpy_body
    assert ours == signing._dkimpy_relaxed_body(dkimpy_body)


def test_signing_a_large_message_leaves_other_threads_running(rsa_key, ed_key) -> None:
    """Signing runs in a thread beside the reactor.  dkimpy parses the message and
    canonicalises its body with regular expressions over the whole of it, each holding
    the GIL from start to end: 24 MB full of spaces stopped every other thread for 2 s.
    In pieces, the other threads get their turn."""
    body = b"word  \t  " * 7 + b"  \r\n"
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + body * (12_000_000 // len(body))
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        signed = signing.signatures(message, [rsa_key, ed_key])
    finally:
        done.set()
        ticker.join()
    assert signed.errors == [] and len(signed.keys) == 2
    assert verify(signed.fields + message, rsa_key, ed_key)
    assert verify(signed.fields + message, rsa_key, ed_key, index=1)
    assert max(gaps) < 0.2, f"other threads waited {max(gaps):.2f}s"
