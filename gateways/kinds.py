"""The registry of gateway kinds: one line per kind (gateways/kind.py says what a kind declares).

To add a kind, write its module (its settings model and its ``KIND``) and
register it here. Nothing in ``firewall/`` names a kind.
"""

from __future__ import annotations

from gateways import tcp_relay, udp_relay
from gateways.ftp import kind as ftp
from gateways.kind import Registry
from gateways.rtp import settings as rtp
from gateways.smtp import settings as smtp
from tunnel import kind as tunnel


KINDS = Registry()
KINDS.register(tcp_relay.KIND)
KINDS.register(udp_relay.KIND)
KINDS.register(ftp.KIND)
KINDS.register(tunnel.KIND)
KINDS.register(smtp.KIND)
KINDS.register(rtp.KIND)
