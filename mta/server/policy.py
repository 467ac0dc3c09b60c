"""Who may send what to whom: the accept/reject decisions of an SMTP session.

Each check returns None to accept or the Reply that refuses.  The rules
(DESIGN.md section 8):

- Mail for a configured domain is accepted from anyone; for a Maildir
  domain with a `users` list, only for those users (550 5.1.1 otherwise).
  ``postmaster`` is always accepted [RFC 5321 4.5.1].
- Mail for any other domain is relaying: only for clients in `mynetworks`
  or authenticated sessions (554 5.7.1 otherwise).  No open relay, ever.
- A listener with `require_auth` refuses MAIL before AUTH (530 5.7.0).
- A declared SIZE above the limit is refused at MAIL (552 5.3.4) [RFC 1870].
"""

from __future__ import annotations

from mta import reply
from mta.address import Mailbox
from mta.config import Config, Listener
from mta.reply import Reply


class Policy:
    def __init__(self, config: Config, listener: Listener) -> None:
        self.config = config
        self.listener = listener

    def check_mail(self, authenticated: str | None, declared_size: int | None) -> Reply | None:
        if self.listener.require_auth and authenticated is None:
            return reply.AUTH_REQUIRED
        if declared_size is not None and declared_size > self.config.limits.message_size:
            return reply.MESSAGE_TOO_BIG
        return None

    def check_rcpt(self, mailbox: Mailbox, client_address: str,
                   authenticated: str | None) -> Reply | None:
        if mailbox.is_postmaster and (not mailbox.domain or self.is_local(mailbox)):
            return None
        domain = self.config.domain_for(mailbox.domain_key)
        if domain is not None:
            if domain.route.kind == "maildir" and domain.users and \
                    mailbox.local.lower() not in {u.lower() for u in domain.users}:
                return reply.NO_SUCH_USER
            return None
        if authenticated is not None or self.config.is_mynetwork(client_address):
            return None
        return reply.RELAY_DENIED

    def is_local(self, mailbox: Mailbox) -> bool:
        key = mailbox.domain_key
        return key == self.config.server.hostname.lower() or self.config.domain_for(key) is not None

    def postmaster(self) -> str:
        """Where mail to the bare ``<postmaster>`` goes."""
        return self.config.server.postmaster or f"postmaster@{self.config.server.hostname}"
