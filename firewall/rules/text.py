"""Text shared by the renderers of nft rules (``nft``, ``fast``)."""

from __future__ import annotations


def quote(text: str) -> str:
    """``text`` as an nft string. Config names are restricted to [A-Za-z0-9_.-]
    (firewall.fields), so only a comment can hold a double quote: it becomes a single one."""
    return '"' + text.replace('"', "'") + '"'
