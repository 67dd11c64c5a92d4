"""Each gateway kind's ``[gateway.settings]``: one pydantic model per kind.

A model's fields are the keys the kind accepts, each with its default and
its one-line meaning (docs/config.md lists the same; the JSON Schema of
``nfgate config schema`` carries them). A key a kind does not declare is
refused like any unknown key. The config loader validates a gateway's
settings with its kind's model; the manifest carries them as JSON values,
and the gateway validates those with the same model.

The models live here, not beside their gateways (``tcp_relay``, ``ftp/``),
because the router's config loader imports them, and the gateway modules
import the deNAT/reNAT layer, which imports the config: beside them they
would close an import circle. Each gateway module re-exports its own.
"""

from __future__ import annotations

from pydantic import Field

from firewall.fields import Choice, Frozen, Int, ListOf, Number, Removed, String


class SmtpSettings(Frozen):
    """The smtp gateway takes no settings yet (its gateway comes with a later issue)."""


class RtpSettings(Frozen):
    """The rtp gateway takes no settings yet (its gateway comes with a later issue)."""


RelayMode = Choice("relay", "log-only")


class TcpRelaySettings(Frozen):
    """The tcp-relay keys of ``[gateway.settings]``."""

    max_connections: Int(1, 1_000_000) = Field(1024, description="concurrent connections; more are refused (RST)")
    idle_timeout: Number(1, 86400) = Field(300.0, description="seconds without data in either direction before closing")
    connect_timeout: Number(0.1, 300) = Field(10.0, description="seconds to open leg B to the server")
    mode: RelayMode = Field(
        "relay", description="relay: every connection through the gateway; log-only: the kernel carries it, "
        "the gateway logs it (docs/datapath.md, \"Log-only gateways\")")


class UdpRelaySettings(Frozen):
    """The udp-relay keys of ``[gateway.settings]``."""

    max_flows: Int(1, 1_000_000) = Field(4096, description="concurrent UDP flows; more are dropped")
    idle_timeout: Number(1, 86400) = Field(60.0, description="seconds without a datagram before the flow ends")
    offload_after: Int(0, 1_000_000) = Field(
        0, description="datagrams relayed each way before the flow is handed to the kernel (0: never)")


FtpVerb = String(r"[A-Za-z]{3,4}", "an FTP command (3 or 4 letters, RFC 959 section 5.3.1)")
DataChannel = Choice("allow", "inspect")
AuthTls = Choice("refuse", "allow")
HookName = String(r"([A-Za-z_][\w.]*:[A-Za-z_]\w*)?", "module:function")
GoneMasquerade = Removed(
    "no longer a setting: the processor tells the gateway the address it SNATs "
    "each session to (signalling's snat field); delete this line"
)


class FtpSettings(Frozen):
    """The ftp keys of ``[gateway.settings]`` (docs/ftp.md, with the RFC behind each limit).

    ``gateways.ftp.model.Policy`` takes its defaults from here.
    """

    data_channel: DataChannel = Field(
        "allow", description="allow: the kernel carries every data connection (the processor translates "
        "the router's address); inspect: all through the gateway")
    data_rule_ttl: Int(1, 3600) = Field(15, description="seconds a data-port rule waits for its one connection")
    auth_tls: AuthTls = Field(
        "refuse", description="refuse: AUTH answered 534 and hidden from FEAT; allow: opaque after 234")
    allow_commands: ListOf(FtpVerb) = Field((), description="verbs added to the default allow-list")
    deny_commands: ListOf(FtpVerb) = Field((), description="verbs removed from the allow-list")
    max_line_length: Int(64, 65536) = Field(
        2048, description="bytes of one command or reply line, line end excluded (RFC 959 section 5.3 sets no bound)")
    max_username_length: Int(1, 4096) = Field(
        256, description="bytes of a USER argument (RFC 2577 section 9: overflows in servers)")
    max_password_length: Int(1, 4096) = Field(256, description="bytes of a PASS argument (RFC 2577 section 9)")
    max_bad_commands: Int(0, 1000) = Field(
        5, description="refused commands answered; the next one closes the session (aiosmtpd's rule)")
    max_login_failures: Int(1, 100) = Field(
        3, description="failed logins (530 to PASS) before the session is closed (RFC 2577 section 5)")
    max_transfer_bytes: Int(0, 1 << 62) = Field(
        0, description="inspect: bytes one data connection may carry (0: no limit)")
    content_hook: HookName = Field(
        "", description="inspect: module:function given each data connection's bytes")
    max_sessions: Int(1, 1_000_000) = Field(256, description="concurrent control sessions; more are refused (RST)")
    idle_timeout: Number(1, 86400) = Field(
        900.0, description="seconds without traffic before a session is closed, or a relayed data connection reset")
    connect_timeout: Number(0.1, 300) = Field(10.0, description="seconds to open a connection to the server")

    masquerade_address: GoneMasquerade = Field(None, repr=False, exclude=True)
