"""The smtp keys of ``[gateway.settings]``: one frozen pydantic model.

Every limit, timeout and policy knob of the smtp gateway, with its default
and a one-line meaning (docs/config.md and docs/smtp.md list the same, with
the RFC behind each limit). The gateway gets its settings as
``SmtpSettings.model_validate(manifest.settings)``. This module imports only
pydantic: the router's config loader can read the model without loading the
gateway.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# A mail domain as the policy lists name it: "example.com" (that domain),
# ".example.com" (its subdomains) or "*" (any).
DOMAIN_PATTERN = r"\*|\.?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
# A reject-list entry: an address (local@domain, compared without case) or a domain as above.
ADDRESS_PATTERN = r"[^@\s]{1,64}@(" + DOMAIN_PATTERN + r")|" + DOMAIN_PATTERN

# The extensions the gateway can check (docs/smtp.md, "Extensions"); STARTTLS
# has its own setting and CHUNKING needs BDAT, which the gateway does not relay.
KNOWN_EXTENSIONS = ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN")

Domain = Annotated[str, StringConstraints(pattern=rf"^({DOMAIN_PATTERN})$", max_length=255)]
Address = Annotated[str, StringConstraints(pattern=rf"^({ADDRESS_PATTERN})$", max_length=320)]
Extension = Literal["SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
StartTls = Literal["strip", "terminate", "passthrough"]


class SmtpSettings(BaseModel):
    """The smtp keys of ``[gateway.settings]`` (docs/smtp.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    starttls: StartTls = Field(
        "strip", description="strip: STARTTLS hidden and refused, so the gateway inspects; terminate: TLS on both "
        "legs with tls_certificate; passthrough: bytes only after STARTTLS (no inspection)")
    tls_certificate: str = Field("", description="terminate: PEM certificate chain shown to clients (relative to the config's directory)")
    tls_key: str = Field("", description="terminate: PEM private key of tls_certificate")
    extensions: tuple[Extension, ...] = Field(
        ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"),
        description="EHLO keywords passed on when the server offers them (SIZE, 8BITMIME, PIPELINING, "
        "ENHANCEDSTATUSCODES, SMTPUTF8, DSN); every other is removed")
    allow_vrfy: bool = Field(False, description="forward VRFY (RFC 5321 section 7.3); else the gateway answers 252")
    allow_expn: bool = Field(False, description="forward EXPN (RFC 5321 section 7.3); else the gateway answers 502")
    max_command_line: int = Field(512, ge=512, le=65536, description="bytes of a command line with CRLF (RFC 5321 section 4.5.3.1.4)")
    max_text_line: int = Field(1000, ge=1000, le=1_000_000, description="bytes of a message line with CRLF (RFC 5321 section 4.5.3.1.6)")
    max_reply_line: int = Field(512, ge=512, le=65536, description="bytes of a server reply line with CRLF (RFC 5321 section 4.5.3.1.5)")
    max_message_size: int = Field(26_214_400, ge=1024, le=1 << 40, description="bytes of one message; announced as SIZE, MAIL SIZE= checked (RFC 1870)")
    max_recipients: int = Field(100, ge=1, le=100_000, description="RCPTs per message; more get 452 (RFC 5321 section 4.5.3.1.8, 4.5.3.1.10)")
    max_messages: int = Field(1000, ge=1, le=1_000_000, description="messages (MAIL) per session; more get 452")
    max_bad_commands: int = Field(5, ge=0, le=1000, description="unknown or refused commands answered; the next one closes the session")
    idle_timeout: float = Field(300.0, ge=1, le=86400, description="seconds without a byte from the client before 421 and close (RFC 5321 section 4.5.3.2.7)")
    session_timeout: float = Field(3600.0, ge=1, le=604800, description="seconds a session may last in all")
    connect_timeout: float = Field(10.0, ge=0.1, le=300, description="seconds to open the connection to the server")
    max_sessions: int = Field(1024, ge=1, le=1_000_000, description="concurrent sessions; more are refused with 421")
    max_sessions_per_client: int = Field(32, ge=1, le=1_000_000, description="concurrent sessions from one client address; more are refused with 421")
    sender_domains: tuple[Domain, ...] = Field(("*",), description="domains MAIL FROM may name (\"*\": any; the null sender always passes)")
    recipient_domains: tuple[Domain, ...] = Field((), description="domains RCPT TO may name, i.e. what may be relayed (empty: none; \"*\": any)")
    reject_senders: tuple[Address, ...] = Field((), description="senders refused with 550: addresses or domains")
    reject_recipients: tuple[Address, ...] = Field((), description="recipients refused with 550: addresses or domains")
