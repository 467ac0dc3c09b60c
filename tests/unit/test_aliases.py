"""aliases.py: the files, and the one definition of local addresses that RCPT, VRFY/EXPN,
sendmail, bounces and delivery share."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import aliases
from mta import config as config_module
from mta.aliases import LOCAL, LOOP, REMOTE, UNKNOWN
from mta.spool.envelope import Envelope, Recipient

DOMAIN_ALIASES = """\
# The sales list: members on continuation lines, one remote.
sales: alice, bob,
    carol@remote.test
owner-sales: alice
staff: sales, \\dave, dave@remote.test
   # a comment inside an entry is skipped
loop1: loop2
loop2: loop1
half: loop1, alice
dave: dave, dave@elsewhere.test
members: :include:{members}
Quoted: "bob"
"""

SYSTEM_ALIASES = """\
root: alice@example.org
MAILER-DAEMON: postmaster
cron: root
"""

VIRTUAL = """\
info@virt.test   alice@example.org, bob@example.org
@virt.test       bob@example.org
@old.test        @example.org
sales@example.org: alice@example.org
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def make(tmp_path: Path, **server) -> config_module.Config:
    tmp_path.mkdir(exist_ok=True)
    members = write(tmp_path / "members", "alice\n# comment\nbob, erin@remote.test\nnobody\n")
    data = {
        "server": {"hostname": "mx.test", "postmaster": "alice@example.org",
                   "aliases": write(tmp_path / "system", SYSTEM_ALIASES), **server},
        "domains": {
            "example.org": {"route": f"maildir:{tmp_path / 'mail'}",
                            "users": ["alice", "bob", "dave"],
                            "aliases": write(tmp_path / "aliases",
                                             DOMAIN_ALIASES.format(members=members))},
            "fwd.test": {"route": "smtp:[10.0.0.1]:25", "users": ["x"]},
            "any.test": {"route": f"maildir:{tmp_path / 'any'}"},
        },
    }
    return config_module.from_dict(data, "<test>")


def targets(found: aliases.Resolution) -> list[tuple[str, str | None]]:
    return [(t.address, t.sender) for t in found.targets]


# -- the files -----------------------------------------------------------------------------

def test_aliases_file_form(tmp_path: Path) -> None:
    cfg = make(tmp_path)
    entries = cfg.domains["example.org"].alias_entries
    assert entries["sales"] == ("alice", "bob", "carol@remote.test")
    assert entries["staff"] == ("sales", "\\dave", "dave@remote.test")
    assert entries["members"] == ("alice", "bob", "erin@remote.test", "nobody")  # :include:
    assert entries["quoted"] == ("bob",)  # names are case-insensitive
    assert cfg.server.alias_entries["mailer-daemon"] == ("postmaster",)


@pytest.mark.parametrize(("text", "error"), [
    ("sales alice\n", "aliases:1: expected \"name: address, address\""),
    ("a: b\na: c\n", "aliases:2: a is defined twice"),
    ("a: |/usr/bin/procmail\n", "aliases:1: '|/usr/bin/procmail': pipes and files"),
    ("a: /var/mail/a\n", "pipes and files are not supported"),
    ("a:\n", "aliases:1: a: no targets"),
    ("a: b@\n", "aliases:1: bad address 'b@'"),
    ("a: :include:/no/such/file\n", "aliases:1: :include:/no/such/file: No such file"),
    ("a: @example.org\n", "bad target '@example.org'"),
])
def test_aliases_file_errors_name_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path / "aliases", text)
    with pytest.raises(config_module.ConfigError) as e:
        config_module.from_dict({"domains": {"example.org": {
            "route": "maildir:mail", "aliases": path}}}, "mta.toml")
    assert str(e.value).startswith('mta.toml: [domains."example.org"] aliases: ')
    assert error in str(e.value)


