"""Imports that go wrong on a live box: links and special files in the source, a worker killed mid-copy, a disk
that is too small or fills up. Each is refused or failed with its reason, leaves no partial files, and the next
import works; web, worker and beat survive (except the worker killed on purpose) and the ledger verifies.

The box here is one of its own: its imports' lease is 10 s (so a dead worker is noticed quickly) and it runs
beat, which reclaims expired leases.
"""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.livebox import start, start_box

from .probes import assert_alive, files_under, shell

MiB = 1024 * 1024
LEASE_S = 10
# What the file system does to an import, which the database and broker cannot change: CI runs these once. The
# worker killed mid-import runs on both backends: its task's redelivery is the broker's, its lease the database's.
file_system_only = pytest.mark.backend_neutral


def celery(box, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "appliance", *args]


def start_worker(box, log: str) -> subprocess.Popen:
    """Start a worker on the box's queue, as tests.livebox does."""
    command = celery(box, "worker", "-Q", box.env["APPLIANCE_QUEUE"], "-c", "1", "-l", "INFO", "--without-heartbeat",
                     "--without-gossip", "--without-mingle")
    return start(command, box.env, box.home / "logs" / log)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A box of its own with a short import lease and beat running."""
    gen = start_box(tmp_path_factory, APPLIANCE_IMPORT_LEASE_S=str(LEASE_S))
    box = next(gen)
    box.procs["beat"] = start(celery(box, "beat", "-l", "INFO", "-s", str(box.home / "celerybeat-schedule")),
                              box.env, box.home / "logs" / "beat.log")
    try:
        yield box
    finally:
        gen.close()


def source_from(box, where: Path, extra=lambda src: None) -> Path:
    """Copy the distilled demo model (1.9 MB) to where, let extra add to it, and return it."""
    shutil.copytree(box.demo_dir / "demo-distilled", where)
    extra(where)
    return where


def import_model(box, source: Path, name: str, timeout: float = 180):
    """Run `import_model --wait`; timeout bounds how long a refusal may take to come back."""
    return box.manage("import_model", str(source), "--name", name, "--kind", "distilled", "--wait",
                      check=False, timeout=timeout)


def variant(box, name: str, settle_within: float = 0) -> dict:
    """Return a variant's status, detail and last import event, waiting up to settle_within s while it imports."""
    return shell(box, f"""
import json, time
from appliance.models import ModelVariant
from audit.models import AuditEvent
deadline = time.monotonic() + {settle_within}
while True:
    v = ModelVariant.objects.get(name={name!r})
    if v.status != "importing" or time.monotonic() > deadline:
        break
    time.sleep(0.2)
event = AuditEvent.objects.filter(action="variant.import", target={name!r}).order_by("-pk").first()
print(json.dumps({{"status": v.status, "detail": v.status_detail, "store_path": v.store_path,
                  "source_path": v.source_path, "event": [event.outcome, event.details] if event else None}}))
""")


def delete_variant(box, name: str) -> None:
    shell(box, "from appliance import actions\nfrom appliance.models import ModelVariant\n"
               f"actions.do_delete(ModelVariant.objects.get(name={name!r}), actor='test')\nprint('null')")


def box_is_sound(box) -> None:
    assert_alive(box)
    box.manage("audit_verify")


@file_system_only
def test_links_and_special_files_in_the_source_are_refused_naming_them(faulty, tmp_path):
    secret = faulty.home / "audit_kek"  # the box's key-encryption key: the worst file a link could leak
    assert secret.is_file()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "more.safetensors").write_bytes(b"\0" * 64)
    cases = {
        "link-to-secret": (lambda s: (s / "tokenizer_extra.json").symlink_to(secret),
                           "tokenizer_extra.json (symbolic link)"),
        "link-to-dir": (lambda s: (s / "shards").symlink_to(outside, target_is_directory=True),
                        "shards (symbolic link)"),
        "link-inside": (lambda s: (s / "alias.safetensors").symlink_to(s / "model.safetensors"),
                        "alias.safetensors (symbolic link)"),
        "fifo": (lambda s: os.mkfifo(s / "weights.pipe"), "weights.pipe (FIFO)"),
    }
    sources = {name: source_from(faulty, tmp_path / name, extra) for name, (extra, _) in cases.items()}
    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(lambda n: import_model(faulty, sources[n], n), cases)))
    store = faulty.home / "models"
    for name, (_, refusal) in cases.items():
        assert results[name].returncode != 0
        assert f"import of {name} failed" in results[name].stderr and refusal in results[name].stderr
        assert "links are never followed" in results[name].stderr
        state = variant(faulty, name) if name == "fifo" else None
        assert not (store / name).exists() and not (store / ".incoming" / name).exists()
    assert state["status"] == "failed" and state["event"][0] == "refused"
    key = secret.read_bytes()
    assert not any(key in f.read_bytes() for f in files_under(store))
    box_is_sound(faulty)


