"""Fixtures for integration tests: the real server run by twistd on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import MtaServer


@pytest.fixture
def start_mta(tmp_path: Path) -> Iterator[Callable[..., MtaServer]]:
    """start_mta(config=None, name="mta", **kw) -> a started MtaServer, stopped after the test.

    `config` is TOML text with ``{port}`` (and optionally ``{message_size}``)
    placeholders; without it a server with an smtp listener, example.org
    held for later delivery, and no outside DNS is used.
    """
    servers: list[MtaServer] = []

    def start(config: str | None = None, name: str = "mta", **kw) -> MtaServer:
        server = MtaServer(tmp_path / name, config, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def mta(start_mta: Callable[..., MtaServer]) -> MtaServer:
    return start_mta()
