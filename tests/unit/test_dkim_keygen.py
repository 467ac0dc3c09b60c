"""`mta dkim keygen` as an operator meets it: odd names, existing files, links."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import cli


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def keygen(*args: str) -> int:
    return cli.main(["--config", "none.toml", "dkim", "keygen", *args, "--type", "ed25519"])


def test_an_idn_domain_is_written_and_published_in_a_labels(here: Path, capsys) -> None:
    assert keygen("Bücher.Example.", "s1") == 0
    out = capsys.readouterr().out
    assert (here / "etc/dkim/xn--bcher-kva.example.s1.key").stat().st_mode & 0o777 == 0o600
    assert "name:  s1._domainkey.xn--bcher-kva.example." in out
    assert '[dkim."xn--bcher-kva.example"]' in out


@pytest.mark.parametrize("domain", ["../etc", "a/b", "", "exa mple.org", "b\u00fccher..example"])
def test_names_that_are_no_domain_are_refused(here: Path, capsys, domain: str) -> None:
    assert keygen(domain, "s1") == 2
    assert "not a valid domain name" in capsys.readouterr().err
    assert not (here / "etc").exists()


def test_a_dangling_link_is_not_replaced_without_force(here: Path, capsys) -> None:
    link = here / "key.pem"
    link.symlink_to(here / "elsewhere" / "nothing")
    assert keygen("example.org", "s1", "--output", str(link)) == 1
    assert "exists; --force replaces it" in capsys.readouterr().err
    assert link.is_symlink()
    assert keygen("example.org", "s1", "--output", str(link), "--force") == 0
    assert not link.is_symlink() and link.stat().st_mode & 0o777 == 0o600
    assert not (here / "elsewhere").exists()  # the link itself was replaced, not followed
