"""A non-blocking TCP connect, waited for on the running loop: the gateways' leg B and the tunnel mediator's.

- ``IP_BIND_ADDRESS_NO_PORT``: set before a bind to an address with port 0,
  so the connect chooses the port for its own 4-tuple. A bind alone picks
  one that no socket holds, whatever its destination, TIME_WAIT ones
  included: 1-7 ms of system time a bind once thousands are in TIME_WAIT
  (docs/benchmarks.md, issue 14, ninth pass).
- ``wait_connected``: the writer callback and ``SO_ERROR`` that finish a
  connect begun with ``connect_ex`` (or a ``connect`` that raised
  ``BlockingIOError``). Neither loop's ``sock_connect``: uvloop's resolves
  even a numeric address in its resolver's threads.
"""

from __future__ import annotations

import asyncio
import os
import socket

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def wait_connected(sock: socket.socket, timeout: float | None = None) -> None:
    """Until ``sock``'s connect is done. OSError as the kernel said, TimeoutError
    after ``timeout`` seconds; the socket is left to the caller either way.

    A timer on the future, not ``wait_for`` (a task of its own per connect)
    nor ``asyncio.timeout`` (a context manager that looks up the loop and the
    task three times, each a getpid in Python 3.11)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    writable: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _resolve_once, writable)
    timer = loop.call_later(timeout, _expire, writable) if timeout is not None else None
    try:
        await writable
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
