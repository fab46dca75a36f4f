import pytest

from tests.audit.tamper import wipe_ledger


@pytest.fixture
def committed_ledger(transactional_db):
    """Let appends commit, and empty the ledger before the flush that its triggers would refuse."""
    yield
    # Runs before transactional_db's teardown (the flush), since this fixture depends on it.
    wipe_ledger()
