"""Point the test run at its own APPLIANCE_HOME before Django reads its settings.

Loaded with `-p` (see pyproject), which runs before pytest-django configures
Django; a conftest would be too late, and tests must never touch the state of
a box started with `make run`.
"""
import os
from pathlib import Path

os.environ["APPLIANCE_HOME"] = os.environ.get(
    "APPLIANCE_TEST_HOME", str(Path(__file__).resolve().parent.parent / "var" / "test"))
