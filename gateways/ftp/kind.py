"""The ftp gateway kind: its settings and its declaration (gateways/kind.py).

``FtpSettings`` are the ftp keys of ``[gateway.settings]`` (docs/ftp.md and
docs/config.md, with the RFC behind each limit); ``gateways.ftp.model.Policy``
takes its defaults from them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, PlainSerializer

from firewall.fields import Bool, Choice, Frozen, Int, ListOf, Number, PortRange, Removed, SinglePortRange, String, fail
from firewall.signalling import RuleMode
from gateways.kind import Kind

FtpVerb = String(r"[A-Za-z]{3,4}", "an FTP command (3 or 4 letters, RFC 959 section 5.3.1)")
DataChannel = Choice("allow", "inspect")
DataMode = Choice("keep", "active", "passive")
AuthTls = Choice("refuse", "allow")
HookName = String(r"([A-Za-z_][\w.]*:[A-Za-z_]\w*)?", "module:function")


def _data_ports(rng: PortRange) -> PortRange:
    if rng.first < 1024:  # RFC 2577 section 3, as for the ports the peers name
        fail(f"{rng} reaches below 1024: data connections stay off well-known ports")
    return rng


# Written as "first-last" in the manifest, which the gateway validates again.
DataPorts = Annotated[SinglePortRange, AfterValidator(_data_ports), PlainSerializer(str, return_type=str)]
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
    data_mode: DataMode = Field(
        "keep", description="keep: the client's mode; active: a client's PASV/EPSV reaches the server as PORT "
        "(an active-only server); passive: a client's PORT/EPRT reaches the server as PASV (a passive-only "
        "server), the gateway opens both data connections; translated ones run through the gateway")
    translated_ports: DataPorts = Field(
        PortRange(32768, 60999), description="data_mode active: the ports the gateway announces for a translated "
        "data connection, to the server (at the client's side) and to the client (at S')")
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
    connect_timeout: Number(0.1, 300) = Field(10.0, description="seconds to open a connection to the server; data_mode passive: also each data connection the gateway opens, at most half of data_rule_ttl")
    mask_private_addresses: Bool = Field(
        True, description="sessions through a port forward: the server's address in a reply becomes the address "
        "the client connected to, other private addresses (RFC 1918, RFC 6598, link-local) 0.0.0.0, IPv6 ones "
        "(unique local, link-local) ::")

    masquerade_address: GoneMasquerade = Field(None, repr=False, exclude=True)


KIND = Kind(
    "ftp", ("tcp",), FtpSettings, gateway="gateways.ftp.gateway:FtpGateway.for_gateway",
    # Its data connections: through the gateway (inspect) or the kernel (allow).
    rule_modes=frozenset({RuleMode.REDIRECT, RuleMode.ALLOW, RuleMode.ORIGINATE}),
    # Sessions are independent (a REDIRECTed data connection comes back to
    # the worker that asked for it): several workers, one crash cuts one's.
    workers=True,
    # Over IPv6: EPRT/EPSV with |2| addresses (RFC 2428), PORT and PASV refused;
    # its data rules in the IPv6 binding table (docs/ftp.md, "IPv6").
    ipv6=True,
)
