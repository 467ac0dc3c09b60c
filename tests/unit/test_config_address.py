"""The config reader (one clear line naming the key) and the address grammar."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.address import (
    AddressError,
    parse_params,
    parse_path,
    split_path_and_params,
    xtext_decode,
    xtext_encode,
)

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_load(tmp_path, monkeypatch):
    cfg = config.load(REPO / "etc" / "mta.toml")
    assert cfg.listeners[0].endpoint == "tcp:2525:interface=127.0.0.1"
    assert cfg.server.spool == Path("spool")
    assert cfg.domain_for("LOCALHOST.").route.kind == "maildir"
    # The examples name files an operator makes: make them, then load each example.
    from mta.tls import make_cert
    (tmp_path / "etc").mkdir()
    make_cert(tmp_path / "etc/cert.pem", tmp_path / "etc/key.pem", "mx.example.org")
    (tmp_path / "etc/passwords").write_text("")
    (tmp_path / "etc/smarthost.secret").write_text("secret\n")
    (tmp_path / "etc/odmr.secret").write_text("secret\n")
    from mta import signing
    (tmp_path / "etc/dkim").mkdir()
    for domain in ("example.org", "lan.example"):
        key = tmp_path / f"etc/dkim/{domain}.s1.key"
        key.write_bytes(signing.generate("rsa", 1024)[1])
        key.chmod(0o600)
    for name in ("aliases", "aliases.example.org", "virtual"):
        (tmp_path / "etc" / name).write_text((REPO / "etc" / "examples" / name).read_text())
    monkeypatch.chdir(tmp_path)
    examples = sorted((REPO / "etc" / "examples").glob("*.toml"))
    assert len(examples) == 4
    for example in examples:
        loaded = config.load(example)
        assert loaded.addresses.problems() == [], example
    # The small domain's aliases work as its comments say.
    addresses = config.load(REPO / "etc" / "examples" / "small-domain.toml").addresses
    assert [t.address for t in addresses.resolve("root@mx.example.org").targets] == \
        ["alice@example.org"]
    assert [(t.address, t.sender) for t in addresses.resolve("info@example.org").targets] == \
        [("alice@example.org", "owner-sales@example.org"),
         ("bob@example.org", "owner-sales@example.org"),
         ("bob@home.example.net", "owner-sales@example.org")]
    assert addresses.resolve("nobody@lists.example.org").kind == "unknown"
    assert addresses.masquerade("root@mx.example.org") == "root@example.org"


def test_defaults():
    cfg = config.default()
    assert cfg.limits.message_size == 25_000_000
    assert cfg.relay.retry_min == 300 and cfg.relay.lifetime == 5 * 86400
    assert cfg.is_mynetwork("127.0.0.5") and cfg.is_mynetwork("::1")
    assert not cfg.is_mynetwork("192.0.2.1") and not cfg.is_mynetwork("garbage")
    assert cfg.is_mynetwork("::ffff:127.0.0.1")
    # Asked again, the answers are the same (they are kept), and equality ignores them.
    assert cfg.is_mynetwork("127.0.0.5") and not cfg.is_mynetwork("192.0.2.1")
    assert cfg == config.default()
    for i in range(5000):  # more addresses than are kept: still right
        assert cfg.is_mynetwork(f"127.0.{i // 256}.{i % 256}")
        assert not cfg.is_mynetwork(f"198.51.{i // 256}.{i % 256}")
    assert len(cfg.__dict__["_mynetwork"]) <= 4096


@pytest.mark.parametrize("text, message", [
    ('[limits]\nrecipients = "x"', "[limits] recipients: expected an integer, got 'x'"),
    ("[limits]\nrecipients = 0", "[limits] recipients: must be at least 1, got 0"),
    ('[limits]\nmessage_size = "big"', "[limits] message_size: expected a size like"),
    ('[limits]\ncommand_timeout = "soon"', "[limits] command_timeout: expected a duration"),
    ("[limits]\nrecipeints = 5", "[limits] recipeints: unknown key"),
    ("[nonsense]\na = 1", "top level nonsense: unknown key"),
    ('[server]\npostmaster = "not an address"', "[server] postmaster: address must be"),
    ('[relay]\nmynetworks = ["10.0.0.0/33"]', "[relay] mynetworks: bad network"),
    ('[relay]\nnameservers = ["ns.example"]', "[relay] nameservers: expected"),
    ('[tls]\ncertificate = "/nonexistent/cert.pem"', "[tls] certificate: no such file"),
    ('[[listeners]]\nendpoint = "tcp:465"\ntls = "implicit"', "[tls] certificate: required"),
    ('[[listeners]]\nendpoint = "tcp:25"\nrole = "mx"', '[listeners #1] role: expected one of'),
    ('[domains."ex.org"]\nroute = "ftp:x"', '[domains."ex.org"] route: bad route'),
    ('[domains."ex.org"]\nusers = []', '[domains."ex.org"] route: required'),
    ("not toml [", "not valid TOML"),
    ('[[listeners]]\nendpoint = "tcp:587"\nrole = "submission"',
     "[auth] passwords: required by listener #1 tcp:587 (role submission"),
    ('[server]\nspool = ""', "[server] spool: must name a directory"),
    ('[limits]\ncommand_timeout = "0s"', "[limits] command_timeout: must be more than zero"),
    ("[limits]\ndata_timeout = 0", "[limits] data_timeout: must be more than zero"),
    ("[limits]\nmessage_size = 0", "[limits] message_size: must be at least 1"),
    ("[auth]\nsenders = 3", "[auth] senders: expected a table, got 3"),
    ('[[listeners]]\nendpoint = "tcp:25"\natrn = true',
     "[listeners #1] atrn: ATRN is offered on odmr and submission listeners only"),
    ('[auth]\npasswords = "p"\n[[listeners]]\nendpoint = "tcp:366"\nrole = "odmr"\natrn = false',
     "[listeners #1] atrn: an odmr listener exists to offer ATRN"),
    ('[domains."ex.org"]\nroute = "maildir:m"\npull_users = ["a"]',
     '[domains."ex.org"] pull_users: only a domain with route = "hold" can be pulled'),
    ('[domains."ex.org"]\nroute = "hold"\netrn_clients = ["nonsense"]',
     '[domains."ex.org"] etrn_clients: bad network'),
    ('[etrn]\nclients = ["10.0.0.0/33"]', "[etrn] clients: bad network"),
    ("[etrn]\nper_client = 0", "[etrn] per_client: must be at least 1"),
    ("[etrn]\nwindow = \"0s\"", "[etrn] window: must be more than zero"),
    ("[etrn]\nspeed = 1", "[etrn] speed: unknown key"),
    ('[[pull]]\nprotocol = "pop3"', "[pull #1] protocol: expected one of odmr, etrn"),
    ('[[pull]]\nuser = "c"', "[pull #1] server: required"),
    ('[[pull]]\nserver = "p.example:x"', "[pull #1] server: "),
    ('[[pull]]\nserver = "p.example"', '[pull #1] user: required for protocol "odmr"'),
    ('[[pull]]\nserver = "p.example"\nuser = "c"',
     '[pull #1] password_file: required for protocol "odmr"'),
    ('[[pull]]\nserver = "p.example"\nuser = "c"\npassword_file = "/nonexistent"',
     "[pull #1] password_file: no such file: /nonexistent"),
    ('[[pull]]\nprotocol = "etrn"\nserver = "p.example"',
     '[pull #1] domains: required for protocol "etrn"'),
    ('[[pull]]\nprotocol = "etrn"\nserver = "p.example"\ndomains = ["a..b"]',
     "[pull #1] domains: not a valid domain name"),
    ('[[pull]]\nprotocol = "etrn"\nserver = "p.example"\ndomains = ["a.b"]\ninterval = "0s"',
     "[pull #1] interval: must be more than zero"),
    ('[tls_policy]\n"example.com" = "secure"',
     "[tls_policy] example.com: expected one of none, may, encrypt, verify, sts; got 'secure'"),
    ('[tls_policy]\nexample.com = "verify"',
     '[tls_policy] example: quote the domain name: "example.com" = "verify"'),
    ('[tls_policy]\n"exa mple.com" = "verify"', "[tls_policy] exa mple.com: not a valid domain"),
    ('[tls_policy]\n"example.com" = true', "[tls_policy] example.com: expected a string"),
    ('[tls_policy]\n"a.example" = "may"\n"A.Example." = "none"',
     "[tls_policy] A.Example.: a.example is named twice"),
    ('[relay]\nmta_sts = "yes"', "[relay] mta_sts: expected true or false, got 'yes'"),
    ("[relay]\nmta_sts_port = 70000", "[relay] mta_sts_port: expected a port number"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "mta.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_role_reversal_keys(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    cfg = config.from_dict({
        "auth": {"passwords": str(tmp_path / "passwords")},
        "listeners": [{"endpoint": "tcp:366", "role": "odmr"},
                      {"endpoint": "tcp:587", "role": "submission", "atrn": True},
                      {"endpoint": "tcp:25"}],
        "domains": {"c.example": {"route": "hold", "pull_users": ["c"],
                                  "etrn_clients": ["192.0.2.0/24"]}},
        "etrn": {"clients": ["10.0.0.0/8"], "per_client": 3, "window": "10m"},
        "pull": [{"server": "odmr.provider.example", "user": "me", "password_file": str(secret)},
                 {"protocol": "etrn", "server": "mx.provider.example:2525",
                  "domains": ["Me.Example."], "interval": "1h"}],
    })
    assert [x.atrn for x in cfg.listeners] == [True, True, False]
    domain = cfg.domains["c.example"]
    assert domain.held and [str(n) for n in domain.etrn_clients] == ["192.0.2.0/24"]
    assert ([str(n) for n in cfg.etrn.clients], cfg.etrn.per_client, cfg.etrn.window) == (
        ["10.0.0.0/8"], 3, 600)
    odmr, etrn = cfg.pulls
    assert (odmr.protocol, odmr.server, odmr.interval, odmr.tls_verify) == (
        "odmr", "odmr.provider.example:366", 900, True)
    assert (etrn.protocol, etrn.server, etrn.domains, etrn.interval) == (
        "etrn", "mx.provider.example:2525", ("me.example",), 3600)
    defaults = config.default()
    assert defaults.pulls == () and defaults.etrn.per_client == 10
    assert [str(n) for n in defaults.etrn.clients] == ["0.0.0.0/0", "::/0"]


def test_missing_file():
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load("/nonexistent/mta.toml")


@pytest.mark.parametrize("value, expected", [
    ("90s", 90), ("5m", 300), ("4h", 14400), ("5d", 432000), (30, 30), ("250ms", 0.25),
])
def test_durations(value, expected):
    assert config.parse_duration(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("25MB", 25_000_000), ("1KiB", 1024), ("2 GiB", 2 * 2**30), (1000, 1000), ("10kb", 10_000),
])
def test_sizes(value, expected):
    assert config.parse_size(value) == expected


@pytest.mark.parametrize("text, kind, host, port, mx", [
    ("maildir:mail/example.org", "maildir", "", None, False),
    ("smtp:[10.0.0.5]:2525", "smtp", "10.0.0.5", 2525, False),
    ("smtp:[mail.example.org]", "smtp", "mail.example.org", None, False),
    ("smtp:example.org", "smtp", "example.org", None, True),
    ("smtp:example.org:587", "smtp", "example.org", 587, True),
    ("hold", "hold", "", None, False),
])
def test_routes(text, kind, host, port, mx):
    route = config.parse_route(text)
    assert (route.kind, route.host, route.port, route.mx) == (kind, host, port, mx)
    assert str(route) == text or kind == "smtp"


# -- addresses ------------------------------------------------------------------------

@pytest.mark.parametrize("path, text", [
    ("<a@b.test>", "a@b.test"),
    ('<"john doe"@b.test>', '"john doe"@b.test'),
    ('<"a>b"@b.test>', '"a>b"@b.test'),
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ("<@hop.test,@hop2.test:a@b.test>", "a@b.test"),
    ("<first.last+tag@sub.b.test>", "first.last+tag@sub.b.test"),
])
def test_valid_paths(path, text):
    assert str(parse_path(path)) == text


@pytest.mark.parametrize("path", [
    "<a@b.test", "a@b.test", "<a>", "<@b.test>", "<a..b@b.test>", "<.a@b.test>", "<a@b..test>",
    "<a@-b.test>", "<a@[300.1.1.1]>", "<a b@b.test>", "<" + "x" * 65 + "@b.test>",
    "<a@" + "b" * 64 + ".test>", "<>",
])
def test_invalid_paths(path):
    with pytest.raises(AddressError):
        parse_path(path)


def test_null_path_and_postmaster():
    assert parse_path("<>", null_ok=True) is None
    assert parse_path("<Postmaster>", allow_bare_postmaster=True).is_postmaster
    with pytest.raises(AddressError):
        parse_path("<Postmaster>")


def test_utf8_addresses_need_smtputf8():
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_path("<jörg@b.test>")
    assert str(parse_path("<jörg@bücher.test>", utf8=True)) == "jörg@bücher.test"


def test_split_and_params():
    assert split_path_and_params(' <a@b.test>  SIZE=10 BODY=8BITMIME') == \
        ("<a@b.test>", "SIZE=10 BODY=8BITMIME")
    assert parse_params("size=10 smtputf8") == {"SIZE": "10", "SMTPUTF8": None}
    for bad in ("=x", "A=", "A=b=c", "A A", "-X=1"):
        with pytest.raises(AddressError):
            parse_params(bad)


def test_xtext():
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_encode("a+b=c é") == "a+2Bb+3Dc+20+C3+A9"
    with pytest.raises(AddressError):
        xtext_decode("a+zz")


def test_xtext_round_trip_of_utf8():
    # Each +XX is one octet; non-ASCII text is its UTF-8 octets, both ways.
    assert xtext_decode("j+C3+B6rg@example.org") == "j\u00f6rg@example.org"
    assert xtext_decode(xtext_encode("j\u00f6rg \u4e2d@x")) == "j\u00f6rg \u4e2d@x"
    with pytest.raises(AddressError):
        xtext_decode("a+E9b")  # not UTF-8


def test_check_config_fails_where_start_up_would(tmp_path, capsys):
    from mta import cli
    from mta.tls import make_cert
    make_cert(tmp_path / "a.pem", tmp_path / "a.key", "a.test")
    make_cert(tmp_path / "b.pem", tmp_path / "b.key", "b.test")
    (tmp_path / "junk.pem").write_text("junk\n")
    cases = {
        '[[listeners]]\nendpoint = "tcp:abc"': "[listeners #1] endpoint: bad endpoint 'tcp:abc'",
        f'[tls]\ncertificate = "{tmp_path}/a.pem"\nkey = "{tmp_path}/b.key"':
            "[tls] certificate: ",
        f'[tls]\ncertificate = "{tmp_path}/junk.pem"\nkey = "{tmp_path}/a.key"':
            "cannot load certificate",
    }
    for text, message in cases.items():
        path = tmp_path / "mta.toml"
        path.write_text(text)
        assert cli.main(["check-config", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"mta: {path}: ") and message in err, err
        assert err.count("\n") == 1


def test_a_smarthost_with_credentials_is_verified_by_default(tmp_path):
    password = tmp_path / "pw"
    password.write_text("secret\n")
    with_user = config.from_dict({"relay": {
        "smarthost": "smtp.isp.test:587", "smarthost_user": "me",
        "smarthost_password_file": str(password)}})
    assert with_user.relay.smarthost_tls == "verify"
    without = config.from_dict({"relay": {"smarthost": "smtp.isp.test:25"}})
    assert without.relay.smarthost_tls == "required"
    opted_out = config.from_dict({"relay": {
        "smarthost": "smtp.isp.test:587", "smarthost_user": "me",
        "smarthost_password_file": str(password), "smarthost_tls": "required"}})
    assert opted_out.relay.smarthost_tls == "required"


def test_check_config_and_aliases_check_report_alias_problems(tmp_path, capsys):
    from mta import cli
    (tmp_path / "aliases").write_text("team: alice, nosuch\nping: pong\npong: ping\n")
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nhostname = "mx.test"\npostmaster = "alice@example.org"\n'
                    f'[domains."example.org"]\nroute = "maildir:{tmp_path}/mail"\n'
                    f'users = ["alice"]\naliases = "{tmp_path}/aliases"\n')
    source = '[domains."example.org"] aliases'
    # check-config warns (the config works: RCPT refuses what leads nowhere)...
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: warning: {source}: team@example.org: unknown target nosuch@example.org\n" \
        in out
    assert f"{source}: ping@example.org: alias loop through ping@example.org" in out
    # ...`mta aliases check` fails on them; `expand` shows the way.
    assert cli.main(["aliases", "check", "--config", str(path)]) == 1
    assert capsys.readouterr().out.count("\n") == 3
    assert cli.main(["aliases", "expand", "--config", str(path), "team@example.org",
                     "ping@example.org", "postmaster@mx.test"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "team@example.org -> alice@example.org",
        "team@example.org -> nosuch@example.org  (unknown: fails at delivery)",
        "ping@example.org: alias loop",
        "postmaster@mx.test -> alice@example.org",
    ]
    (tmp_path / "aliases").write_text("team: alice\n")
    assert cli.main(["aliases", "check", "--config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: aliases OK\n"


def test_sendmail_socket_defaults_to_the_spool_and_can_be_off():
    cfg = config.from_dict({"server": {"spool": "/var/spool/mta"}})
    assert cfg.server.sendmail_socket == Path("/var/spool/mta/public/sendmail.sock")
    cfg = config.from_dict({"server": {"sendmail_socket": "/run/mta/submit.sock"}})
    assert cfg.server.sendmail_socket == Path("/run/mta/submit.sock")
    assert config.from_dict({"server": {"sendmail_socket": "off"}}).server.sendmail_socket is None


def test_files_need_not_exist_when_not_checked(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text('[tls]\ncertificate = "/nonexistent/cert.pem"\n'
                    '[relay]\nsmarthost_user = "u"\nsmarthost_password_file = "/nonexistent/pw"\n')
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(path)
    assert config.load(path, check_files=False).tls.certificate == Path("/nonexistent/cert.pem")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(path)  # checking is back on for everyone else


def test_default_config_path(tmp_path, monkeypatch):
    from mta.tap import default_config_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    assert default_config_path() == "/etc/mta/mta.toml"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mta.toml").write_text("")
    assert default_config_path() == "etc/mta.toml"
    monkeypatch.setenv("MTA_CONFIG", "/elsewhere.toml")
    assert default_config_path() == "/elsewhere.toml"


def test_tls_policy_and_mta_sts_keys():
    cfg = config.default()
    assert (cfg.relay.mta_sts, cfg.relay.mta_sts_port, cfg.tls_policy) == (True, 443, {})
    cfg = config.from_dict({"relay": {"mta_sts": False, "mta_sts_port": 8443},
                            "tls_policy": {"Example.COM.": "verify", "b.test": "sts"}})
    assert (cfg.relay.mta_sts, cfg.relay.mta_sts_port) == (False, 8443)
    assert cfg.tls_policy == {"example.com": "verify", "b.test": "sts"}


def test_tls_policy_entries_that_govern_nothing_are_warned_about(tmp_path):
    from mta.tap import config_warnings
    cfg = config.from_dict({
        "relay": {"smarthost": "smtp.isp.test:25"},
        "domains": {"local.test": {"route": f"maildir:{tmp_path}"},
                    "inner.test": {"route": "smtp:[10.0.0.5]"}},
        "tls_policy": {"local.test": "verify", "far.test": "encrypt", "inner.test": "sts",
                       "held.test": "verify"}})
    warnings = [w for w in config_warnings(cfg, None) if w.startswith("[tls_policy]")]
    assert warnings == [
        ('[tls_policy] "far.test": mail for far.test goes through the smart host, whose TLS '
        'is [relay] smarthost_tls; the entry has no effect'),
        ('[tls_policy] "held.test": mail for held.test goes through the smart host, whose TLS '
        'is [relay] smarthost_tls; the entry has no effect'),
        ('[tls_policy] "inner.test": MTA-STS governs delivery by MX only, and inner.test has '
        "the route smtp:[10.0.0.5]; its TLS is [relay] tls_verify's"),
        (f'[tls_policy] "local.test": mail for local.test is delivered here (maildir:{tmp_path});'
        " the entry has no effect")]


def test_receiver_process_is_a_server_key_and_its_turn_caveat_is_warned_about():
    from mta.tap import pickup_warnings
    settings = {"domains": {"cust.test": {"route": "hold", "pull_users": ["cust"]}}}
    one = config.from_dict({**settings, "server": {"receiver_process": False}})
    two = config.from_dict({**settings, "server": {"receiver_process": True}})
    assert two.server.two_processes is True
    assert pickup_warnings(one, None) == [
        ('pull_users are set but no listener offers ATRN: add one with role = "odmr" '
        "(port 366), or only TURN can pull")]
    assert pickup_warnings(two, None) == [
        ('pull_users are set but no listener offers ATRN: add one with role = "odmr" '
        "(port 366), or only TURN can pull, and TURN is refused with [server] receiver_process")]
    with pytest.raises(config.ConfigError, match="receiver_process"):
        config.from_dict({"server": {"receiver_process": "yes"}})
    with pytest.raises(config.ConfigError, match="receiver_process"):
        config.from_dict({"server": {"receiver_process": 1}})


def test_main_process_nice_is_a_step_count_from_0_to_19():
    assert config.from_dict({}).server.main_process_nice == 10
    assert config.from_dict({"server": {"main_process_nice": 0}}).server.main_process_nice == 0
    assert config.from_dict({"server": {"main_process_nice": 19}}).server.main_process_nice == 19
    for bad in (-1, 20, "10", True, 2.5):
        with pytest.raises(config.ConfigError, match=r"\[server\] main_process_nice"):
            config.from_dict({"server": {"main_process_nice": bad}})


@pytest.mark.parametrize(("cores", "pull_users", "expected"), [
    (2, [], True), (8, [], True), (1, [], False), (2, ["cust"], False)])
def test_receiver_process_auto_takes_a_second_core_unless_a_customer_may_turn(
        monkeypatch, cores, pull_users, expected):
    monkeypatch.setattr(config, "cores", lambda: cores)
    settings = {"domains": {"cust.test": {"route": "hold", "pull_users": pull_users}}}
    for server in ({}, {"receiver_process": "auto"}):
        parsed = config.from_dict({**settings, "server": server}).server
        assert parsed.two_processes is expected
        assert parsed.receiver_process == "auto"
    # Set by name, it is what it says, cores or not.
    for setting in (True, False):
        parsed = config.from_dict({**settings, "server": {"receiver_process": setting}}).server
        assert parsed.two_processes is setting


def test_receiver_process_auto_keeps_one_process_when_a_listener_would_stay_behind(
        monkeypatch):
    monkeypatch.setattr(config, "cores", lambda: 2)
    smtp = {"endpoint": "tcp:2525", "role": "smtp"}
    both = config.from_dict({"listeners": [smtp, {"endpoint": "unix:/run/mta.sock",
                                                  "role": "submission", "require_auth": False}]})
    assert both.server.two_processes is True
    assert config.where_sessions_run(both) == (
        'sessions in a receiving process (receiver_process "auto": 2 cores)')
    # An ATRN listener stays in the main process: its connections would be counted
    # apart from the smtp listener's, so "auto" keeps them all together.
    with_atrn = [smtp, {"endpoint": "tcp:2526", "role": "submission", "require_auth": False,
                        "atrn": True}]
    atrn = config.from_dict({"listeners": with_atrn})
    assert atrn.server.two_processes is False
    assert config.where_sessions_run(atrn) == (
        'sessions in the main process (receiver_process "auto": '
        "submission[tcp:2526] stays in the main process)")
    named = config.from_dict({"server": {"receiver_process": True},
                              "listeners": with_atrn})
    assert named.server.two_processes is True
    assert config.where_sessions_run(named) == (
        "sessions in a receiving process (receiver_process = true)")


def test_a_reload_names_what_auto_now_means_when_pull_users_change(monkeypatch):
    from mta.tap import _restart_needed
    monkeypatch.setattr(config, "cores", lambda: 2)
    pulled = {"domains": {"cust.test": {"route": "hold", "pull_users": ["cust"]}}}
    two, one = config.from_dict({}), config.from_dict(pulled)
    assert _restart_needed("receiver_process", two, one) == (
        '[server] receiver_process = "auto", which now gives sessions in the main process '
        '(receiver_process "auto": a domain has pull_users, who may pull with TURN)')
    assert _restart_needed("receiver_process", one, two) == (
        '[server] receiver_process = "auto", which now gives sessions in a receiving process '
        '(receiver_process "auto": 2 cores)')
    named = config.from_dict({"server": {"receiver_process": False}})
    assert _restart_needed("receiver_process", named, two) == "[server] receiver_process"

def _fake_cgroups(tmp_path: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo.replace("ROOT", str(tmp_path)))
    (proc / "cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc


def test_a_cgroup_v2_quota_along_the_path_limits_the_cores(tmp_path):
    proc = _fake_cgroups(
        tmp_path,
        "30 1 0:26 / ROOT/cg rw,nosuid - cgroup2 cgroup2 rw\n",
        "0::/system.slice/mta.service\n",
        {"cg/cpu.max": "max 100000\n",
         "cg/system.slice/cpu.max": "250000 100000\n",  # 2.5 CPUs for the slice
         "cg/system.slice/mta.service/cpu.max": "150000 100000\n"})  # 1.5 for the service
    assert config.cpu_quota(proc) == 1.5
    (tmp_path / "cg/system.slice/mta.service/cpu.max").write_text("max 100000\n")
    assert config.cpu_quota(proc) == 2.5


def test_a_cgroup_v1_quota_counts_and_none_is_no_limit(tmp_path):
    proc = _fake_cgroups(
        tmp_path,
        "31 1 0:27 / ROOT/cpu rw - cgroup cgroup rw,cpu,cpuacct\n",
        "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
        {"cpu/docker/abc/cpu.cfs_quota_us": "100000\n",
         "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
         "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert config.cpu_quota(proc) == 1.0
    (tmp_path / "cpu/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert config.cpu_quota(proc) is None
    assert config.cpu_quota(tmp_path / "no-such-proc") is None


def test_cores_are_the_affinity_cut_to_the_quota_rounded_up(monkeypatch):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for quota, expected in ((None, 4), (1.0, 1), (1.5, 2), (0.2, 1), (16.0, 4)):
        monkeypatch.setattr(config, "cpu_quota", lambda quota=quota: quota)
        assert config.cores() == expected
