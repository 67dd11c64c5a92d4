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


class Domains:
    """A domain list (``example.com``, ``.example.com``, ``*``), lower-cased and sorted once:
    every MAIL and RCPT asks one, and each asking is then a set look-up and a suffix test."""

    __slots__ = ("any", "names", "suffixes")

    def __init__(self, entries: Iterable[str]) -> None:
        lowered = [entry.lower() for entry in entries]
        self.any = "*" in lowered
        self.names = frozenset(lowered)
        self.suffixes = tuple(entry for entry in lowered if entry.startswith("."))

    def __contains__(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return self.any or domain in self.names or domain.endswith(self.suffixes)


class RejectList:
    """A reject list: addresses (compared without case) and domains as in ``Domains``."""

    __slots__ = ("addresses", "domains")

    def __init__(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        self.addresses = frozenset(entry.lower() for entry in entries if "@" in entry)
        self.domains = Domains(entry for entry in entries if "@" not in entry)

    def __contains__(self, mailbox: str) -> bool:
        return mailbox.lower() in self.addresses or domain_of(mailbox) in self.domains


def domain_matches(domain: str, entries: Iterable[str]) -> bool:
    return domain in Domains(entries)


def listed(mailbox: str, entries: Iterable[str]) -> bool:
    """Whether a reject list names ``mailbox`` or its domain."""
    return mailbox in RejectList(entries)


def sender_hook(allowed: tuple[str, ...], rejected: tuple[str, ...]) -> Hook:
    allowed_domains, reject_list = Domains(allowed), RejectList(rejected)

    def check(mailbox: str) -> Reply | None:
        if mailbox in reject_list:
            return SENDER_REFUSED
        if domain_of(mailbox) not in allowed_domains:
            return SENDER_DOMAIN_REFUSED
        return None

    return check


def recipient_hook(allowed: tuple[str, ...], rejected: tuple[str, ...]) -> Hook:
    allowed_domains, reject_list = Domains(allowed), RejectList(rejected)

    def check(mailbox: str) -> Reply | None:
        if mailbox in reject_list:
            return RECIPIENT_REFUSED
        if domain_of(mailbox) not in allowed_domains:
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
