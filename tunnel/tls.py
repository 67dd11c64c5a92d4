"""TLS for the tunnel's TCP channel: pins and contexts.

The seed lets the mediator "inform the server 4 about its state and about its
environment ... through authentication or identification" (seed, Figure 2
description). Over the Internet that needs a channel nobody can read or
impersonate, so the TCP channel runs TLS 1.3 and:

- **The mediator pins the server's certificate**: the SHA-256 fingerprint of
  its DER encoding, written ``sha256:<64 hex digits>``. Nothing else is
  trusted, not even a certificate a public CA would accept: the mediator
  sends its token only to the one server its owner configured. The pin is
  checked after the handshake and *before* HELLO, so a wrong server never
  sees the token.
- **The server authenticates the mediator by its token** (checked in
  constant time, tunnel/policy.py) and, where the mediators file names one,
  by a client certificate compared the same way.

``nfgate tunnel keygen`` makes the keys and certificates (tunnel/keygen.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from pathlib import Path

from firewall.errors import UsageError

PIN_PREFIX = "sha256:"
PIN_RE = re.compile(r"^(?:sha256:)?((?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2})$")
# Both ends are nfgate: nothing older than TLS 1.3 needs to be spoken.
MIN_TLS = ssl.TLSVersion.TLSv1_3


class PinMismatch(Exception):
    """The server's certificate is not the pinned one."""

    def __init__(self, seen: str, wanted: str) -> None:
        super().__init__(f"server certificate {seen} does not match the pin {wanted}")
        self.seen = seen
        self.wanted = wanted


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate: the form pins are written in."""
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def parse_pin(text: str) -> bytes:
    """The 32 digest bytes of a pin; ``sha256:`` and colons are optional.

    Raises ValueError with a one-line reason.
    """
    match = PIN_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a pin (sha256: and 64 hex digits)")
    return bytes.fromhex(match.group(1).replace(":", ""))


def format_pin(digest: bytes) -> str:
    return PIN_PREFIX + digest.hex()


def pin_matches(der: bytes | None, pin: bytes) -> bool:
    """Constant-time comparison of a certificate's digest with a pin."""
    if not der:
        return False
    return hmac.compare_digest(hashlib.sha256(der).digest(), pin)


def check_server_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, pin: bytes) -> None:
    """Raise ``PinMismatch`` unless the peer's certificate has digest ``pin``."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not pin_matches(der, pin):
        seen = fingerprint(der) if der else "(no certificate)"
        raise PinMismatch(seen, format_pin(pin))


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """The peer's DER certificate, if it sent one."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True) or None


def read_pem_certificate(path: Path) -> bytes:
    """The DER bytes of the first certificate in a PEM file (UsageError if none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"certificate {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"certificate {path}: cannot read it ({err})") from None
    try:
        return ssl.PEM_cert_to_DER_cert(text)
    except ValueError:
        raise UsageError(f"certificate {path}: not a PEM certificate") from None


def file_pin(path: Path) -> str:
    """The pin of the certificate in ``path``."""
    return fingerprint(read_pem_certificate(path))


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    for path in (cert, key):
        if not path.is_file():
            raise UsageError(f"{what} {path}: no such file (make one with: nfgate tunnel keygen)")
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as err:
        raise UsageError(f"{what} {cert} / {key}: not a matching certificate and key ({err.reason})") from None
    except OSError as err:
        raise UsageError(f"{what} {cert} / {key}: {err.strerror or err}") from None


def server_context(cert: Path, key: Path, client_certs: list[Path] | tuple[Path, ...] = ()) -> ssl.SSLContext:
    """The control server's context.

    With ``client_certs``, mediators may present one of them: each
    self-signed certificate is its own trust anchor, so OpenSSL verifies the
    possession of its key, and the server then compares the exact
    certificate with the one the mediators file names for that identity.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    _load_chain(context, cert, key, "server certificate")
    if client_certs:
        pem = "".join(ssl.DER_cert_to_PEM_cert(read_pem_certificate(p)) for p in client_certs)
        context.load_verify_locations(cadata=pem)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The mediator's context: no CA, no host name; the pin is the check.

    ``check_server_pin`` must run on every connection before anything is
    sent: CERT_NONE here only means that trust comes from the pin alone.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MIN_TLS
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        _load_chain(context, cert, key, "client certificate")
    return context
