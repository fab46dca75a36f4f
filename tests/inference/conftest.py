"""Shared fixtures: a CPU engine for each demo model (the models come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
