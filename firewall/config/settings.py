"""Per-kind gateway settings: which protocols a kind's traffic selectors may
name, and the pydantic model of its ``[gateway.settings]``.

Each model lives with the gateway that uses it (gateways/settings.py,
tunnel/settings.py), with its defaults and one-line meanings written once;
docs/config.md lists the same. A key a kind does not declare is refused
like any unknown key; a key a kind once took is refused with what replaced
it (the models' ``Removed`` fields).
"""

from __future__ import annotations

from pydantic import BaseModel

from gateways.settings import FtpSettings, RtpSettings, SmtpSettings, TcpRelaySettings, UdpRelaySettings
from tunnel.settings import TunnelGatewaySettings

# kind -> (the transport protocols its traffic selectors may name, its settings model)
KINDS: dict[str, tuple[tuple[str, ...], type[BaseModel]]] = {
    "smtp": (("tcp",), SmtpSettings),
    "ftp": (("tcp",), FtpSettings),
    "rtp": (("udp",), RtpSettings),
    "tcp-relay": (("tcp",), TcpRelaySettings),
    "udp-relay": (("udp",), UdpRelaySettings),
    "tunnel": (("tcp", "udp"), TunnelGatewaySettings),
}
GATEWAY_KINDS = tuple(KINDS)