@pytest.mark.parametrize(("text", "error"), [
    ("info@virt.test\n", "virtual:1: info@virt.test: no targets"),
    ("nobody alice@example.org\n", "expected \"user@domain address, ...\""),
    ("info@virt.test alice\n", "'alice': write a full address"),
    ("info@virt.test @example.org\n", "\"@domain\" maps only a \"@domain\" key"),
])
def test_virtual_file_errors(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path / "virtual", text)
    with pytest.raises(config_module.ConfigError, match="mta.toml: \\[server\\] virtual: "):
        config_module.from_dict({"server": {"virtual": path}}, "mta.toml")
    with pytest.raises(config_module.ConfigError) as e:
        config_module.from_dict({"server": {"virtual": path}}, "mta.toml")
    assert error in str(e.value)


def test_config_keys(tmp_path: Path) -> None:
    with pytest.raises(config_module.ConfigError, match=r"\[server\] aliases: no such file"):
        config_module.from_dict({"server": {"aliases": str(tmp_path / "none")}})
    with pytest.raises(config_module.ConfigError, match=r"recipient_delimiter: expected one"):
        config_module.from_dict({"server": {"recipient_delimiter": "ab"}})
    with pytest.raises(config_module.ConfigError, match=r"\[relay\] masquerade: expected a domain"):
        config_module.from_dict({"relay": {"masquerade": "not a domain"}})
    cfg = config_module.from_dict({"listeners": [
        {"endpoint": "tcp:25"}, {"endpoint": "tcp:26", "vrfy": True},
        {"endpoint": "tcp:587", "role": "submission", "require_auth": False}]})
    assert [(x.vrfy, x.expn) for x in cfg.listeners] == [(False, False), (True, False),
                                                         (True, True)]


# -- resolution ------------------------------------------------------------------------------

def test_list_with_owner_changes_the_members_sender(tmp_path: Path) -> None:
    found = make(tmp_path).addresses.resolve("Sales@Example.ORG")
    owner = "owner-sales@example.org"
    assert found.kind == LOCAL and found.expanded
    assert targets(found) == [("alice@example.org", owner), ("bob@example.org", owner),
                              ("carol@remote.test", owner)]


def test_nested_lists_are_deduplicated_and_backslash_means_the_mailbox(tmp_path: Path) -> None:
    found = make(tmp_path).addresses.resolve("staff@example.org")
    owner = "owner-sales@example.org"
    # \dave is dave's mailbox, not the "dave" alias (which would add dave@elsewhere).
    assert targets(found) == [("alice@example.org", owner), ("bob@example.org", owner),
                              ("carol@remote.test", owner), ("dave@example.org", None),
                              ("dave@remote.test", None)]


def test_a_name_listing_itself_keeps_a_copy(tmp_path: Path) -> None:
    found = make(tmp_path).addresses.resolve("dave@example.org")
    assert targets(found) == [("dave@example.org", None), ("dave@elsewhere.test", None)]


