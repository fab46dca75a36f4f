"""Fixtures shared by every test package."""
from pathlib import Path

import pytest

from inference.demo_models import make_demo_models


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a directory holding every demo model, written once for the session."""
    out_dir = tmp_path_factory.mktemp("demo-models")
    make_demo_models(out_dir)
    return out_dir


@pytest.fixture(scope="session", autouse=True)
def close_ledger_writer_connections(django_db_setup, django_db_blocker):
    """Close the chat API's database threads' connections (ledger writer, gatekeeper) before the test database
    is dropped.

    PostgreSQL refuses to drop a database that a session still uses, and those
    threads keep their own connections for the life of the process.
    """
    yield
    from django.db import connections

    from inference import api

    with django_db_blocker.unblock():
        for thread in api.DATABASE_THREADS:
            thread.submit(connections.close_all).result()
