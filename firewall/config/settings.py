"""Per-kind gateway settings: the keys each gateway kind accepts, with defaults.

Each gateway kind declares its settings here as data: key, converter, default
and a one-line meaning (docs/config.md lists the same). A key a kind does not
declare is refused, like any unknown key. Kinds whose gateway comes with a
later issue declare their keys with that issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ValidationError

from firewall.config.reader import Problems, Table, choice, integer, join, listof, number, string
from gateways.rtp.settings import RtpSettings


@dataclass(frozen=True)
class Setting:
    convert: Callable[[Any, str, Problems], Any]
    default: Any
    meaning: str


# Which transport protocols each kind's traffic selectors may name.
KIND_PROTOS: dict[str, tuple[str, ...]] = {
    "smtp": ("tcp",),
    "ftp": ("tcp",),
    "rtp": ("udp",),
    "tcp-relay": ("tcp",),
    "udp-relay": ("udp",),
    "tunnel": ("tcp", "udp"),
}

_RELAY_TCP = {
    "max_connections": Setting(integer(1, 1_000_000), 1024, "concurrent connections; more are refused (RST)"),
    "idle_timeout": Setting(number(1, 86400), 300.0, "seconds without data in either direction before closing"),
    "connect_timeout": Setting(number(0.1, 300), 10.0, "seconds to open leg B to the server"),
}
_RELAY_UDP = {
    "max_flows": Setting(integer(1, 1_000_000), 4096, "concurrent UDP flows; more are dropped"),
    "idle_timeout": Setting(number(1, 86400), 60.0, "seconds without a datagram before the flow ends"),
}


_FTP_VERB = string(r"[A-Za-z]{3,4}", "an FTP command (3 or 4 letters, RFC 959 section 5.3.1)")

# The FTP gateway (gateways/ftp/, docs/ftp.md, with the RFC behind each limit).
_FTP = {
    "data_channel": Setting(choice("allow", "inspect"), "allow",
                            "allow: the kernel carries every data connection (the processor translates the router's address); inspect: all through the gateway"),
    "data_rule_ttl": Setting(integer(1, 3600), 15, "seconds a data-port rule waits for its one connection"),
    "auth_tls": Setting(choice("refuse", "allow"), "refuse", "refuse: AUTH answered 534 and hidden from FEAT; allow: opaque after 234"),
    "allow_commands": Setting(listof(_FTP_VERB), (), "verbs added to the default allow-list"),
    "deny_commands": Setting(listof(_FTP_VERB), (), "verbs removed from the allow-list"),
    "max_line_length": Setting(integer(64, 65536), 2048, "bytes of one command or reply line, line end excluded (RFC 959 section 5.3 sets no bound)"),
    "max_username_length": Setting(integer(1, 4096), 256, "bytes of a USER argument (RFC 2577 section 9: overflows in servers)"),
    "max_password_length": Setting(integer(1, 4096), 256, "bytes of a PASS argument (RFC 2577 section 9)"),
    "max_bad_commands": Setting(integer(0, 1000), 5, "refused commands answered; the next one closes the session (aiosmtpd's rule)"),
    "max_login_failures": Setting(integer(1, 100), 3, "failed logins (530 to PASS) before the session is closed (RFC 2577 section 5)"),
    "max_transfer_bytes": Setting(integer(0, 1 << 62), 0, "inspect: bytes one data connection may carry (0: no limit)"),
    "content_hook": Setting(string(r"([A-Za-z_][\w.]*:[A-Za-z_]\w*)?", "module:function"), "",
                            "inspect: module:function given each data connection's bytes"),
    "max_sessions": Setting(integer(1, 1_000_000), 256, "concurrent control sessions; more are refused (RST)"),
    "idle_timeout": Setting(number(1, 86400), 900.0, "seconds without traffic before a session is closed, or a relayed data connection reset"),
    "connect_timeout": Setting(number(0.1, 300), 10.0, "seconds to open a connection to the server"),
}

def _field(model: type[BaseModel], key: str) -> Callable[[Any, str, Problems], Any]:
    """A converter that checks one key by a kind's pydantic settings model."""
    def convert(value: Any, path: str, problems: Problems) -> Any:
        try:
            return getattr(model.model_validate({key: value}), key)
        except ValidationError as err:
            problems.add(path, err.errors()[0]["msg"])
            return None
    return convert


