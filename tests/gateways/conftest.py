"""Fixtures of the gateway tests: the event log, captured."""

from __future__ import annotations

import logging
import pytest


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The gateways' events (``nfgate.gateways``), captured; read them with ``process.events``."""
    caplog.set_level(logging.INFO, logger="nfgate.gateways")
    return caplog

