import pytest

from tests.audit.tamper import wipe_ledger


@pytest.fixture
def committed_ledger(transactional_db):
    """Let appends commit, and empty the ledger before the flush that its triggers would refuse."""
    yield
    # Runs before transactional_db's teardown (the flush), since this fixture depends on it.
    wipe_ledger()


@pytest.fixture(autouse=True)
def pin_file(settings, tmp_path):
    """Give each test its own pin file, as each test's database starts without signing keys."""
    settings.AUDIT_PUBKEY_PIN_FILE = tmp_path / "pinned-fingerprints"
    return settings.AUDIT_PUBKEY_PIN_FILE
