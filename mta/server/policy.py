"""Who may send what to whom: the accept/reject decisions of an SMTP session.

Each check returns None to accept or the Reply that refuses.  The rules
(DESIGN.md section 8):

- Mail for a local domain (aliases.py: configured, our hostname and
  localhost, virtual alias domains) is accepted from anyone for the names
  that exist there: users, aliases, ``postmaster`` [RFC 5321 4.5.1]
  (550 5.1.1 otherwise; 550 5.4.6 for an alias that only loops).  A
  recipient is answered with its targets after aliases.
- Mail for any other domain is relaying: only for clients in `mynetworks`
  or authenticated sessions (554 5.7.1 otherwise).  No open relay, ever.
  `is_trusted` is that one predicate; the inbound checks ask it too.
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
from mta.aliases import LOCAL, LOOP, UNKNOWN, Target
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
                   authenticated: str | None) -> Reply | tuple[Target, ...]:
        """Where a recipient goes (its targets after aliases), or the Reply that refuses it."""
        found = self.config.addresses.resolve(str(mailbox))
        if found.kind == LOCAL:
            return found.targets
        if found.kind == UNKNOWN:
            return reply.NO_SUCH_USER
        if found.kind == LOOP:
            return reply.ALIAS_LOOP
        if self.is_trusted(client_address, authenticated):
            return found.targets
        return reply.RELAY_DENIED

    def is_trusted(self, client_address: str, submitter: str | None) -> bool:
        """Our own user or network: may relay, and is not checked as mail from outside
        (mta/checks/).  `submitter` is the AUTH identity or the local sendmail user."""
        return submitter is not None or self.config.is_mynetwork(client_address)

    def is_local(self, mailbox: Mailbox) -> bool:
        return self.config.addresses.is_local_domain(mailbox.domain_key)
