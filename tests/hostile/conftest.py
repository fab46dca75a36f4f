"""The adversarial suite's box: a live one on loopback, of its own, attacked the way a hostile client or an
unlucky administrator would.

Every test here is marked e2e (it starts real processes: tests/conftest.py adds the marker), so CI runs it
on embedded defaults and again on PostgreSQL + Redis. A test that needs a box started differently (a tiny
disk, other limits) starts its own with tests.livebox.start_box.
"""
import pytest

from tests.livebox import Box, start_box


@pytest.fixture(scope="session")
def box(tmp_path_factory) -> Box:
    yield from start_box(tmp_path_factory)
