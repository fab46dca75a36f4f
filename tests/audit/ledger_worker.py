"""Entry point for appender processes started with multiprocessing's spawn method.

Kept apart from the test modules: a spawned child imports this module before
Django is set up, so nothing here may import models at the top.
"""
import os


def append_many(database_name: str, count: int, actor: str, start) -> None:
    """Set up Django on database_name, wait at the start barrier, then append count events."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
    import django

    django.setup()
    from django.db import connections

    # Point the child at the test database, as Django's test runner does for the parent.
    connections["default"].settings_dict["NAME"] = database_name
    from audit.ledger import append

    start.wait()
    try:
        for index in range(count):
            append("test.concurrent", actor=actor, details={"index": index, "pid": os.getpid()})
    finally:
        connections.close_all()


def append_until_killed(database_name: str, started) -> None:
    """Set up Django on database_name and append events as fast as possible until killed."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
    import django

    django.setup()
    from django.db import connections

    connections["default"].settings_dict["NAME"] = database_name
    from audit.ledger import append

    index = 0
    while True:
        append("test.crash", actor="test:victim", details={"index": index, "pad": "x" * 2000})
        index += 1
        if index == 20:
            started.set()
