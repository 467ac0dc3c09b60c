"""The twistd entry point: command-line options and the service tree.

`makeService` reads the config (a bad one stops start-up with one line naming
the key), then builds, in start order: the relayer (whose start scans the
spool, so recovery finishes before any listener accepts a connection), then
one listening service per ``[[listeners]]`` entry.  This is the only module
that knows every part of mta.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.python import usage

from mta import config as config_module

DEFAULT_CONFIG = "etc/mta.toml"


def default_config_path() -> str:
    return os.environ.get("MTA_CONFIG") or DEFAULT_CONFIG


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "config file (default: $MTA_CONFIG, else etc/mta.toml)"],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = default_config_path()


def load_config_or_exit(path: str) -> config_module.Config:
    try:
        return config_module.load(path)
    except config_module.ConfigError as e:
        sys.stderr.write(f"mta: {e}\n")
        raise SystemExit(1) from None


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    from mta.delivery.scheduler import Relayer
    from mta.server.protocol import SMTPFactory
    from mta.server.session import ServerContext
    from mta.spool.store import Spool

    config = load_config_or_exit(options["config"])
    top = service.MultiService()
    spool = Spool(config.server.spool)
    relayer = Relayer(config, spool, reactor)
    relayer.setName("relayer")
    relayer.setServiceParent(top)
    for listener in config.listeners:
        context = ServerContext(config, listener, spool, on_queued=relayer.enqueue)
        factory = SMTPFactory(context)
        try:
            endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        except (ValueError, KeyError, TypeError) as e:
            sys.stderr.write(f"mta: {options['config']}: [[listeners]] endpoint: "
                             f"bad endpoint {listener.endpoint!r}: {e}\n")
            raise SystemExit(1) from None
        listening = StreamServerEndpointService(endpoint, factory)
        listening._raiseSynchronously = True
        listening.setName(listener.name)
        listening.setServiceParent(top)
    return top
