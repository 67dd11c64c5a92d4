"""What the binding table holds, read with `nft -j` in a lab router: for tests.

Dynamic rules are elements of the table's per-instance sets and maps
(firewall/rules/bind.py); ``dynamic_elements`` lists them as
``"<set>: <element>"`` strings, so a test can count them and read them.
"""

from __future__ import annotations

import json
from typing import Any

from firewall.rules import bind


def dynamic_elements(lab: Any, host: str = "router") -> list[str]:
    """Every dynamic rule's element, in the IPv4 table and the IPv6 one."""
    found = []
    for family, table in ((bind.FAMILY, bind.TABLE), (bind.FAMILY6, bind.TABLE6)):
        out = lab.run(host, ["nft", "-j", "list", "table", family, table], check=False).stdout
        if not out:
            continue
        for item in json.loads(out)["nftables"]:
            obj = item.get("set") or item.get("map")
            if obj is None or not obj["name"].startswith(bind.DYN_KINDS):
                continue
            for elem in obj.get("elem", []):
                found.append(f"{obj['name']}: {json.dumps(elem, sort_keys=True)}")
    return found