def from_model(model: type[BaseModel]) -> dict[str, Setting]:
    """A kind's settings as this module declares them, mirrored from its frozen pydantic model."""
    return {key: Setting(_field(model, key), f.default, f.description or "") for key, f in model.model_fields.items()}


KIND_SETTINGS: dict[str, dict[str, Setting]] = {
    "smtp": {},
    "ftp": _FTP,
    "rtp": from_model(RtpSettings),  # gateways/rtp/settings.py, docs/rtp.md
    "tcp-relay": _RELAY_TCP,
    "udp-relay": _RELAY_UDP,
    "tunnel": {
        "service_port": Setting(integer(1, 65535), 7443, "the port mediators connect to (TCP channel and UDP channels)"),
        "publish_first": Setting(integer(0, 65535), 0, "first public port a mediator may publish by default (0: none)"),
        "publish_last": Setting(integer(0, 65535), 0, "last public port a mediator may publish by default"),
        "max_ports": Setting(integer(0, 65535), 16, "ports one mediator may have open (opened plus redirected)"),
        "max_connections": Setting(integer(0, 1_000_000), 64, "TCP connections one mediator may relay at once"),
        "max_pending": Setting(integer(1, 65535), 32, "requests to one mediator waiting for an answer"),
        "bytes_per_second": Setting(number(1024, 1e12), 125_000_000, "relay rate per mediator, both directions together"),
        "burst_bytes": Setting(number(65536, 1e12), 4_194_304, "bytes a mediator may relay at full speed before the rate applies"),
        "hello_timeout": Setting(number(0.1, 600), 10.0, "seconds a new channel may take to send HELLO"),
        "dead_after": Setting(integer(1, 100), 3, "keepalive intervals without a frame before a mediator is dead"),
        "min_keepalive_interval": Setting(number(0.1, 3600), 1.0, "shortest keepalive interval a mediator may announce"),
        "max_keepalive_interval": Setting(number(0.1, 86400), 600.0, "longest keepalive interval a mediator may announce"),
        "request_timeout": Setting(number(0.1, 600), 10.0, "seconds to wait for a mediator's answer (and for a reconnect)"),
        "udp_idle_timeout": Setting(number(1, 86400), 60.0, "seconds without a datagram before a published UDP flow ends"),
        "max_channels": Setting(integer(1, 1_000_000), 4096, "TCP channels at once, authenticated or not"),
        "tls_read_buffer": Setting(integer(16384, 1 << 20), 65536, "bytes of read buffer each TLS channel keeps"),
        "republish_initial": Setting(number(0.01, 3600), 1.0, "first retry delay of a publication that could not start"),
        "republish_max": Setting(number(0.01, 86400), 60.0, "longest retry delay of such a publication"),
    },
}


# Keys a kind once took, with what to do instead: refused with that reason,
# which says more than "unknown key".
REMOVED_SETTINGS: dict[str, dict[str, str]] = {
    "ftp": {
        "masquerade_address": "no longer a setting: the processor tells the gateway the address it SNATs "
                              "each session to (signalling's snat field); delete this line",
    },
}


def read_settings(kind: str, table: Table) -> Mapping[str, Any] | None:
    schema = KIND_SETTINGS[kind]
    values = {key: table.take(key, s.convert, s.default) for key, s in schema.items()}
    for key, why in REMOVED_SETTINGS.get(kind, {}).items():
        if table.has(key):
            table.taken.add(key)
            table.problems.add(join(table.path, key), why)
    table.finish()
    if any(v is None for v in values.values()):
        return None
    return MappingProxyType(values)
