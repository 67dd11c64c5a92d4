"""The config's mail policy as the core's hooks (STYLE.md: policy separate from protocol).

``policy_of(settings)`` turns ``[gateway.settings]`` into a ``Policy``: the
limits as they are, and two hooks built from the domain lists:

- sender: refused with 550 5.7.1 if ``reject_senders`` names the address or
  its domain, or its domain is not in ``sender_domains``; the null sender
  ``<>`` (bounces, RFC 5321 section 4.5.5) is never asked about;
- recipient: refused with 550 5.7.1 if ``reject_recipients`` names it, and
  with "Relay access denied" if its domain is not in ``recipient_domains``
  (an empty list relays nothing: the safe default).

A list entry ``example.com`` is that domain, ``.example.com`` its
subdomains, ``*`` any domain; an entry with ``@`` is one address, compared
without regard to case (domains are case-insensitive, RFC 5321 section
2.4; local parts are the server's business, but a reject list that missed
``Spam@`` for ``spam@`` would be no list).
"""

from __future__ import annotations

from typing import Iterable

from gateways.smtp.model import Hook, Policy, Reply
from gateways.smtp.settings import SmtpSettings

SENDER_REFUSED = Reply(550, "5.7.1", "Sender address rejected")
SENDER_DOMAIN_REFUSED = Reply(550, "5.7.1", "Sender domain not allowed here")
RECIPIENT_REFUSED = Reply(550, "5.7.1", "Recipient address rejected")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")


def domain_of(mailbox: str) -> str:
    return mailbox.rpartition("@")[2].lower()


def domain_matches(domain: str, entries: Iterable[str]) -> bool:
    domain = domain.lower().rstrip(".")
    for entry in entries:
        entry = entry.lower()
        if entry == "*" or domain == entry or (entry.startswith(".") and domain.endswith(entry)):
            return True
    return False


def listed(mailbox: str, entries: Iterable[str]) -> bool:
    """Whether a reject list names ``mailbox`` or its domain."""
    entries = tuple(entries)
    addresses = {e.lower() for e in entries if "@" in e}
    domains = [e for e in entries if "@" not in e]
    return mailbox.lower() in addresses or domain_matches(domain_of(mailbox), domains)


def sender_hook(allowed: tuple[str, ...], rejected: tuple[str, ...]) -> Hook:
    def check(mailbox: str) -> Reply | None:
        if listed(mailbox, rejected):
            return SENDER_REFUSED
        if not domain_matches(domain_of(mailbox), allowed):
            return SENDER_DOMAIN_REFUSED
        return None

    return check


def recipient_hook(allowed: tuple[str, ...], rejected: tuple[str, ...]) -> Hook:
    def check(mailbox: str) -> Reply | None:
        if listed(mailbox, rejected):
            return RECIPIENT_REFUSED
        if not domain_matches(domain_of(mailbox), allowed):
            return RELAY_DENIED
        return None

    return check


def policy_of(settings: SmtpSettings, *, tls_available: bool = False) -> Policy:
    return Policy(
        starttls=settings.starttls,
        tls_available=tls_available,
        extensions=frozenset(settings.extensions),
        allow_vrfy=settings.allow_vrfy,
        allow_expn=settings.allow_expn,
        max_command_line=settings.max_command_line,
        max_text_line=settings.max_text_line,
        max_reply_line=settings.max_reply_line,
        max_message_size=settings.max_message_size,
        max_recipients=settings.max_recipients,
        max_messages=settings.max_messages,
        max_bad_commands=settings.max_bad_commands,
        sender=sender_hook(settings.sender_domains, settings.reject_senders),
        recipient=recipient_hook(settings.recipient_domains, settings.reject_recipients),
    )