def test_loops(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    assert addresses.resolve("loop1@example.org").kind == LOOP
    half = addresses.resolve("half@example.org")
    assert targets(half) == [("alice@example.org", None)]
    assert half.loops == ("half@example.org",)


def test_unknown_members_and_unknown_names(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    found = addresses.resolve("members@example.org")
    assert [t for t, _ in targets(found)] == ["alice@example.org", "bob@example.org",
                                             "erin@remote.test"]
    assert found.unknown == ("nobody@example.org",)
    assert addresses.resolve("carol@example.org").kind == UNKNOWN
    assert addresses.resolve("anyone@any.test").kind == LOCAL  # no users list: any name


def test_plus_addressing(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    assert targets(addresses.resolve("Alice+news@example.org")) == [("Alice+news@example.org",
                                                                     None)]
    assert addresses.mailbox("Alice+news@example.org") == "alice"
    # An alias with a tag is the alias.
    assert next(t for t, _ in targets(addresses.resolve("sales+x@example.org"))) == \
        "alice@example.org"
    assert addresses.resolve("carol+x@example.org").kind == UNKNOWN
    dash = make(tmp_path / "dash", recipient_delimiter="-").addresses
    assert dash.mailbox("alice-news@example.org") == "alice"
    assert dash.resolve("alice+news@example.org").kind == UNKNOWN
    off = make(tmp_path / "off", recipient_delimiter="").addresses
    assert off.resolve("alice+news@example.org").kind == UNKNOWN


def test_postmaster_everywhere(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    for address in ("postmaster@example.org", "POSTMASTER@mx.test", "postmaster@localhost",
                    "Postmaster", "postmaster@any.test"):
        assert targets(addresses.resolve(address)) == [("alice@example.org", None)], address
    # A domain forwarded to its own server has its own postmaster there (not in `users`).
    assert targets(addresses.resolve("postmaster@fwd.test")) == [("postmaster@fwd.test", None)]
    # Without [server] postmaster: the domain's own postmaster mailbox, users or not.
    bare = make(tmp_path / "bare", postmaster="").addresses
    assert bare.mailbox("postmaster@example.org") == "postmaster"
    assert bare.resolve("postmaster@mx.test").kind == UNKNOWN
    assert "[server] postmaster: not set, and postmaster@mx.test has nowhere to go" in \
        bare.problems()
    wrong = make(tmp_path / "wrong", postmaster="carol@example.org").addresses
    assert "[server] postmaster: carol@example.org does not exist here" in wrong.problems()


def test_system_mail_at_our_hostname_and_localhost(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    assert addresses.is_local_domain("MX.test.") and addresses.is_local_domain("localhost")
    for address in ("root@mx.test", "cron@mx.test", "root@localhost"):
        assert targets(addresses.resolve(address)) == [("alice@example.org", None)], address
    assert targets(addresses.resolve("MAILER-DAEMON@mx.test")) == [("alice@example.org", None)]
    # No mailboxes at the hostname: other names there do not exist...
    assert addresses.resolve("nobody@mx.test").kind == UNKNOWN
    assert addresses.destination("nobody@mx.test") == (UNKNOWN, None)
    # ...and the system aliases are not those of the configured domains.
    assert addresses.resolve("root@example.org").kind == UNKNOWN


def test_virtual_aliases(tmp_path: Path) -> None:
    addresses = make(tmp_path, virtual=write(tmp_path / "virtual", VIRTUAL)).addresses
    assert addresses.is_local_domain("virt.test") and addresses.is_local_domain("old.test")
    assert targets(addresses.resolve("info@virt.test")) == [("alice@example.org", None),
                                                           ("bob@example.org", None)]
    assert targets(addresses.resolve("whoever@virt.test")) == [("bob@example.org", None)]
    assert targets(addresses.resolve("alice@old.test")) == [("alice@example.org", None)]
    assert addresses.resolve("carol@old.test").unknown == ("carol@example.org",)
    # A virtual entry comes before the domain's own aliases.
    assert targets(addresses.resolve("sales@example.org")) == [("alice@example.org", None)]


def test_users_on_an_smtp_route_restrict_it(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    assert targets(addresses.resolve("X@fwd.test")) == [("X@fwd.test", None)]
    assert addresses.resolve("y@fwd.test").kind == UNKNOWN
    assert addresses.destination("x+tag@fwd.test") == (aliases.FORWARD, None)


def test_remote_and_masquerade(tmp_path: Path) -> None:
    cfg = make(tmp_path)
    assert targets(cfg.addresses.resolve("a@far.test")) == [("a@far.test", None)]
    assert cfg.addresses.resolve("a@far.test").kind == REMOTE
    assert cfg.addresses.masquerade("root@mx.test") == "root@mx.test"  # not asked for
    masked = config_module.from_dict({"server": {"hostname": "mx.test"},
                                      "relay": {"masquerade": "Example.org"}}).addresses
    assert masked.masquerade("root@MX.test") == "root@example.org"
    assert masked.masquerade("cron@localhost") == "cron@example.org"
    assert masked.masquerade("bob@other.test") == "bob@other.test"
    assert masked.masquerade("") == ""


def test_vrfy_candidates(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    # any.test takes any name: "root" there is another mailbox.
    assert addresses.candidates("root") == ["root@mx.test", "root@any.test"]
    assert addresses.candidates("cron") == ["cron@mx.test", "cron@any.test"]
    assert addresses.candidates("dave") == ["dave@any.test", "dave@example.org"]
    assert addresses.candidates("alice") == ["alice@any.test", "alice@example.org"]
    assert addresses.candidates("carol") == ["carol@any.test"]


def test_problems_for_aliases_check(tmp_path: Path) -> None:
    problems = make(tmp_path).addresses.problems()
    source = '[domains."example.org"] aliases'
    assert problems == [
        f"{source}: loop1@example.org: alias loop through loop1@example.org",
        f"{source}: loop2@example.org: alias loop through loop2@example.org",
        f"{source}: half@example.org: alias loop through half@example.org",
        f"{source}: members@example.org: unknown target nobody@example.org",
    ]


# -- the envelope keeps the expansion --------------------------------------------------------

def test_expanded_recipients_keep_the_original_as_orcpt(tmp_path: Path) -> None:
    addresses = make(tmp_path).addresses
    given = Recipient("sales@example.org", notify=("SUCCESS", "FAILURE"))
    members = given.expanded(addresses.resolve(given.address).targets, null_sender=False)
    assert next((r.address, r.sender, r.orcpt, r.notify) for r in members) == \
        ("alice@example.org", "owner-sales@example.org", "rfc822;sales@example.org", None)
    # From <>: a bounce to a list stays a bounce for every member.
    assert {r.sender for r in given.expanded(addresses.resolve(given.address).targets,
                                             null_sender=True)} == {None}
    # An alias (no owner): sender and NOTIFY as they were, ORCPT given by the client kept.
    root = Recipient("root@mx.test", orcpt="rfc822;root@mx.test", notify=("NEVER",))
    (person,) = root.expanded(addresses.resolve(root.address).targets, null_sender=False)
    assert (person.address, person.sender, person.orcpt, person.notify) == \
        ("alice@example.org", None, "rfc822;root@mx.test", ("NEVER",))
    # Not expanded: the same object.
    plain = Recipient("alice@example.org")
    assert plain.expanded(addresses.resolve(plain.address).targets, False) == [plain]
    # The sender asked for SUCCESS: the list address stays, delivered, for an "expanded"
    # report [RFC 3461 6.2.7.2].
    expanded = members[-1]
    assert (expanded.address, expanded.state, expanded.expansion, expanded.notify) == \
        ("sales@example.org", "delivered", True, ("SUCCESS", "FAILURE"))
    envelope = Envelope("Q", "me@far.test", members, arrival=0.0)
    again = Envelope.from_json(envelope.to_json())
    assert [envelope.sender_for(r) for r in again.recipients] == \
        ["owner-sales@example.org"] * 3 + ["me@far.test"]
    assert again.recipients[-1].expansion
    # The new fields are checked like every other when an envelope is read.
    from mta.spool.envelope import EnvelopeError
    for good, bad in ((b'"sender":"owner-sales@example.org"', b'"sender":5'),
                      (b'"expansion":true', b'"expansion":"yes"')):
        raw = envelope.to_json().replace(good, bad, 1)
        assert raw != envelope.to_json()
        with pytest.raises(EnvelopeError):
            Envelope.from_json(raw)


def test_an_alias_to_several_keeps_notify_but_success(tmp_path: Path) -> None:
    # RFC 3461 6.2.7.3: FAILURE and DELAY go on to each address; SUCCESS becomes one
    # "expanded" report.
    addresses = make(tmp_path).addresses
    given = Recipient("dave@example.org", notify=("SUCCESS", "DELAY"))
    got = given.expanded(addresses.resolve(given.address).targets, null_sender=False)
    assert [(r.address, r.notify, r.state) for r in got] == [
        ("dave@example.org", ("DELAY",), "pending"),
        ("dave@elsewhere.test", ("DELAY",), "pending"),
        ("dave@example.org", ("SUCCESS", "DELAY"), "delivered")]
    # De-duplication keeps the mailbox and the report apart, and drops a second copy.
    from mta.spool.envelope import add_recipients
    kept: list[Recipient] = []
    add_recipients(kept, got)
    add_recipients(kept, [Recipient("DAVE@example.org")])
    assert len(kept) == 3
    only_success = Recipient("dave@example.org", notify=("SUCCESS",))
    got = only_success.expanded(addresses.resolve(only_success.address).targets, False)
    assert [r.notify for r in got] == [("NEVER",), ("NEVER",), ("SUCCESS",)]
