"""The end-to-end tests' box: one for the session, started by tests.livebox."""
import pytest

from tests.livebox import Box, ConsoleAdmin, make_console_admin, start_box


@pytest.fixture(scope="session")
def box(tmp_path_factory) -> Box:
    yield from start_box(tmp_path_factory)


@pytest.fixture(scope="session")
def console_admin(box) -> ConsoleAdmin:
    return make_console_admin(box)
