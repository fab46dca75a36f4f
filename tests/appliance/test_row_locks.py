"""Actions lock rows FOR NO KEY UPDATE, so a transaction that committed a row pointing at a locked one does not
deadlock with it over the ledger's append lock (PostgreSQL defers foreign-key checks to COMMIT; CI's PostgreSQL
pass is where this matters: on SQLite every transaction takes the write lock first and waits its turn)."""
import threading
import time

import pytest
from django.db import connection, transaction

from appliance import actions
from appliance.models import Deployment, FitAnalysis, ModelVariant, VariantStatus
from audit import ledger
from tests.audit.tamper import wipe_ledger


@pytest.fixture
def committed(transactional_db):
    """Both transactions commit, each on its thread's own connection."""
    yield
    wipe_ledger()


def test_a_deploy_and_a_fit_report_committing_for_the_same_variant_both_go_through(committed):
    variant = ModelVariant.objects.create(name="locked", kind="dense", source_path="/nowhere/locked",
                                          status=VariantStatus.READY)
    appended, commit, errors = threading.Event(), threading.Event(), []

    def fit_report() -> None:
        # As do_record_fit: a row pointing at the variant, then the ledger, then COMMIT (where PostgreSQL checks
        # the foreign key), held open until the deploy has locked the variant and waits for the ledger.
        try:
            with transaction.atomic():
                FitAnalysis.objects.create(variant_id=variant.pk, hardware="cpu", context=4096, verdict="fits",
                                           margin_gb=1.0)
                ledger.append("variant.fit", actor="test", target=variant.name)
                appended.set()
                commit.wait(10)
        except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    def deploy() -> None:
        try:
            actions.do_deploy(variant, actor="test")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    fit = threading.Thread(target=fit_report)
    fit.start()
    assert appended.wait(10)
    deployer = threading.Thread(target=deploy)
    deployer.start()
    time.sleep(1.5)  # the deploy locks the variant and queues for the ledger's lock; the order, not a timing, is tested
    commit.set()
    fit.join(30)
    deployer.join(30)
    assert errors == []
    assert FitAnalysis.objects.filter(variant=variant).exists()
    assert Deployment.objects.filter(variant=variant).exists()
