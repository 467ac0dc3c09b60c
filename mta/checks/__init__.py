"""Inbound mail authentication on port 25 (DESIGN.md 12): SPF, DKIM, DMARC.

The checks an MX makes on mail from the outside, each with the library made
for it and every DNS lookup through the configured resolver (mta.resolver):

- spf.py: SPF [RFC 7208] of the MAIL FROM identity (pyspf);
- dkimverify.py: every DKIM-Signature [RFC 6376 6] (dkimpy);
- dmarc.py and psl.py: DMARC [RFC 7489] with the public suffix list;
- authresults.py: the Authentication-Results field [RFC 8601] (authres);
- inbound.py: when they run in an SMTP transaction, in their own thread
  pool, and what the ``[checks]`` policy makes of their results.
"""
