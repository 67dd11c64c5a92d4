"""The tunnel gateway kind: the control server run as one more gateway (gateways/kind.py).

It terminates its flows (every selector ends at the router) and runs its
own process (``tunnel.service.run_gateway``); its settings are
``TunnelGatewaySettings`` (tunnel/settings.py, docs/config.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gateways.kind import Kind, Problem
from tunnel.settings import TunnelGatewaySettings


def _service_port_steered(gateway: Any) -> Iterator[Problem]:
    """The service port must reach it over TCP (the channel) and UDP (the UDP
    channels): docs/tunnel-protocol.md section 19."""
    port = gateway.settings.service_port
    for proto in ("tcp", "udp"):
        if not any(s.proto == proto and any(r.first <= port <= r.last for r in s.ports) for s in gateway.traffic):
            yield f"{gateway.source}.traffic", f"no {proto} selector brings settings.service_port {port} to the tunnel gateway"


KIND = Kind(
    "tunnel", ("tcp", "udp"), TunnelGatewaySettings, gateway="tunnel.service:run_gateway",
    standalone=True, terminates=True, check=_service_port_steered,
    ipv6=True,  # the server terminates its flows: nothing in them names the router's address (issue 17)
)
