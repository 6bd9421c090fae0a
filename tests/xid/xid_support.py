"""Helpers shared by the XID tests."""

from __future__ import annotations

import time
from collections.abc import Callable

DEADLINE = 5.0


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.002)
