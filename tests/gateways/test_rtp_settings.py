"""RtpSettings (gateways/rtp/settings.py), and the config loader's mirror of it (firewall/config/settings.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from firewall.config import ConfigError, loads
from gateways.rtp.parse import payload_type_mask
from gateways.rtp.settings import Policy, RtpSettings

CONFIG = """
[zones.wan]
interfaces = ["wan0"]

[zones.lan]
interfaces = ["lan0"]

[[gateway]]
name = "rtp"
kind = "rtp"
[[gateway.traffic]]
from = "wan"
to = "lan"
proto = "udp"
ports = "5004-5005"
[gateway.settings]
"""


def test_the_defaults_make_the_default_policy() -> None:
    assert RtpSettings().policy() == Policy()
    assert Policy().payload_types == payload_type_mask(("0-63", "96-127"))


def test_the_model_is_frozen_and_refuses_unknown_keys() -> None:
    s = RtpSettings()
    with pytest.raises(ValidationError):
        s.no_media_timeout = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        RtpSettings.model_validate({"no_media_timout": 3})


@pytest.mark.parametrize(
    "key, ok, bad",
    [
        ("no_media_timeout", 1, 0.999),
        ("no_media_timeout", 86400, 86401),
        ("adjacent_rule_ttl", 3600, 3601),
        ("adjacent_rule_ttl", 1, 0),
        ("max_packet_rate", 1, 0.5),
        ("max_packet_burst", 1, 0),
        ("max_flows", 1_000_000, 1_000_001),
    ],
)
def test_limits_at_the_bound_and_one_past_it(key: str, ok: float, bad: float) -> None:
    assert getattr(RtpSettings.model_validate({key: ok}), key) == ok
    with pytest.raises(ValidationError):
        RtpSettings.model_validate({key: bad})


def test_numbers_are_numbers_and_choices_are_choices() -> None:
    for doc in ({"max_flows": True}, {"max_flows": "7"}, {"no_media_timeout": "5"}, {"adjacent": "kernel"},
                {"ssrc_change": "maybe"}, {"rtcp_source_port": "random"}, {"rtcp_feedback": True}):
        with pytest.raises(ValidationError):
            RtpSettings.model_validate(doc)


def test_payload_types_are_numbers_or_ranges_in_0_127() -> None:
    assert RtpSettings.model_validate({"payload_types": ["0", "8", "96-127"]}).policy().payload_types == (
        payload_type_mask(("0", "8", "96-127"))
    )
    for bad in ([], ["128"], ["96-"], ["x"], ["100-99"], ["-1"], [" 8"]):
        with pytest.raises(ValidationError):
            RtpSettings.model_validate({"payload_types": bad})


def test_the_config_loader_takes_the_keys_and_fills_the_defaults() -> None:
    config = loads(CONFIG + 'adjacent = "processor"\nno_media_timeout = 5\npayload_types = ["0", "101"]\n')
    settings = dict(config.gateways[0].settings)
    assert settings["adjacent"] == "processor" and settings["no_media_timeout"] == 5.0
    assert settings["payload_types"] == ("0", "101")
    assert settings["max_flows"] == 4096
    assert RtpSettings.model_validate(settings) == RtpSettings(adjacent="processor", no_media_timeout=5.0,
                                                               payload_types=("0", "101"))


def test_the_config_loader_says_what_is_wrong_with_a_key() -> None:
    with pytest.raises(ConfigError) as info:
        loads(CONFIG + 'adjacent = "kernel"\nmax_flows = 0\nspeed = 1\n')
    found = {p.path: p.reason for p in info.value.problems}
    assert found["gateway[0].settings.adjacent"] == "'kernel' is not one of 'gateway', 'processor'"
    assert found["gateway[0].settings.max_flows"] == "0 is out of range (1 to 1000000)"
    assert found["gateway[0].settings.speed"] == "unknown key"
