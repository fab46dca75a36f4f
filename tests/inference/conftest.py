"""Shared helpers of the engine tests (the engines themselves are fixtures in tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion on a fresh event loop in its own thread.

    A thread of its own because other test packages (the browser tests' sync Playwright) may leave an event
    loop running in the main thread, where asyncio.run() refuses to start.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
