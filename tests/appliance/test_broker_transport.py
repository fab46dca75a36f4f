"""The embedded broker's transport (appliance/broker_transport.py), on real kombu connections over real folders.

kombu's own filesystem transport fails each of these: a reader polling while a message is written takes it
empty and raises, a file that cannot be decoded stops the worker, and a fanout table can be read empty.
"""
import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.transport.virtual import BrokerState, Empty

from appliance import broker_transport
from appliance.broker_transport import Transport

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def folders(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    # kombu keeps the bindings it has made in a state shared by the process; each test has folders of its own.
    monkeypatch.setattr(Transport, "global_state", BrokerState())
    names = {"data_folder_in": "queue", "processed_folder": "processed", "control_folder": "control",
             "unreadable_folder": "unreadable"}
    paths = {option: tmp_path / name for option, name in names.items()}
    for path in paths.values():
        path.mkdir()
    paths["data_folder_out"] = paths["data_folder_in"]
    return paths


def connect(folders: dict[str, Path]) -> Connection:
    return Connection("filesystem://", transport=Transport,
                      transport_options={option: str(path) for option, path in folders.items()})


def test_messages_go_through_in_order_and_leave_no_file_behind(folders):
    with connect(folders) as connection:
        queue = connection.SimpleQueue("jobs")
        for n in range(3):
            queue.put({"n": n})
        messages = [queue.get(timeout=1) for _ in range(3)]
        assert [message.payload["n"] for message in messages] == [0, 1, 2]
        for message in messages:
            message.ack()  # kombu puts unacknowledged messages back when the channel closes
        queue.close()
    leftovers = [path.name for option in ("data_folder_in", "processed_folder") for path in folders[option].iterdir()]
    assert leftovers == []


def test_a_message_being_written_is_invisible_until_it_is_whole(folders, monkeypatch):
    seen_while_writing = []
    real_fsync = os.fsync

    with connect(folders) as connection:
        reader = connection.channel()

        def fsync_then_poll(fd):
            real_fsync(fd)  # the bytes are on disk; the message is not yet renamed into the queue
            with pytest.raises(Empty):
                reader._get("jobs")
            seen_while_writing.append(sorted(path.name for path in folders["data_folder_in"].iterdir()))

        monkeypatch.setattr(broker_transport.os, "fsync", fsync_then_poll)
        queue = connection.SimpleQueue("jobs")
        queue.put({"whole": True})
        monkeypatch.undo()
        assert queue.get(timeout=1).payload == {"whole": True}
        queue.close()
        reader.close()
    [names] = seen_while_writing
    assert len(names) == 1 and names[0].endswith(".jobs.msg.partial"), names


def test_a_failed_write_raises_and_leaves_nothing_in_the_queue(folders, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with connect(folders) as connection:
        monkeypatch.setattr(broker_transport.os, "fsync", disk_full)
        with pytest.raises(ChannelError, match="No space left on device"):
            connection.channel()._put("jobs", {"lost": False})
    assert list(folders["data_folder_in"].iterdir()) == []


def test_an_undecodable_message_is_set_aside_and_the_next_one_delivered(folders, caplog):
    queue_folder = folders["data_folder_in"]
    (queue_folder / "0_empty.jobs.msg").write_bytes(b"")  # what a writer killed mid-write used to leave
    (queue_folder / "1_torn.jobs.msg").write_bytes(b'{"body": "abc')
    with connect(folders) as connection, caplog.at_level(logging.ERROR, logger=broker_transport.__name__):
        queue = connection.SimpleQueue("jobs")
        queue.put({"after": "the bad ones"})
        assert queue.get(timeout=1).payload == {"after": "the bad ones"}
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.2)
        queue.close()
    kept = sorted(path.name for path in folders["unreadable_folder"].iterdir())
    assert kept == ["0_empty.jobs.msg", "1_torn.jobs.msg"]
    assert (folders["unreadable_folder"] / "1_torn.jobs.msg").read_bytes() == b'{"body": "abc'  # kept whole
    assert sum("set aside the unreadable message" in record.getMessage() for record in caplog.records) == 2


def test_two_consumers_never_take_one_message_twice(folders):
    total = 200
    with connect(folders) as producer:
        channel = producer.channel()
        for n in range(total):
            channel._put("jobs", {"n": n})
        channel.close()
    taken: list[list[int]] = [[], []]

    def drain(into: list[int]) -> None:
        with connect(folders) as connection:
            channel = connection.channel()
            while True:
                try:
                    into.append(channel._get("jobs")["n"])
                except Empty:
                    break
            channel.close()

    threads = [threading.Thread(target=drain, args=(bucket,)) for bucket in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(taken[0] + taken[1]) == list(range(total))


def test_fanout_bindings_are_kept_under_the_lock_and_an_empty_table_reads_as_none(folders):
    broadcast = Exchange("broadcast", type="fanout")
    with connect(folders) as connection:
        channel = connection.channel()
        (folders["control_folder"] / "broadcast.exchange").write_bytes(b"")  # a table caught mid-creation
        assert channel.get_table("broadcast") == []
        for name in ("worker-a", "worker-b"):
            Queue(name, broadcast)(channel).declare()
        assert sorted(entry.queue for entry in channel.get_table("broadcast")) == ["worker-a", "worker-b"]
        Queue("worker-a", broadcast)(channel).declare()  # binding twice keeps one entry
        assert len(channel.get_table("broadcast")) == 2
        channel._put_fanout("broadcast", {"ping": 1}, "")
        assert channel._get("worker-a") == {"ping": 1} and channel._get("worker-b") == {"ping": 1}
        channel.queue_delete("worker-a")
        assert [entry.queue for entry in channel.get_table("broadcast")] == ["worker-b"]
        assert channel.get_table("nothing-bound") == []
        channel.close()


def test_the_appliance_uses_this_transport_for_its_embedded_broker(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("CELERY_BROKER_URL", "DATABASE_URL")}
    env["APPLIANCE_HOME"] = str(tmp_path / "home")
    probe = ("from appliance.celery import app\n"
             "with app.connection_for_write() as connection:\n"
             "    print(type(connection.transport).__module__, connection.transport_options['unreadable_folder'])\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    module, unreadable = result.stdout.split()
    assert module == "appliance.broker_transport"
    assert Path(unreadable) == tmp_path / "home" / "broker" / "unreadable" and Path(unreadable).is_dir()
