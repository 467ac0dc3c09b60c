"""What a domain publishes so that the world trusts its mail: `mta records DOMAIN`.

`records(config, domain)` is the text of one domain's records, in zone-file
form, with comments saying what each is for, made from the config in force:

- MX: the domain's mail comes to ``[server] hostname`` [RFC 5321 5.1];
- SPF [RFC 7208]: ``v=spf1 mx -all`` for the domain (its mail leaves from its
  MX host), and ``v=spf1 a -all`` for the host name, which receivers check
  for our bounces (MAIL FROM:<>, RFC 7208 2.3); with a smart host, the
  domain's mail leaves from the provider's hosts instead, which the comment
  says to add;
- a domain that is not local here (a ``[dkim]`` domain whose mail this
  server only signs and sends, say for a LAN) gets no MX, an SPF record
  naming our host (``a:HOST``), and no MTA-STS records: an MX or a policy
  naming this host would send the domain's incoming mail where nobody takes
  it;
- DKIM [RFC 6376]: the record of each configured key (``[dkim."DOMAIN"]``),
  or the `mta dkim keygen` command that makes one;
- DMARC [RFC 7489]: ``p=none`` (or the policy asked for) with aggregate
  reports to the domain's postmaster;
- MTA-STS [RFC 8461]: the ``_mta-sts`` TXT record, the policy file to serve at
  ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (``mode: testing`` unless
  asked for ``enforce``), and the certificate that host needs.  The policy id
  is a digest of the policy text: it stays the same while the policy does and
  changes when it changes, which is what senders look at [RFC 8461 3.1].

It reads no DNS and changes nothing: the operator publishes, then checks
with ``dig``.
"""

from __future__ import annotations

import hashlib

from mta.config import Config

STS_MAX_AGE = 604800  # one week [RFC 8461 3.2: up to 31557600]
DMARC_POLICIES = ("none", "quarantine", "reject")
STS_MODES = ("testing", "enforce")


def default_domains(config: Config) -> list[str]:
    """The domains whose mail this server receives (Maildir routes) or signs (DKIM)."""
    local = [name for name, domain in config.domains.items() if domain.route.kind == "maildir"]
    return sorted(set(local) | set(config.dkim))


def sts_policy(config: Config, mode: str) -> str:
    """The policy file's text [RFC 8461 3.2]: CRLF line ends, our host as the one MX."""
    lines = ["version: STSv1", f"mode: {mode}", f"mx: {config.server.hostname}",
             f"max_age: {STS_MAX_AGE}"]
    return "".join(line + "\r\n" for line in lines)


def sts_id(policy: str) -> str:
    """An id that changes exactly when the policy does (1-32 alphanumerics, RFC 8461 3.1)."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def records(config: Config, domain: str, dmarc: str = "none", sts_mode: str = "testing") -> str:
    from mta import signing  # dkimpy: only here, for the DKIM records

    host = config.server.hostname.rstrip(".")
    out = [f"; {domain}: the records to publish (mta records {domain})"]
    if "." not in host:
        out.append(f"; [server] hostname is {host!r}: other servers need a fully qualified "
                   "name they can look up")
    receives = config.addresses.is_local_domain(domain)
    if receives:
        out += ["", "; Mail for the domain comes here (RFC 5321 5.1).",
                f"{domain}.  MX  10 {host}."]
    else:
        out += ["", (f"; {domain} is not a local domain of this config: its mail is received "
                    "elsewhere; keep the MX records it has (no MX here).")]

    out += ["", "; SPF (RFC 7208): the hosts that send the domain's mail."]
    if config.relay.smarthost:
        out.append(f"; Mail leaves through the smart host {config.relay.smarthost}: add what "
                   "its provider says to (often include:...), before -all.")
    if receives:
        out.append(f'{domain}.  TXT "v=spf1 mx -all"')
    else:
        out.append(f"; One SPF record per name: if {domain} has one, add a:{host} to it "
                   "(before its -all) instead.")
        out.append(f'{domain}.  TXT "v=spf1 a:{host} -all"')
    out.append(f'{host}.  TXT "v=spf1 a -all"  ; our bounces (MAIL FROM:<>) are checked by '
               "the HELO name")

    out += ["", "; DKIM (RFC 6376): the public half of each signing key."]
    table = signing.domain_keys(config, domain)
    if table is None:
        out.append(f"; no key signs {domain}'s mail: make one with "
                   f"`mta dkim keygen {domain} s1` and configure it")
    elif table.name != domain:
        out.append(f"; {domain}'s mail is signed with d={table.name}'s keys: their records "
                   f"belong to {table.name} (mta records {table.name})")
    else:
        for key in table.keys:
            out.append(f"; {key.path}: {key.describe()}")
            out.append(signing.zone_lines(key))

    out += ["", ("; DMARC (RFC 7489): what receivers do with mail that fails SPF and DKIM. "
                 "Start at p=none, read the reports, then quarantine, then reject.")]
    out.append(f'_dmarc.{domain}.  TXT "v=DMARC1; p={dmarc}; '
               f'rua=mailto:postmaster@{domain}"')

    if not receives:
        out += ["", (f"; MTA-STS (RFC 8461) is about mail sent to {domain}: its policy names "
                    f"the hosts that receive that mail, not this one; whoever runs them "
                    "publishes it.")]
        return "\n".join(out) + "\n"
    policy = sts_policy(config, sts_mode)
    out += ["", "; MTA-STS (RFC 8461): deliver to the domain's MX only over verified TLS.",
            f'_mta-sts.{domain}.  TXT "v=STSv1; id={sts_id(policy)}"',
            (f"; and a web server as mta-sts.{domain} (A/AAAA or CNAME), with a certificate "
             f"valid for that name, serving"),
            f"; https://mta-sts.{domain}/.well-known/mta-sts.txt as text/plain:"]
    out += [f";   {line}" for line in policy.splitlines()]
    out.append(f"; Senders then check the certificate of {host} too: [tls] certificate must "
               "be one they trust (a public CA's) for that name.")
    if sts_mode == "testing":
        out.append("; Once delivery works with mode: testing, serve mode: enforce "
                   "(mta records --sts enforce gives its id).")
    return "\n".join(out) + "\n"
