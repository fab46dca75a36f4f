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
