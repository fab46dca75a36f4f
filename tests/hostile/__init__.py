"""The adversarial suite: a live box on loopback, attacked the way a hostile client or an unlucky administrator
would.

Every test here is marked e2e (it starts real processes: tests/conftest.py adds the marker), so CI runs it
on embedded defaults and, unless marked backend_neutral, again on PostgreSQL + Redis. Tests share the
session's box; a test that kills a process or needs a box started differently (a tiny disk, other limits)
starts its own with tests.livebox.start_box.
"""
