"""twistd plugin for mta: `twistd -n mta --config etc/mta.toml`.

Only a ServiceMaker naming mta.tap lives here, so that plugin discovery
imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

mta = ServiceMaker(
    "mta",
    "mta.tap",
    "mta: an ESMTP mail transfer agent with a durable spool and a relayer",
    "mta",
)
