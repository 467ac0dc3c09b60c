"""Local delivery into Maildirs: durability and path safety."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config as config_module
from mta.delivery import maildir
from mta.delivery.outcome import Delivered, Failed
from mta.delivery.router import MAILDIR, NextHop


def hop(root: Path) -> NextHop:
    return NextHop(MAILDIR, f"maildir:{root}", "here.test", path=root)


def deliveries(root: Path, *addresses: str, users: tuple[str, ...] = ()) -> list[maildir.Delivery]:
    """What the courier hands over: each address with the mailbox aliases.py names."""
    cfg = config_module.from_dict({"server": {"hostname": "mx.here.test"}, "domains": {
        "here.test": {"route": f"maildir:{root}", "users": list(users)}}})
    return [maildir.Delivery(a, cfg.addresses.mailbox(a), "alice@far.test") for a in addresses]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.write_bytes(b"Subject: hi\r\n\r\nbody\r\n")
    return path


def test_new_maildir_directories_are_made_durable(tmp_path: Path, data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The message is fsync'd into new/, but a crash must not lose new/ itself,
    # nor the user's freshly created Maildir, nor the domain's root.
    synced: list[Path] = []
    monkeypatch.setattr(maildir, "fsync_dir", lambda p: synced.append(Path(p)))
    root = tmp_path / "mail" / "here.test"
    outcomes = maildir.deliver(hop(root), deliveries(root, "bob@here.test"), data, "mx.here.test")
    assert isinstance(outcomes[0], Delivered)
    assert str(tmp_path) not in outcomes[0].diagnostic  # reports never name our files
    user = root / "bob"
    assert {root.parent, root, user, user / "new"} <= set(synced)
    assert len(list((user / "new").iterdir())) == 1
    synced.clear()
    maildir.deliver(hop(root), deliveries(root, "bob@here.test"), data, "mx.here.test")
    assert synced == [user / "new"]  # an existing Maildir costs one directory fsync


@pytest.mark.parametrize("address", ["../x@here.test", "a/b@here.test", "..@here.test",
                                     ".hidden@here.test", '"../../etc"@here.test',
                                     "+tag@here.test", "a\0b@here.test"])
def test_local_part_never_escapes_the_root(tmp_path: Path, data: Path, address: str) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    outcome = maildir.deliver(hop(root), deliveries(root, address), data, "mx.here.test")[0]
    assert isinstance(outcome, Failed) and outcome.status == "5.1.3"
    assert sorted(tmp_path.iterdir()) == sorted([data, root])
    assert list(root.iterdir()) == []


def test_unknown_user_and_line_ends(tmp_path: Path, data: Path) -> None:
    root = tmp_path / "mail"
    outcomes = maildir.deliver(hop(root), deliveries(root, "carol@here.test", "Bob+news@here.test",
                                                     users=("bob",)), data, "mx.here.test")
    assert isinstance(outcomes[0], Failed) and outcomes[0].status == "5.1.1"
    assert isinstance(outcomes[1], Delivered)
    (message,) = (root / "bob" / "new").iterdir()
    assert message.read_bytes() == (b"Return-Path: <alice@far.test>\nDelivered-To: "
                                    b"Bob+news@here.test\nSubject: hi\n\nbody\n")