@file_system_only
def test_the_source_may_be_a_link_to_a_directory_and_the_store_gets_its_own_permissions(faulty, tmp_path):
    def loosen(src: Path) -> None:
        (src / "extra").mkdir()
        (src / "extra" / "notes.txt").write_text("x")
        for path in [src, src / "extra", *src.rglob("*")]:
            path.chmod(0o777)

    real = source_from(faulty, tmp_path / "real", loosen)
    alias = tmp_path / "usb-disk"
    alias.symlink_to(real, target_is_directory=True)
    result = import_model(faulty, alias, "via-alias")
    assert result.returncode == 0, result.stderr
    state = variant(faulty, "via-alias")
    assert state["source_path"] == str(real.resolve())  # resolved once and recorded, not re-followed later
    stored = Path(state["store_path"])
    assert {oct(p.stat().st_mode & 0o777) for p in stored.rglob("*") if p.is_file()} == {"0o640"}
    assert {oct(p.stat().st_mode & 0o777) for p in [stored, stored / "extra"]} == {"0o750"}
    delete_variant(faulty, "via-alias")
    box_is_sound(faulty)


def big_source(faulty, where: Path) -> Path:
    """Return a 1.9 MB model plus 512 MB of random payload: seconds to copy, so a kill lands mid-copy."""
    block = os.urandom(64 * MiB)

    def payload(src: Path) -> None:
        for i in range(8):
            (src / f"payload-{i}.dat").write_bytes(block)

    return source_from(faulty, where, payload)


def bytes_under(root: Path) -> int:
    total = 0
    for f in files_under(root):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass  # the copy moved on
    return total


def test_a_worker_killed_mid_import_is_noticed_its_partial_files_removed_and_the_import_works_again(faulty, tmp_path):
    source = big_source(faulty, tmp_path / "big")
    name = "killed-mid-copy"
    incoming = faulty.home / "models" / ".incoming" / name
    try:
        faulty.manage("import_model", str(source), "--name", name, "--kind", "distilled")
        deadline = time.monotonic() + 120  # an upper bound on the worker taking the job
        while bytes_under(incoming) < 32 * MiB:
            assert time.monotonic() < deadline, "the worker did not start copying"
            time.sleep(0.02)
        worker = faulty.procs["worker"]
        children = psutil.Process(worker.pid).children(recursive=True)
        os.kill(worker.pid, signal.SIGKILL)
        for child in children:  # the pool process doing the copy: killed with its parent, as a crash would
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        worker.wait(timeout=30)
        psutil.wait_procs(children, timeout=30)
        assert bytes_under(incoming) < bytes_under(source)  # it died mid-copy

        # Started again at once, as make run's supervisor does: its lease has not expired yet, so the new worker
        # leaves it at start; beat's sweep, run by that worker, notices once it has.
        faulty.procs["worker"] = start_worker(faulty, "worker-restarted.log")
        state = variant(faulty, name, settle_within=60)  # noticed within a minute
        assert state["status"] == "failed", state
        assert "stopped: its lease expired" in state["detail"] and "partial files removed" in state["detail"]
        assert state["event"][0] == "failed" and "lease expired" in state["event"][1]["reason"]
        assert not incoming.exists() and not (faulty.home / "models" / name).exists()

        result = import_model(faulty, source, name, timeout=300)
        assert result.returncode == 0 and f"{name} ready" in result.stdout, result.stderr
        stored = faulty.home / "models" / name / "payload-7.dat"
        assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(
            (source / "payload-7.dat").read_bytes()).digest()
        delete_variant(faulty, name)
    finally:
        shutil.rmtree(source)
    box_is_sound(faulty)


@pytest.fixture
def small_store(faulty):
    """Mount a 24 MiB tmpfs as the box's model store for one test; unmount it afterwards."""
    store = faulty.home / "models"
    store.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0750", "tmpfs", str(store)], check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", str(store)], check=True)


