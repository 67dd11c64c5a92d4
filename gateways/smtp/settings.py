"""The smtp keys of ``[gateway.settings]``: one frozen pydantic model.

Every limit, timeout and policy knob of the smtp gateway, with its default
and a one-line meaning (docs/config.md and docs/smtp.md list the same, with
the RFC behind each limit). The gateway gets its settings as
``SmtpSettings.model_validate(manifest.settings)``. ``KIND`` is the kind's
declaration (gateways/kind.py): this module is light, so the router's config
loader reads it without loading the gateway.
"""

from __future__ import annotations

from pydantic import Field

from firewall.fields import Bool, Choice, Frozen, Int, ListOf, Number, String
from gateways.kind import Kind

# A mail domain as the policy lists name it: "example.com" (that domain),
# ".example.com" (its subdomains) or "*" (any).
DOMAIN_PATTERN = r"\*|\.?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
# A reject-list entry: an address (local@domain, compared without case) or a domain as above.
ADDRESS_PATTERN = r"[^@\s]{1,64}@(" + DOMAIN_PATTERN + r")|" + DOMAIN_PATTERN

# The extensions the gateway can check (docs/smtp.md, "Extensions"); STARTTLS
# has its own setting. CHUNKING brings BDAT (RFC 3030), relayed by the core.
KNOWN_EXTENSIONS = ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "CHUNKING")

Domain = String(rf"(?=.{{1,255}}$)({DOMAIN_PATTERN})", 'a mail domain ("example.com", ".example.com" or "*")')
Address = String(rf"(?=.{{1,320}}$)({ADDRESS_PATTERN})", "an address (local@domain) or a mail domain")
Extension = Choice(*KNOWN_EXTENSIONS)
StartTls = Choice("strip", "terminate", "passthrough")
EventLoop = Choice("uvloop", "asyncio")


class SmtpSettings(Frozen):
    """The smtp keys of ``[gateway.settings]`` (docs/smtp.md)."""

    starttls: StartTls = Field(
        "strip", description="strip: STARTTLS hidden and refused, so the gateway inspects; terminate: TLS on both "
        "legs with tls_certificate; passthrough: bytes only after STARTTLS (no inspection)")
    tls_certificate: String() = Field("", description="terminate: PEM certificate chain shown to clients (relative to the config's directory)")
    tls_key: String() = Field("", description="terminate: PEM private key of tls_certificate")
    tls_server_ca: String() = Field(
        "", description="terminate: PEM CA file the server's certificate must chain to; empty: not verified "
        "(opportunistic TLS, as between MTAs, RFC 7435)")
    tls_server_name: String() = Field(
        "", description="terminate, with tls_server_ca: the name the server's certificate must carry (also sent as SNI); "
        "empty: the chain alone is checked")
    extensions: ListOf(Extension) = Field(
        ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"),
        description="EHLO keywords passed on when the server offers them (SIZE, 8BITMIME, PIPELINING, "
        "ENHANCEDSTATUSCODES, SMTPUTF8, DSN, CHUNKING); every other is removed")
    allow_vrfy: Bool = Field(False, description="forward VRFY (RFC 5321 section 7.3); else the gateway answers 252")
    allow_expn: Bool = Field(False, description="forward EXPN (RFC 5321 section 7.3); else the gateway answers 502")
    max_command_line: Int(512, 65536) = Field(512, description="bytes of a command line with CRLF (RFC 5321 section 4.5.3.1.4)")
    max_text_line: Int(1000, 1_000_000) = Field(1000, description="bytes of a message line with CRLF (RFC 5321 section 4.5.3.1.6)")
    max_reply_line: Int(512, 65536) = Field(512, description="bytes of a server reply line with CRLF (RFC 5321 section 4.5.3.1.5)")
    max_message_size: Int(1024, 1 << 40) = Field(26_214_400, description="bytes of one message; announced as SIZE, MAIL SIZE= checked (RFC 1870)")
    max_recipients: Int(1, 100_000) = Field(100, description="RCPTs per message; more get 452 (RFC 5321 section 4.5.3.1.8, 4.5.3.1.10)")
    max_messages: Int(1, 1_000_000) = Field(1000, description="messages (MAIL) per session; more get 452")
    max_bad_commands: Int(0, 1000) = Field(5, description="unknown or refused commands answered; the next one closes the session")
    idle_timeout: Number(1, 86400) = Field(300.0, description="seconds without a byte from the client before 421 and close (RFC 5321 section 4.5.3.2.7)")
    session_timeout: Number(1, 604800) = Field(3600.0, description="seconds a session may last in all")
    connect_timeout: Number(0.1, 300) = Field(10.0, description="seconds to open the connection to the server")
    buffer_high_water: Int(4096, 1 << 26) = Field(
        65536, description="bytes a leg may have unsent before neither leg is read (read again below a quarter): "
                           "what a peer that stops reading holds")
    max_sessions: Int(1, 1_000_000) = Field(1024, description="concurrent sessions; more are refused with 421")
    max_sessions_per_client: Int(1, 1_000_000) = Field(32, description="concurrent sessions from one client address; more are refused with 421")
    client_prefix6: Int(32, 128) = Field(
        64, description="an IPv6 client's address counts for max_sessions_per_client as its prefix of this length "
                        "(64: one site's subnet, which a host may fill with addresses at will; RFC 4291 section 2.5.1)")
    sender_domains: ListOf(Domain) = Field(("*",), description="domains MAIL FROM may name (\"*\": any; the null sender always passes)")
    recipient_domains: ListOf(Domain) = Field((), description="domains RCPT TO may name, i.e. what may be relayed (empty: none; \"*\": any)")
    reject_senders: ListOf(Address) = Field((), description="senders refused with 550: addresses or domains")
    reject_recipients: ListOf(Address) = Field((), description="recipients refused with 550: addresses or domains")
    event_loop: EventLoop = Field(
        "uvloop", description="the event loop the gateway process runs on: uvloop (libuv: about a quarter fewer "
                              "instructions per session and per message, docs/benchmarks.md) or asyncio")


def event_loop(settings: SmtpSettings) -> str:
    return settings.event_loop


KIND = Kind(
    "smtp", ("tcp",), SmtpSettings, gateway="gateways.smtp.gateway:SmtpGateway.for_gateway",
    ipv6=True,  # the dialogue names no address of the connection (EHLO's literal is the client's own word)
    event_loop=event_loop,
)
