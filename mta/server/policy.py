"""Who may send what to whom: the accept/reject decisions of an SMTP session.

Each check returns None to accept or the Reply that refuses.  The rules
(DESIGN.md section 8):

- Mail for a configured domain is accepted from anyone; for a Maildir
  domain with a `users` list, only for those users (550 5.1.1 otherwise).
  ``postmaster`` is always accepted [RFC 5321 4.5.1].
- Mail for any other domain is relaying: only for clients in `mynetworks`
  or authenticated sessions (554 5.7.1 otherwise).  No open relay, ever.
- A listener with `require_auth` refuses MAIL before AUTH (530 5.7.0).
- With ``[auth] sender_restriction``, an authenticated user may use only
  their own addresses as the reverse-path (553 5.7.1 otherwise): USER@ any
  configured domain or our hostname, the user name itself when it is an
  address, and what ``[auth.senders]`` lists for the user (``addr@dom`` or
  ``@dom`` for a whole domain).  The null path ``<>`` is always allowed: it
  claims nobody.  Unauthenticated sessions are not affected (mail from the
  internet on port 25; `require_auth` is what closes the submission ports).
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

    def check_mail(self, authenticated: str | None, reverse_path: Mailbox | None,
                   declared_size: int | None) -> Reply | None:
        """`reverse_path` None is the null path ``<>``."""
        if self.listener.require_auth and authenticated is None:
            return reply.AUTH_REQUIRED  # RFC 4954 6
        if self.config.auth.sender_restriction and authenticated is not None \
                and reverse_path is not None and not self.may_send_as(authenticated, reverse_path):
            return reply.SENDER_NOT_OWNED
        if declared_size is not None and declared_size > self.config.limits.message_size:
            return reply.MESSAGE_TOO_BIG
        return None

    def may_send_as(self, user: str, sender: Mailbox) -> bool:
        """Whether `user` owns `sender` (domains and local parts compared without case)."""
        local, domain = sender.local.lower(), sender.domain_key
        address = f"{local}@{domain}"
        if address == user.lower():
            return True
        if local == user.lower() and self.is_local(sender):
            return True
        for pattern in self.config.auth.senders.get(user, ()):
            if pattern.startswith("@"):
                if domain == pattern[1:]:
                    return True
            elif pattern.lower() == address:
                return True
        return False

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
