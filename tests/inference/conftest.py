"""Shared fixtures: a CPU engine for each demo model (the models come from tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from inference.demo_models import DEMO_SPECS
from inference.engine import Engine

DEMO_NAMES = tuple(DEMO_SPECS)


@pytest.fixture(scope="session")
def engines(demo_dir: Path) -> Iterator[dict[str, Engine]]:
    """Return a running CPU engine per demo model, shared by tests that leave it as they found it."""
    running = {name: Engine(demo_dir / name, device="cpu") for name in DEMO_NAMES}
    yield running
    for engine in running.values():
        engine.close()


@pytest.fixture
def dense(engines: dict[str, Engine]) -> Engine:
    """Return the shared engine for the Llama-architecture demo model."""
    return engines["demo-dense"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion on a fresh event loop in its own thread.

    A thread of its own because other test packages (the browser tests' sync Playwright) may leave an event
    loop running in the main thread, where asyncio.run() refuses to start.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