def free(store: Path) -> int:
    st = os.statvfs(store)
    return st.f_bavail * st.f_frsize


@file_system_only
def test_a_model_larger_than_the_free_disk_is_refused_up_front_saying_what_it_needs(faulty, small_store, tmp_path):
    source = source_from(faulty, tmp_path / "too-big",
                         lambda s: (s / "payload.dat").write_bytes(os.urandom(32 * MiB)))
    empty = free(small_store)
    result = import_model(faulty, source, "too-big", timeout=120)  # --wait returns with the refusal
    assert result.returncode != 0
    refusal = re.search(r"import of too-big failed: not enough space in the model store: needs ([\d.]+) GB, "
                        r"([\d.]+) GB free", result.stderr)
    assert refusal and float(refusal[1]) > float(refusal[2]) > 0, result.stderr
    assert variant(faulty, "too-big")["event"][0] == "refused"
    assert files_under(small_store) == [] and free(small_store) == empty
    box_is_sound(faulty)


@file_system_only
def test_a_disk_that_fills_mid_copy_is_freed_first_then_the_failure_recorded_and_a_retry_fits(
        faulty, small_store, tmp_path):
    def many_small_files(src: Path) -> None:
        # The up-front check counts bytes (7000 of them here); tmpfs gives each file a 4 KiB page, so the copy
        # needs 29 MB of a 25 MB store and runs out mid-way: the check passed, the disk filled.
        (src / "vocab").mkdir()
        for i in range(7000):
            (src / "vocab" / f"piece-{i:05d}.txt").write_bytes(b"x")

    source = source_from(faulty, tmp_path / "fills-up", many_small_files)
    empty = free(small_store)
    result = import_model(faulty, source, "fills-up")
    assert result.returncode != 0
    assert re.search(r"import of fills-up failed: the model store ran out of space mid-copy \(No space left on "
                     r"device\); partial files removed; needs [\d.]+ GB, [\d.]+ GB free now", result.stderr), \
        result.stderr
    outcome, details = variant(faulty, "fills-up")["event"]
    assert outcome == "failed" and details.pop("node")  # every event names the node that wrote it
    assert details == {"reason": result.stderr.split("failed: ", 1)[1].strip()}
    assert files_under(small_store) == [] and free(small_store) == empty

    retry = import_model(faulty, faulty.demo_dir / "demo-distilled", "fits-after")
    assert retry.returncode == 0, retry.stderr
    delete_variant(faulty, "fits-after")
    box_is_sound(faulty)


@pytest.fixture
def gguf_store(faulty):
    """Mount a tmpfs just large enough for the bundled GGUF's converted copy as the box's model store."""
    store = faulty.home / "models"
    store.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=360m,mode=0750", "tmpfs", str(store)], check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", str(store)], check=True)


@file_system_only
def test_a_disk_that_fills_while_a_gguf_converts_fails_it_with_the_reason_and_leaves_nothing(
        faulty, gguf_store, bundled_gguf):
    queued = faulty.manage("import_model", str(bundled_gguf), "--name", "gguf-fills", "--kind", "dense")
    assert queued.returncode == 0, queued.stderr
    # The space check passed (the store holds the converted copy); another writer now fills the disk while the
    # conversion child loads the GGUF, before it writes a byte of safetensors.
    converting = shell(faulty, """
import json, time
from appliance.models import ModelVariant
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    v = ModelVariant.objects.get(name="gguf-fills")
    if v.status != "importing" or v.progress_detail.startswith("converting"):
        break
    time.sleep(0.2)
print(json.dumps([v.status, v.progress_detail]))
""")
    assert converting[0] == "importing" and converting[1].startswith("converting Q4_1 to safetensors"), converting
    filler = gguf_store / "another-writer.dat"
    with filler.open("wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * MiB
        while free(gguf_store) > 64 * MiB:
            fh.write(chunk)
            fh.flush()
    try:
        failed = variant(faulty, "gguf-fills", settle_within=300)
        assert failed["status"] == "failed"
        assert re.match(r"the model store ran out of space while converting the GGUF \(No space left on device\); "
                        r"partial files removed; needs [\d.]+ GB, [\d.]+ GB free now", failed["detail"]), failed
        assert failed["event"][0] == "failed"
        assert files_under(gguf_store / ".incoming") == [] and not (gguf_store / "gguf-fills").exists()
    finally:
        filler.unlink()
    box_is_sound(faulty)
