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
from gateways.smtp import settings as smtp
from tunnel import kind as tunnel


class NoSettings(Frozen):
    """A kind that takes no ``[gateway.settings]`` yet."""


KINDS = Registry()
KINDS.register(tcp_relay.KIND)
KINDS.register(udp_relay.KIND)
KINDS.register(ftp.KIND)
KINDS.register(tunnel.KIND)
KINDS.register(smtp.KIND)
# A kind the config accepts whose gateway is not built yet: nfgate check
# passes it, nfgate run refuses it in one line. The line gives way to its
# gateway's own registration when that lands.
# The processor opens RTCP's port beside each RTP flow already (adjacent_port).
KINDS.register(Kind("rtp", ("udp",), NoSettings, gateway=None, adjacent_port=1, offload=True,
                    rule_modes=frozenset({RuleMode.REDIRECT, RuleMode.ALLOW})))
