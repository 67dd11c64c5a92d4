"""Poll for a condition instead of sleeping a fixed time.

Lab code and tests must not guess how long the kernel or a peer takes (a veth
link comes up when linkwatch runs, a server binds when it is ready). They ask
the question again until the answer is yes, within a bound on both time and
the number of attempts, and fail naming what they were waiting for.
"""

from __future__ import annotations

import math
import time
from typing import Callable, TypeVar

T = TypeVar("T")

# The first retries come quickly because most conditions are met within a few
# milliseconds; the interval then doubles up to the caller's ceiling.
_FIRST_INTERVAL = 0.005


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.1,
    what: str = "a condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds. Exceptions
    listed in ``ignore`` (say ConnectionRefusedError while a server starts)
    count as "not yet"; the last one is quoted in the TimeoutError.
    """
    if timeout <= 0 or interval <= 0:
        raise ValueError("wait_for: timeout and interval must be positive")
    deadline = time.monotonic() + timeout
    # A hard cap on attempts too, so a predicate that returns at once can never
    # spin, whatever the clock does.
    max_attempts = math.ceil(timeout / _FIRST_INTERVAL) + 2
    delay = min(_FIRST_INTERVAL, interval)
    last_error: BaseException | None = None
    for _ in range(max_attempts):
        try:
            value = predicate()
        except ignore as err:
            last_error = err
        else:
            if value:
                return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, interval)
    detail = f" (last error: {last_error})" if last_error is not None else ""
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
