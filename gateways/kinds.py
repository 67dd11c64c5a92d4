"""The registry of gateway kinds: one line per kind (gateways/kind.py says what a kind declares).

To add a kind, write its module (its settings model and its ``KIND``) and
register it here. Nothing in ``firewall/`` names a kind.
"""

from __future__ import annotations

from firewall.fields import Frozen
from firewall.signalling import RuleMode
from gateways import tcp_relay, udp_relay
from gateways.ftp import kind as ftp
from gateways.kind import Kind, Registry
from tunnel import kind as tunnel


class NoSettings(Frozen):
    """A kind that takes no ``[gateway.settings]`` yet."""


KINDS = Registry()
KINDS.register(tcp_relay.KIND)
KINDS.register(udp_relay.KIND)
KINDS.register(ftp.KIND)
KINDS.register(tunnel.KIND)
# Kinds the config accepts whose gateways are not built yet: nfgate check
# passes them, nfgate run refuses them in one line. Each line gives way to
# its gateway's own registration when that lands.
KINDS.register(Kind("smtp", ("tcp",), NoSettings, gateway=None))
# The processor opens RTCP's port beside each RTP flow already (adjacent_port).
KINDS.register(Kind("rtp", ("udp",), NoSettings, gateway=None, adjacent_port=1, offload=True,
                    rule_modes=frozenset({RuleMode.REDIRECT, RuleMode.ALLOW})))
