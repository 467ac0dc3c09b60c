"""The sendmail socket: stale sockets, a live one, reachability, peer credentials."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.error import CannotListenError

from mta.server import local


def test_a_socket_left_by_a_killed_server_is_removed(tmp_path):
    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    local._clear_stale(path)
    assert not path.exists()


def test_a_live_socket_means_another_server(tmp_path):
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(CannotListenError, match="another server"):
            local._clear_stale(path)
    finally:
        live.close()


def test_a_file_that_is_no_socket_is_left_alone(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("precious")
    with pytest.raises(CannotListenError, match="not a socket"):
        local._clear_stale(path)
    assert path.read_text() == "precious"


def test_unreachable_directory_is_named(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    why = local.reachable_by_others(closed / "public" / "s.sock")
    assert why is not None and str(closed) in why and "chmod o+x" in why


def test_peer_credentials_name_the_user():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        class Transport:
            def getHandle(self):
                return a
        user = local.peer_user(Transport())
        assert user is not None and user.uid == os.getuid() and user.pid == os.getpid()
        assert str(user).startswith(f"uid={os.getuid()} (")
    finally:
        a.close()
        b.close()
